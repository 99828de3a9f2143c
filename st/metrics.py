"""GLUE metrics by name, from scikit-learn and scipy (never hand-rolled)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, y: accuracy_score(y, p),
    "f1": lambda p, y: f1_score(y, p),  # binary F1 of the positive class (label index 1), as GLUE
    "macro_f1": lambda p, y: f1_score(y, p, average="macro"),
    "mcc": lambda p, y: matthews_corrcoef(y, p),
    "pearson": lambda p, y: pearsonr(p, y)[0],
    "spearman": lambda p, y: spearmanr(p, y)[0],
}


def compute_metrics(names: Sequence[str], predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """Each named metric of predictions (label indices, or floats for regression) against labels."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} predictions for {y.shape[0]} labels")
    return {name: float(METRICS[name](p, y)) for name in names}
