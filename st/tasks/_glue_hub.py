"""GLUE, SNLI and SciTail from the Hugging Face hub's copies (`nyu-mll/glue`, `stanfordnlp/snli`,
`allenai/scitail`), read through `datasets` (`st.tasks._hf`) into the same `Example`s as the official files.

The hub renames what the official files call dev (`validation`, MNLI's `validation_matched`), some
text columns (MNLI's premise/hypothesis, MRPC's sentence1/sentence2) and keeps GLUE's diagnostic set
as its own config (`ax`). Labels are `ClassLabel` indices: each is mapped by its name to the task's
label strings (MNLI's hub order differs from HF run_glue's), or, for GLUE's 0/1 tasks whose names are
words (SST-2's negative/positive), by its index, so both sources train the same head and a
submission file holds the strings the GLUE server expects. Label -1 marks a test split's unlabelled
rows (SNLI's train/dev/test use it for pairs without a gold label, which are dropped, as the
official files' "-"). The guid is the dataset's `idx` (the index GLUE submissions are matched by).
"""

from __future__ import annotations

from pathlib import Path

from st.errors import UserError
from st.tasks import Example
from st.tasks._hf import check_columns, class_name, class_names, column_values, locate, text_values

GLUE = "nyu-mll/glue"
PREMISE = ("premise", "hypothesis")
# (repo, config, text columns) where they differ from (nyu-mll/glue, the task's name, the official columns)
HUB = {
    "mrpc": (GLUE, "mrpc", ("sentence1", "sentence2")),
    "mnli": (GLUE, "mnli", PREMISE),
    "snli": ("stanfordnlp/snli", "plain_text", PREMISE),
    "scitail": ("allenai/scitail", "tsv_format", PREMISE),
}
BINARY = ("0", "1")


def hub_repo(name: str) -> tuple[str, str]:
    """(repo, config) of a task's hub copy."""
    repo, config, _ = HUB.get(name, (GLUE, name, None))
    return repo, config


def hub_config(name: str) -> str:
    return hub_repo(name)[1]


def hub_split(split: str) -> tuple[str | None, str]:
    """(config, or None for the task's own; the hub's split name) of an official split name."""
    if split == "ax":
        return "ax", "test"  # GLUE's diagnostic set, scored with the MNLI model
    return None, split.replace("dev", "validation")


AX = "GLUE's diagnostic set is the hub's ax config: add it, or evaluate --split test_matched"


def hub_examples(spec, split: str, data_dir: Path | None, dataset: str | None) -> list[Example]:
    """The `split` (an official split name) of the task whose `st.tasks.glue.Spec` is `spec` (glue.py
    imports this module, so the type is not named here), from `--data-dir` or `--dataset`."""
    config, name = hub_split(split)
    ax = config == "ax"
    text = PREMISE if ax else HUB.get(spec.name, (None, None, spec.text))[2]
    try:
        # ax is its own config even where the hub id names mnli's (nyu-mll/glue:mnli)
        source = locate(data_dir, dataset, config or hub_config(spec.name), split_config=ax)
        missing = ax and name not in source.split_names()  # --data-dir the mnli/ folder itself
    except UserError as e:
        if not ax:
            raise
        raise UserError(f"{e}; {AX}") from None
    if missing:
        raise UserError(f"{source.where} holds no ax split (its splits: {', '.join(source.split_names())}); {AX}")
    ds = source.load(name)
    where = f"{source.where} ({name})"
    needed = [c for c in text if c] + ["label"]
    check_columns(ds, needed, where, {})
    index = {label: i for i, label in enumerate(spec.labels)}
    names = class_names(ds, "label")
    test = split.startswith("test") or ax
    fix = f"fix the row, or check this is the {spec.name} dataset"
    texts = [text_values(ds, c, where, fix) if c else None for c in text]
    guids = column_values(ds, "idx") if "idx" in ds.column_names else range(len(ds))
    examples = []
    for i, (raw, guid) in enumerate(zip(column_values(ds, "label"), guids)):
        label = _label(spec, raw, names, index, test, f"{where}, row {i}")
        if label is _SKIP:
            continue
        examples.append(Example(texts[0][i], texts[1][i] if texts[1] else None, label, str(guid)))
    return examples


_SKIP = object()  # a row without a gold label, dropped


def _label(spec, raw, names, index: dict[str, int], test: bool, where: str):
    if not spec.labels:  # STS-B: a score; the hub marks unlabelled test rows with -1
        return None if test and raw == -1 else float(raw)
    if raw is None or raw == -1 or raw in spec.skip_labels:
        if spec.skip_labels:
            return _SKIP
        if test:
            return None
        raise UserError(f"{where}: no label ({raw!r}) in a labelled split; is this the {spec.name} dataset?")
    if isinstance(raw, str):  # SciTail's tsv_format keeps its labels as strings
        name = raw
    elif names is not None and all(n in index for n in names):
        name = class_name(names, raw, where, "label")
    elif spec.labels == BINARY:
        name = str(raw)
    else:
        name = class_name(names, raw, where, "label") if names else str(raw)
    if name not in index:
        raise UserError(
            f"{where}: label {name!r} is not one of {', '.join(spec.labels)}; is this the {spec.name} dataset?"
        )
    return index[name]
