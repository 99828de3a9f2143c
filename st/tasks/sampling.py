"""Few-shot control: a seeded subset of a training set, and a clear error for an empty split.

Not a task (it registers nothing); it lives here because it works on a task's examples.
"""

from __future__ import annotations

import random
from typing import Sequence

from st.errors import UserError
from st.tasks import Example


def subsample(
    examples: Sequence[Example],
    *,
    train_size: int | None = None,
    train_fraction: float | None = None,
    seed: int = 0,
) -> list[Example]:
    """`train_size` examples, or round(train_fraction · n), drawn without replacement with `seed`, in their
    original order; all of them when neither is given. The same seed always draws the same subset."""
    examples = list(examples)
    n = len(examples)
    if train_size is not None and train_fraction is not None:
        raise UserError("pass --train-size or --train-fraction, not both")
    if n == 0:
        raise UserError("the training set is empty; check the train split's data")
    if train_fraction is not None:
        if not 0 < train_fraction <= 1:
            raise UserError(f"--train-fraction must be in (0, 1], got {train_fraction}")
        k = round(train_fraction * n)
        if k == 0:
            raise UserError(
                f"--train-fraction {train_fraction} of {n} training examples keeps none; use at least "
                f"{1 / n:.3g} or --train-size"
            )
    elif train_size is not None:
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise UserError(f"--train-size must be a positive whole number, got {train_size}")
        if train_size > n:
            raise UserError(f"--train-size {train_size} is larger than the training set ({n} examples)")
        k = train_size
    else:
        return examples
    chosen = sorted(random.Random(seed).sample(range(n), k))
    return [examples[i] for i in chosen]


def check_nonempty(examples: Sequence[Example], task, split: str) -> Sequence[Example]:
    """`examples` unchanged, or a UserError when the split has none (`task` is a Task or its name)."""
    if len(examples) == 0:
        name = getattr(task, "name", task)
        raise UserError(
            f"the {split} split of task {name} is empty: check its file in the data dir (rows, and the column options)"
        )
    return examples
