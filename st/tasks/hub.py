"""A user's own Hugging Face dataset: the `hf` task, read through `datasets` (`st.tasks._hf`).

`--data-dir` a save_to_disk folder or parquet files, or `--dataset HUB_ID[:CONFIG]`, with the csv/jsonl
tasks' options: `--text-columns` (one, or two for pairs), `--label-column`, `--labels`, `--regression`.
Its splits are train, dev and test, as the csv/jsonl tasks'; dev is the dataset's `validation` (or
`dev`, `valid`). Label names come from a `ClassLabel` column (their index order is the head's), else
from --labels or the sorted training labels; label -1 or a missing label marks an unlabelled test row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from st.errors import UserError
from st.tasks import Example, register_task
from st.tasks._common import check_split, compute_metrics, write_predictions
from st.tasks._hf import check_columns, class_name, class_names, column_values, locate, text_values

SPLITS = ("train", "dev", "test")
ALIASES = {"train": ("train",), "dev": ("validation", "dev", "valid", "val"), "test": ("test",)}


class HubTask:
    name = "hf"
    head_dropout = 0.1
    dev_splits = ("dev",)
    test_splits = ("test",)

    def __init__(self, data_dir, dataset, text_columns: str, label_column: str, regression: bool, labels: str | None):
        self.source = locate(data_dir, dataset)
        self.text_columns = tuple(c.strip() for c in text_columns.split(",") if c.strip())
        if not 1 <= len(self.text_columns) <= 2:
            raise UserError(
                "--text-columns takes one column or two for sentence pairs (e.g. premise,hypothesis), got "
                f"{text_columns!r}"
            )
        self.label_column, self.regression = label_column, regression
        self._cache: dict[str, list[Example]] = {}
        _, train = self._dataset("train", labelled=True)
        named = class_names(train, label_column)
        if regression:
            if labels or named:
                raise UserError(
                    f"--regression takes a numeric label, but {'--labels' if labels else label_column!r} names "
                    "classes; drop --regression or the label names"
                )
            self.labels: tuple[str, ...] = ()
            self.metrics = ("pearson", "spearman")
        else:
            if labels:
                self.labels = tuple(n.strip() for n in labels.split(",") if n.strip())
            elif named:
                self.labels = named
            else:
                self.labels = _label_order({str(v) for v in column_values(train, label_column) if v is not None})
            if len(self.labels) < 2:
                raise UserError(
                    f"the {label_column!r} column of {self.source.where} holds fewer than two labels; a classifier "
                    "needs two (pass --labels a,b, or --regression for a score)"
                )
            self.metrics = ("accuracy", "f1") if len(self.labels) == 2 else ("accuracy", "macro_f1")
        self.main_metric = self.metrics[0]

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.labels)

    def _split_name(self, split: str) -> str:
        names = self.source.split_names()
        found = next((n for n in ALIASES[split] if n in names), None)
        if found is None:
            raise UserError(
                f"{self.source.where} has no {split} split ({' or '.join(ALIASES[split])}); its splits are: "
                f"{', '.join(names)}"
            )
        return found

    def _dataset(self, split: str, labelled: bool):
        """(where, for messages: the source and the dataset's split name; the split as a `datasets.Dataset`)."""
        name = self._split_name(split)
        ds, where = self.source.load(name), f"{self.source.where} ({name})"
        options = {c: "--text-columns" for c in self.text_columns} | {self.label_column: "--label-column"}
        needed = list(self.text_columns) + ([self.label_column] if labelled else [])
        check_columns(ds, needed, where, options)
        return where, ds

    def load(self, split: str) -> list[Example]:
        check_split(self.name, split, SPLITS)
        if split not in self._cache:
            self._cache[split] = self._examples(split)
        return list(self._cache[split])

    def _examples(self, split: str) -> list[Example]:
        test = split in self.test_splits
        where, ds = self._dataset(split, labelled=not test)
        fix = "fill it in or drop the row, or pass the text column with --text-columns"
        texts = [text_values(ds, c, where, fix) for c in self.text_columns]
        has_labels = self.label_column in ds.column_names
        raw_labels = column_values(ds, self.label_column) if has_labels else [None] * len(ds)
        guids = column_values(ds, "id") if "id" in ds.column_names else range(len(ds))
        named = class_names(ds, self.label_column) if has_labels else None
        examples = []
        for i, raw in enumerate(raw_labels):
            label = self._label(raw, named, test, f"{where}, row {i}")
            examples.append(Example(texts[0][i], texts[1][i] if len(texts) == 2 else None, label, str(guids[i])))
        return examples

    def _label(self, raw, named, test: bool, where: str):
        if raw is None or (raw == -1 and (named or test)):
            if test:
                return None  # an unlabelled test row
            raise UserError(f"{where}: the {self.label_column!r} column is empty; fill it in or drop the row")
        if self.regression:
            value = float(raw) if isinstance(raw, (int, float)) else math.nan
            if not math.isfinite(value):
                raise UserError(f"{where}: regression label {raw!r} is not a finite number; fix the row")
            return value
        name = class_name(named, raw, where, self.label_column) if named else str(raw)
        if name not in self.labels:
            raise UserError(
                f"{where}: label {name!r} is not one of {', '.join(self.labels)}; fix the row or pass the full "
                "set with --labels"
            )
        return self.labels.index(name)

    def compute_metrics(self, predictions: Sequence, labels: Sequence) -> dict[str, float]:
        return compute_metrics(self.metrics, predictions, labels)

    def write_predictions(self, split: str, examples: Sequence[Example], predictions: Sequence, path: Path) -> None:
        write_predictions(self.labels, examples, predictions, path)


def _label_order(names: set[str]) -> tuple[str, ...]:
    """Numerically when every label is an integer (so "2" < "10"), else alphabetically."""
    try:
        return tuple(sorted(names, key=int))
    except ValueError:
        return tuple(sorted(names))


@register_task("hf")
def hf_task(
    data_dir=None, dataset=None, text_columns="text", label_column="label", regression=False, labels=None
) -> HubTask:
    """Your own Hugging Face dataset: --data-dir (save_to_disk or parquet folder) or --dataset HUB_ID[:CONFIG]."""
    return HubTask(data_dir, dataset, text_columns, label_column, regression, labels)
