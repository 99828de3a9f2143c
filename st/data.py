"""Examples → token ids once, then batches padded to their own longest row."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from st import dist
from st.tasks import Example
from st.tokenize import Tokenizer, collate


@dataclass
class EncodedSet:
    """A task split after tokenisation: unpadded (ids, types) rows and labels (None when unlabelled)."""

    rows: list[tuple[list[int], list[int]]]
    labels: list[float] | list[int] | None
    regression: bool

    def __len__(self) -> int:
        return len(self.rows)


def encode_examples(tokenizer: Tokenizer, examples: Sequence[Example], regression: bool) -> EncodedSet:
    pairs = any(e.text_b is not None for e in examples)
    rows = tokenizer.encode_unpadded(
        [e.text_a for e in examples], [e.text_b or "" for e in examples] if pairs else None
    )
    labelled = all(e.label is not None for e in examples)
    return EncodedSet(rows, [e.label for e in examples] if labelled else None, regression)


def make_batch(data: EncodedSet, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate([data.rows[i] for i in indices], pad_id)
    if data.labels is not None:
        dtype = torch.float32 if data.regression else torch.long
        batch["labels"] = torch.tensor([data.labels[i] for i in indices], dtype=dtype)
    return batch


def train_batches(data: EncodedSet, batch_size: int, seed: int, epoch: int, pad_id: int) -> Iterator[dict]:
    """One epoch of shuffled batches of `batch_size` examples in all; under DDP each rank takes its
    slice of every batch, so N processes make the same updates as one (up to summation order).

    The shuffle depends on (seed, epoch) only, so a resumed run sees the same order and every rank
    shuffles identically. A last batch too small to give every rank a row is dropped: a rank with
    nothing to do would leave the others waiting on its all-reduce.
    """
    order = list(range(len(data)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    world, rank = dist.world_size(), dist.rank()
    for start in range(0, len(order) - world + 1, batch_size):
        yield make_batch(data, order[start : start + batch_size][rank::world], pad_id)


def steps_per_epoch(data: EncodedSet, batch_size: int) -> int:
    return len(range(0, len(data) - dist.world_size() + 1, batch_size))


def eval_shards(data: EncodedSet, batch_size: int, pad_id: int) -> Iterator[tuple[list[int], dict]]:
    """This rank's share of an evaluation set in (indices, batch) pairs; gather predictions by index."""
    mine = list(range(dist.rank(), len(data), dist.world_size()))
    for i in range(0, len(mine), batch_size):
        indices = mine[i : i + batch_size]
        yield indices, make_batch(data, indices, pad_id)
