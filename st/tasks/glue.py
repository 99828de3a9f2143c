"""GLUE tasks, SNLI and SciTail, read from their official file layouts.

Each task is one `Spec` row in the table below and one `GlueTask` reads any of them. Columns are found
by header name wherever a file has a header: the official headers differ between train and test files
(MRPC's train starts with `Quality`, its test with `index`; MNLI's train has 12 columns, dev 16, test
10), so names survive where fixed positions would not. Headerless files (CoLA train/dev, SciTail) get
their column names from the spec.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from st.errors import UserError
from st.tasks import Example, register_task
from st.tasks._glue_hub import hub_config, hub_examples
from st.tasks._hf import check_one_source, is_dataset_folder

NLI = ("contradiction", "entailment", "neutral")  # HF run_glue's MNLI order, so checkpoints interoperate
BINARY = ("0", "1")
RTE_LABELS = ("entailment", "not_entailment")
PAIR = ("sentence1", "sentence2")


@dataclass(frozen=True)
class Spec:
    name: str
    folder: str  # the task's folder under $GLUE_DIR, as download_glue_data.py names it
    files: tuple[tuple[str, str], ...]  # (split, path under the data folder); "dev*", "test*"/"ax" say which kind
    text: tuple[str, str | None]  # columns of text_a and text_b (None for single-sentence tasks)
    label: str  # label column; test files of GLUE lack it and load with label None
    labels: tuple[str, ...]  # label strings in index order; () for regression (STS-B)
    metrics: tuple[str, ...]  # the first is the main metric
    guid: str = "index"  # id column; files without one use the 1-based line number
    header: tuple[str, ...] = ()  # column names for headerless files
    headerless: tuple[str, ...] = ()  # splits whose file has no header row
    submissions: tuple[tuple[str, str], ...] = ()  # (split, file name the GLUE server expects)
    head_dropout: float = 0.1
    subdirs: tuple[str, ...] = ("",)  # where under the data folder the files may lie, first one named in errors
    skip_labels: tuple[str, ...] = ()  # labels that mean "no gold label" and drop the example (SNLI's "-")

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.files)


def _glue(name, folder, text, label, labels, metrics, submission, **kw) -> Spec:
    """The common GLUE shape: train.tsv, dev.tsv, test.tsv, one submission file."""
    files = (("train", "train.tsv"), ("dev", "dev.tsv"), ("test", "test.tsv"))
    return Spec(name, folder, files, text, label, labels, metrics, submissions=(("test", submission),), **kw)


SPECS = (
    # CoLA train/dev: source, label, the original "*" judgment, sentence, with no header; test has one.
    _glue(
        "cola",
        "CoLA",
        ("sentence", None),
        "label",
        BINARY,
        ("mcc",),
        "CoLA.tsv",
        head_dropout=0.05,
        header=("source", "label", "judgment", "sentence"),
        headerless=("train", "dev"),
    ),
    _glue("sst2", "SST-2", ("sentence", None), "label", BINARY, ("accuracy",), "SST-2.tsv"),
    _glue("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", BINARY, ("accuracy", "f1"), "MRPC.tsv"),
    _glue("stsb", "STS-B", PAIR, "score", (), ("pearson", "spearman"), "STS-B.tsv"),
    _glue("qqp", "QQP", ("question1", "question2"), "is_duplicate", BINARY, ("accuracy", "f1"), "QQP.tsv", guid="id"),
    Spec(
        "mnli",
        "MNLI",
        (
            ("train", "train.tsv"),
            ("dev_matched", "dev_matched.tsv"),
            ("dev_mismatched", "dev_mismatched.tsv"),
            ("test_matched", "test_matched.tsv"),
            ("test_mismatched", "test_mismatched.tsv"),
            # GLUE's diagnostic set is scored with the MNLI model and lives beside MNLI/ in $GLUE_DIR.
            ("ax", "../diagnostic/diagnostic.tsv"),
        ),
        PAIR,
        "gold_label",
        NLI,
        ("accuracy",),
        head_dropout=0.2,
        submissions=(("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv"), ("ax", "AX.tsv")),
    ),
    _glue("qnli", "QNLI", ("question", "sentence"), "label", RTE_LABELS, ("accuracy",), "QNLI.tsv"),
    _glue("rte", "RTE", PAIR, "label", RTE_LABELS, ("accuracy",), "RTE.tsv"),
    _glue("wnli", "WNLI", PAIR, "label", BINARY, ("accuracy",), "WNLI.tsv"),
    # The official snli_1.0 jsonl, not GLUE's SNLI tsv: that train.tsv mixes 11- and 15-column rows.
    Spec(
        "snli",
        "SNLI",
        tuple((s, f"snli_1.0_{s}.jsonl") for s in ("train", "dev", "test")),
        PAIR,
        "gold_label",
        NLI,
        ("accuracy",),
        guid="pairID",
        subdirs=("", "snli_1.0"),
        skip_labels=("-",),
    ),
    Spec(
        "scitail",
        "SciTailV1.1",
        tuple((s, f"scitail_1.0_{s}.tsv") for s in ("train", "dev", "test")),
        ("premise", "hypothesis"),
        "label",
        ("entails", "neutral"),
        ("accuracy",),
        header=("premise", "hypothesis", "label"),
        headerless=("train", "dev", "test"),
        subdirs=("tsv_format", ""),
    ),
)

# The nine GLUE tasks in the benchmark's order: what `st share --tasks glue` expands to.
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


class GlueTask:
    """One task of the table: loads its splits as `Example`s, scores predictions, writes GLUE submissions."""

    def __init__(self, spec: Spec, data_dir: str | Path | None = None, dataset: str | None = None):
        self.spec, self.dataset = spec, dataset
        self.name, self.labels, self.metrics = spec.name, spec.labels, spec.metrics
        self.main_metric, self.head_dropout = spec.metrics[0], spec.head_dropout
        self.dev_splits = tuple(s for s in spec.splits if s.startswith("dev"))
        self.test_splits = tuple(s for s in spec.splits if s.startswith("test") or s == "ax")
        check_one_source(data_dir, dataset)
        if data_dir is None and not dataset and os.environ.get("GLUE_DIR"):  # a hub id is the data too
            data_dir = Path(os.environ["GLUE_DIR"]) / spec.folder
        # A missing folder is reported on load, not here: building a task for its label set needs no data.
        self.data_dir = Path(data_dir) if data_dir is not None else None

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    def load(self, split: str) -> list[Example]:
        if self.dataset or (self.data_dir is not None and is_dataset_folder(self.data_dir, hub_config(self.spec.name))):
            self._check_split(split)  # the hub's copies: `st.tasks._glue_hub`
            return hub_examples(self.spec, split, self.data_dir, self.dataset)
        path = self._path(split)
        index = {label: i for i, label in enumerate(self.labels)}
        rows = (
            _jsonl_rows(path)
            if path.suffix == ".jsonl"
            else _tsv_rows(path, self.spec.header if split in self.spec.headerless else ())
        )
        text_a, text_b = self.spec.text

        def column(row: dict, line: int, name: str) -> str:
            if name not in row:
                raise UserError(
                    f"{path}:{line}: no {name!r} column (found: {', '.join(row)}); "
                    f"is this the official {self.spec.folder} {split} file?"
                )
            return row[name]

        examples = []
        for line, row in rows:
            raw = row.get(self.spec.label)
            if raw is None and split not in self.test_splits:
                raw = column(row, line, self.spec.label)  # train and dev must be labelled
            if raw is None:
                label = None
            elif raw in self.spec.skip_labels:
                continue
            elif not self.labels:
                try:
                    label = float(raw)
                except ValueError:
                    raise UserError(f"{path}:{line}: score {raw!r} is not a number") from None
            elif raw in index:
                label = index[raw]
            else:
                raise UserError(
                    f"{path}:{line}: label {raw!r} is not one of {', '.join(self.labels)}; "
                    f"fix the file or pick the task whose labels these are"
                )
            examples.append(
                Example(
                    column(row, line, text_a),
                    column(row, line, text_b) if text_b else None,
                    label,
                    row.get(self.spec.guid) or str(line),
                )
            )
        return examples

    def compute_metrics(self, predictions: Sequence, labels: Sequence) -> dict[str, float]:
        from st.metrics import compute_metrics  # scikit-learn and scipy take a second; `st tasks` should not wait

        return compute_metrics(self.metrics, predictions, labels)

    def submission_name(self, split: str) -> str:
        """The file name the GLUE server expects for `split` (e.g. "MNLI-m.tsv"); `<task>-<split>.tsv` otherwise."""
        self._check_split(split)
        return dict(self.spec.submissions).get(split, f"{self.name}-{split}.tsv")

    def write_predictions(self, split: str, examples: Sequence[Example], predictions: Sequence, path: Path) -> None:
        """GLUE submission format: `index<TAB>prediction`, label strings, or STS-B scores clipped to [0, 5]."""
        self._check_split(split)
        if len(examples) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("index\tprediction\n")
            for example, p in zip(examples, predictions):
                value = self.labels[int(p)] if self.labels else f"{min(max(float(p), 0.0), 5.0):.3f}"
                f.write(f"{example.guid}\t{value}\n")

    def _check_split(self, split: str) -> None:
        if split not in self.spec.splits:
            raise UserError(f"task {self.name} has no split {split!r}; choose one of: {', '.join(self.spec.splits)}")

    def _path(self, split: str) -> Path:
        self._check_split(split)
        if self.data_dir is None:
            raise UserError(
                f"no data folder for task {self.name}: pass --data-dir or set GLUE_DIR "
                f"(the folder holding {self.spec.folder}/)"
            )
        name = dict(self.spec.files)[split]
        # --data-dir may be the task's folder or the GLUE root that holds it ($GLUE_DIR, with RTE/, SST-2/, ...).
        candidates = [
            Path(os.path.normpath(base / sub / name))
            for base in (self.data_dir, self.data_dir / self.spec.folder)
            for sub in self.spec.subdirs
        ]
        for path in candidates:
            if path.is_file():
                return path
        root = candidates[len(self.spec.subdirs)]
        raise UserError(
            f"{self.name} {split} file not found: expected {candidates[0]} (--data-dir as the {self.spec.folder} "
            f"folder) or {root} (as the GLUE root); download the official {self.spec.folder} data there or "
            "pass --data-dir"
        )


def _tsv_rows(path: Path, header: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(1-based line, {column: value}) per row. QUOTE_NONE because GLUE text has unbalanced quotes;
    utf-8-sig because MRPC's header (copied from msr_paraphrase_train.txt) may start with a BOM."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            names = list(header) or next(reader, [])
            for row in reader:
                if not row:  # a blank line, e.g. a trailing one
                    continue
                if len(row) != len(names):
                    raise UserError(
                        f"{path}:{reader.line_num}: {len(row)} tab-separated columns, expected "
                        f"{len(names)} ({', '.join(names)}); fix or re-download the file"
                    )
                yield reader.line_num, dict(zip(names, row))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: unreadable row ({e}); fix or re-download the file") from None
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path}:{_first_non_utf8_line(path)}: not UTF-8 text ({e.reason}); re-download the file "
                "or save it as UTF-8"
            ) from None


def _first_non_utf8_line(path: Path) -> int:
    """The decoder reads in blocks, so its position does not name the line: find it."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line
    return 0


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if text.strip():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    row = e
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{line}: not a JSON object ({str(row)[:80]}); fix or re-download the file")
                yield line, row


for _spec in SPECS:
    register_task(_spec.name)(functools.partial(GlueTask, _spec))
