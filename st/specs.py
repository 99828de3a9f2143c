"""What defines a run, as small frozen specs passed explicitly: the data, the model (with an optional
ticket), the training schedule, the run's seed and, for `st sweep`, the held-out dev split.

Only what determines a run's result is here; where it runs (the device, the evaluation batch size)
is an argument of the functions that run it, so a run may resume on another machine. A ticket is
part of the run by its content (its masks), not by the path it was read from: a moved folder still
resumes, and an edited ticket file is a different run.

`RunSpec.settings()` is what run.json and a checkpoint's config.json record, and `RunSpec.from_settings`
reads it back; both follow one table (`SETTINGS`) and keep the flat layout those files have always had,
so earlier run folders still resume and earlier checkpoints still load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
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
    task_options: tuple[tuple[str, str], ...] = ()  # e.g. (("text_columns", "a,b"),), (("dataset", "nyu-mll/glue"),)
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
    files: str | None = None  # and one of config.json and the tokenizer files (`pipeline.files_digest`)


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
    precision: str = "fp32"  # fp32 | bf16 | fp16: the compute dtype, with fp32 master weights (st.precision)


@dataclass(frozen=True)
class HeldOut:
    """Honest model selection (`st sweep`): a seeded sample of `dev_size` dev examples (None: all) is
    split with the run's seed into a selection part (`select_fraction` of it), which chooses the
    epoch, and a report part, evaluated once on the chosen weights. With `report_split` (e.g. "test",
    labelled), the whole dev sample chooses and that split is the report part (select_fraction None)."""

    select_fraction: float | None = 0.5
    dev_size: int | None = None
    report_split: str | None = None

    def __post_init__(self):  # checked here, so that every command that takes them says the same
        if self.select_fraction is not None and not 0 < self.select_fraction < 1:
            raise UserError(f"--select-fraction must be in (0, 1), got {self.select_fraction}")
        if self.select_fraction is not None and self.report_split:
            raise UserError(
                "--select-fraction splits dev into a choosing and a reporting part, --report-split reports "
                "on another split: give one of them, not both"
            )


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
        """What identifies the run's result, in run.json's layout (`SETTINGS`)."""
        parts = {"data": self.data, "model": self.model}
        s = {key: getattr(parts[part], name) for key, part, name in SETTINGS}
        s["task_options"] = dict(self.data.task_options)
        s["ticket"] = None if self.model.ticket is None else self.model.ticket.to_json()
        s["train"] = {f.name: getattr(self.train, f.name) for f in fields(TrainConfig)} | {"seed": self.seed}
        held = self.held_out or HeldOut(None, None, None)
        s.update(dev_size=held.dev_size, select_fraction=held.select_fraction)
        if held.report_split:  # only when set: run.json of runs that report on a part of dev keeps its layout
            s["report_split"] = held.report_split
        return s

    @classmethod
    def from_settings(cls, s: dict) -> RunSpec:
        """The spec whose `settings()` are `s` (run.json, or a checkpoint's "job"); a key that a release
        did not write takes the field's default. The ticket is left out: a checkpoint's weights are its
        ticket's subnetwork already."""
        parts: dict[str, dict] = {"data": {}, "model": {}}
        for key, part, name in SETTINGS:
            if key in s and name != "ticket":
                parts[part][name] = s[key]
        parts["data"]["task_options"] = tuple((s.get("task_options") or {}).items())
        train = {f.name: s["train"][f.name] for f in fields(TrainConfig) if f.name in s["train"]}
        held = HeldOut(**{f.name: s.get(f.name) for f in fields(HeldOut)})
        held = None if held == HeldOut(None, None, None) else held
        seed = s["train"].get("seed", cls.seed)
        return cls(DataSpec(**parts["data"]), ModelSpec(**parts["model"]), TrainConfig(**train), seed, held)


# run.json's flat layout, as it has always been: (key, part of the spec, field); `train` nests
# TrainConfig's fields and the seed, and the held-out split's fields follow at the top level.
SETTINGS = (
    ("task", "data", "task"),
    ("model", "model", "name"),
    ("data_dir", "data", "data_dir"),
    ("task_options", "data", "task_options"),
    ("train_size", "data", "train_size"),
    ("train_fraction", "data", "train_fraction"),
    ("max_length", "data", "max_length"),
    ("dropout", "model", "dropout"),
    ("head_dropout", "model", "head_dropout"),
    ("ticket", "model", "ticket"),
    ("init", "model", "init"),
    ("model_weights", "model", "weights"),
    ("model_files", "model", "files"),
)


def run_spec(
    task: str,
    *,
    model: str | None = None,
    data_dir: str | None = None,
    dataset: str | None = None,
    text_columns: str | None = None,
    label_column: str | None = None,
    labels: str | None = None,
    regression: bool | None = None,
    train_size: int | None = None,
    train_fraction: float | None = None,
    max_length: int | None = None,
    dropout: float | None = None,
    head_dropout: float | None = None,
    ticket: Ticket | None = None,
    init: str | None = None,
    seed: int | None = None,
    report_split: str | None = None,
    select_fraction: float | None = None,
    dev_size: int | None = None,
    **train,
) -> RunSpec:
    """A run from option values (`st finetune`'s options); None, an option not given, takes the default.
    `train`: TrainConfig's fields. text_columns ... regression are the csv/jsonl/hf tasks' options; `dataset`
    (HUB_ID[:CONFIG]) is a Hugging Face dataset in place of --data-dir."""
    numbers = {"train_fraction": train_fraction, "dropout": dropout, "head_dropout": head_dropout, **train}
    for name, value in numbers.items():
        if isinstance(value, float) and not math.isfinite(value):  # inf and nan pass click's range checks
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if train_fraction is not None and not 0 < train_fraction <= 1:
        raise UserError(f"--train-fraction must be in (0, 1], got {train_fraction}")

    options = tuple(
        given(
            dataset=dataset, text_columns=text_columns, label_column=label_column, labels=labels, regression=regression
        ).items()
    )

    # Paths are recorded absolute: a run's data and start are the same wherever its command ran from.
    def absolute(path):
        return None if path is None else str(Path(path).expanduser().resolve())

    data = DataSpec(task, absolute(data_dir), options, train_size, train_fraction, max_length)
    model_spec = ModelSpec(
        **given(name=model, dropout=dropout), head_dropout=head_dropout, ticket=ticket, init=absolute(init)
    )
    held_out = HeldOut(select_fraction, dev_size, report_split)
    held_out = None if held_out == HeldOut(None, None, None) else held_out  # all of dev chooses the epoch
    return RunSpec(data, model_spec, TrainConfig(**given(**train)), **given(seed=seed), held_out=held_out)


def given(**values) -> dict:
    """The keyword arguments that were given (not None): the rest take their field's default."""
    return {k: v for k, v in values.items() if v is not None}
