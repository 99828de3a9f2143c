"""A user's own data: `csv` and `jsonl` tasks over `data_dir/{train,dev,test}.{csv,jsonl}`.

One row (or JSON object per line) per example: one text column, or two for sentence pairs, and a label
column. The label set is `labels` when given (its order is the index order) or the sorted set of the
training labels (numerically when they are all integers, so "2" < "10"). The test file may omit the
label column. Every problem with the files is a UserError naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterator, Sequence

from st.errors import UserError
from st.io import strict_json
from st.tasks import Example, register_task
from st.tasks._common import as_text, check_split, compute_metrics, write_predictions

SPLITS = ("train", "dev", "test")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(1-based line where the row starts, {column: value}) per non-blank row; the header is checked first."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path} is empty; it needs a header row naming its columns")
            header = [name.strip() for name in header]
            yield 0, dict.fromkeys(header, "")  # the header's columns, for the caller's column check
            previous = reader.line_num
            for row in reader:
                line, previous = previous + 1, reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise UserError(
                        f"{path}, line {line}: {len(row)} fields where the header has {len(header)}; "
                        "quote fields that contain commas"
                    )
                yield line, dict(zip(header, row))
        except csv.Error as e:
            raise UserError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) per non-blank line."""
    with path.open(encoding="utf-8-sig") as f:
        try:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = strict_json(text)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {line}: invalid JSON ({e.msg}, column {e.colno})") from None
                except ValueError as e:  # NaN or Infinity: not JSON, and never a text
                    raise UserError(f"{path}, line {line}: {e}; write null, a number or a quoted string") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}, line {line}: expected a JSON object per line, got {type(row).__name__}")
                yield line, row
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None


def _label_order(names) -> tuple[str, ...]:
    names = set(names)
    try:
        return tuple(sorted(names, key=int))
    except ValueError:
        return tuple(sorted(names))


class FileTask:
    """The task behind `csv` and `jsonl`; `fmt` picks the file format."""

    head_dropout = 0.1
    dev_splits = ("dev",)
    test_splits = ("test",)

    def __init__(self, fmt: str, data_dir, text_columns: str, label_column: str, regression: bool, labels: str | None):
        self.name = self.fmt = fmt
        if data_dir is None:
            raise UserError(
                f"the {fmt} task reads your own data: pass --data-dir, a folder with train.{fmt}, dev.{fmt} "
                f"and test.{fmt}"
            )
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise UserError(
                f"data dir {self.data_dir} does not exist; pass a folder with train.{fmt}, dev.{fmt} and test.{fmt}"
            )
        self.text_columns = tuple(c.strip() for c in text_columns.split(",") if c.strip())
        if not 1 <= len(self.text_columns) <= 2:
            raise UserError(
                "--text-columns takes one column or two for sentence pairs (e.g. premise,hypothesis), got "
                f"{text_columns!r}"
            )
        self.label_column = label_column
        self.regression = regression
        self._cache: dict[str, list[Example]] = {}

        if regression:
            if labels:
                raise UserError("--labels names the classes of a classification task; drop it, or drop --regression")
            self.labels: tuple[str, ...] = ()
            self.metrics = ("pearson", "spearman")
        else:
            if labels:
                names = [name.strip() for name in labels.split(",") if name.strip()]
                if len(set(names)) != len(names):
                    raise UserError(f"--labels {labels!r} repeats a label; list each class once")
                self.labels = tuple(names)
            else:
                self.labels = _label_order(label for *_, label in self._fields("train"))
            if len(self.labels) < 2:
                raise UserError(
                    f"the {fmt} task found the single label {self.labels[0] if self.labels else None!r} in "
                    f"{self._path('train')}; "
                    "a classifier needs at least two (pass --labels a,b, or --regression for a score)"
                )
            self.metrics = ("accuracy", "f1") if len(self.labels) == 2 else ("accuracy", "macro_f1")
        self.main_metric = self.metrics[0]

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.labels)

    def _path(self, split: str) -> Path:
        return self.data_dir / f"{split}.{self.fmt}"

    def _fields(self, split: str) -> Iterator[tuple[int, str, tuple[str, ...], str | None]]:
        """(line, guid, texts, raw label or None) per row of a split's file, with every column checked."""
        path = self._path(split)
        if not path.is_file():
            raise UserError(f"{path} does not exist; the {self.fmt} task reads {split}.{self.fmt} from the data dir")
        rows = _csv_rows(path) if self.fmt == "csv" else _jsonl_rows(path)
        label_optional = split in self.test_splits
        if self.fmt == "csv":
            _, header = next(rows)
            self._check_columns(path, None, header, label_optional)
        for line, row in rows:
            if self.fmt == "jsonl":
                self._check_columns(path, line, row, label_optional)
            guid = as_text(row.get("id")) or str(line)
            texts = tuple(as_text(row[c]) for c in self.text_columns)
            label = as_text(row.get(self.label_column))
            if label == "":
                if not label_optional:
                    raise UserError(
                        f"{path}, line {line}: the {self.label_column!r} field is empty; fill it in or drop the row"
                    )
                label = None  # an unlabelled test row
            yield line, guid, texts, label

    def _check_columns(self, path: Path, line: int | None, row: dict, label_optional: bool) -> None:
        needed = list(self.text_columns) + ([] if label_optional else [self.label_column])
        missing = [c for c in needed if row.get(c) is None]
        if not missing:
            return
        where = f"{path}, line {line}" if line else str(path)
        option = "--label-column" if missing[0] == self.label_column else "--text-columns"
        raise UserError(
            f"{where} has no column {missing[0]!r} (columns: {', '.join(map(str, row)) or 'none'}); "
            f"rename it or pass {option}"
        )

    def _example(self, path: Path, line: int, guid: str, texts: tuple[str, ...], label: str | None) -> Example:
        if label is not None:
            if self.regression:
                try:
                    value = float(label)
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):
                    raise UserError(
                        f"{path}, line {line}: regression label {label!r} is not a finite number; fix the row"
                    )
                label = value
            elif label in self.labels:
                label = self.labels.index(label)
            else:
                raise UserError(
                    f"{path}, line {line}: label {label!r} is not one of {', '.join(self.labels)}; "
                    "fix the row or pass the full set with --labels"
                )
        text_b = texts[1] if len(texts) == 2 else None
        return Example(texts[0], text_b, label, guid)

    def load(self, split: str) -> list[Example]:
        check_split(self.name, split, SPLITS)
        if split not in self._cache:
            path = self._path(split)
            self._cache[split] = [
                self._example(path, line, guid, texts, label) for line, guid, texts, label in self._fields(split)
            ]
        return list(self._cache[split])

    def compute_metrics(self, predictions: Sequence, labels: Sequence) -> dict[str, float]:
        return compute_metrics(self.metrics, predictions, labels)

    def write_predictions(self, split: str, examples: Sequence[Example], predictions: Sequence, path: Path) -> None:
        write_predictions(self.labels, examples, predictions, path)


@register_task("csv")
def csv_task(data_dir=None, text_columns="sentence", label_column="label", regression=False, labels=None) -> FileTask:
    """Your own data as data_dir/{train,dev,test}.csv with a header row (text column(s), label column, optional id)."""
    return FileTask("csv", data_dir, text_columns, label_column, regression, labels)


@register_task("jsonl")
def jsonl_task(data_dir=None, text_columns="sentence", label_column="label", regression=False, labels=None) -> FileTask:
    """Your own data as data_dir/{train,dev,test}.jsonl, one JSON object per line (text key(s), label key,
    optional id)."""
    return FileTask("jsonl", data_dir, text_columns, label_column, regression, labels)
