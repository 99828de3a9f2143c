"""What defines a run, as small frozen specs passed explicitly: the data, the model (with an optional
ticket), the training schedule, the run's seed and, for `st sweep`, the held-out dev split.

Only what determines a run's result is here; where it runs (the device, the evaluation batch size)
is an argument of the functions that run it, so a run may resume on another machine. A ticket is
part of the run by its content (its masks), not by the path it was read from: a moved folder still
resumes, and an edited ticket file is a different run.

`RunSpec.settings()` is what run.json and a checkpoint's config.json record; it keeps the flat layout
those files have always had, so earlier run folders still resume and earlier checkpoints still load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from st.errors import UserError

if TYPE_CHECKING:  # the spec only carries a ticket; tickets.py builds on the model code, which is below
    from st.tickets import Ticket


DEFAULT_MAX_LENGTH = 128  # tokens per example: the paper used 512; 128 covers most GLUE sentences


@dataclass(frozen=True)
class DataSpec:
    """Which task, where its files are and how much of its training set a run uses."""

    task: str
    data_dir: str | None = None
    task_options: tuple[tuple[str, str], ...] = ()  # e.g. (("text_columns", "a,b"),) for csv tasks
    train_size: int | None = None  # a seeded sample of N training examples
    train_fraction: float | None = None  # or of this fraction of them
    max_length: int | None = None  # None: DEFAULT_MAX_LENGTH, or the model's positions where fewer


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from. `ticket`: rewind to the pre-trained weights and train its
    subnetwork; `init`: continue from a fine-tuned checkpoint or a multi-task (`st share`) folder."""

    name: str = "minilm-l6"  # a folder, an alias or a cached hub id
    dropout: float = 0.1
    head_dropout: float | None = None  # None: the task's own (MNLI 0.2, CoLA 0.05, else 0.1)
    ticket: Ticket | None = None
    init: str | None = None
    weights: str | None = None  # the sha256 of the weights file, filled in when the run is built


@dataclass(frozen=True)
class TrainConfig:
    """The paper's fine-tuning defaults (Liang et al. 2021, following MT-DNN). `lr` None: the paper's
    5e-5 for BERT-base-sized encoders and 2e-4 for smaller ones, chosen when the run is built
    (`pipeline.default_lr`) and recorded resolved."""

    epochs: int = 3
    batch_size: int = 32
    lr: float | None = None
    warmup: float = 0.1  # fraction of all steps with a linear warm-up, then linear decay to 0
    weight_decay: float = 0.0
    clip: float = 1.0
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, CUDA only)


@dataclass(frozen=True)
class HeldOut:
    """Honest model selection (`st sweep`): a seeded sample of `dev_size` dev examples (None: all) is
    split with the run's seed into a selection part (`select_fraction` of it), which chooses the
    epoch, and a report part, evaluated once on the chosen weights. With `report_split` (e.g. "test",
    labelled), the whole dev sample chooses and that split is the report part (select_fraction None)."""

    select_fraction: float | None = 0.5
    dev_size: int | None = None
    report_split: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run. One seed drives the training sample, the task head's initialisation,
    dropout, the batch order and the held-out split."""

    data: DataSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    held_out: HeldOut | None = None  # None: the epoch is chosen on all of dev

    def settings(self) -> dict:
        """What identifies the run's result, in run.json's layout."""
        d, m, t, h = self.data, self.model, self.train, self.held_out
        return {
            "task": d.task, "model": m.name, "data_dir": d.data_dir, "task_options": dict(d.task_options),
            "train_size": d.train_size, "train_fraction": d.train_fraction, "max_length": d.max_length,
            "dropout": m.dropout, "head_dropout": m.head_dropout,
            "ticket": None if m.ticket is None else m.ticket.to_json(), "init": m.init, "model_weights": m.weights,
            "train": {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "warmup": t.warmup,
                      "weight_decay": t.weight_decay, "clip": t.clip, "grad_accum": t.grad_accum, "seed": self.seed,
                      "precision": t.precision},
            "dev_size": None if h is None else h.dev_size, "select_fraction": None if h is None else h.select_fraction,
            # only when set: run.json of runs that report on a part of dev keeps the layout it always had
            **({"report_split": h.report_split} if h is not None and h.report_split else {}),
        }


def run_spec(task: str, *, model: str | None = None, data_dir: str | None = None, text_columns: str | None = None,
             label_column: str | None = None, labels: str | None = None, regression: bool | None = None,
             train_size: int | None = None, train_fraction: float | None = None, max_length: int | None = None,
             dropout: float | None = None, head_dropout: float | None = None, ticket: Ticket | None = None,
             init: str | None = None, seed: int | None = None, report_split: str | None = None, **train) -> RunSpec:
    """A run from option values (`st finetune`'s options); None, an option not given, takes the default.
    `train`: TrainConfig's fields. text_columns ... regression are the csv/jsonl tasks' options."""
    numbers = {"train_fraction": train_fraction, "dropout": dropout, "head_dropout": head_dropout, **train}
    for name, value in numbers.items():
        if isinstance(value, float) and not math.isfinite(value):  # inf and nan pass click's range checks
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if train_fraction is not None and not 0 < train_fraction <= 1:
        raise UserError(f"--train-fraction must be in (0, 1], got {train_fraction}")
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    options = tuple(given(text_columns=text_columns, label_column=label_column, labels=labels, regression=regression).items())
    # Paths are recorded absolute: a run's data and start are the same wherever its command ran from.
    absolute = lambda path: None if path is None else str(Path(path).expanduser().resolve())  # noqa: E731
    data = DataSpec(task, absolute(data_dir), options, train_size, train_fraction, max_length)
    model_spec = ModelSpec(**given(name=model, dropout=dropout), head_dropout=head_dropout, ticket=ticket, init=absolute(init))
    held_out = HeldOut(None, None, report_split) if report_split else None
    return RunSpec(data, model_spec, TrainConfig(**given(**train)), **given(seed=seed), held_out=held_out)
