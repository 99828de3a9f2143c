"""A multi-task run (`st share`): one run spec per task, built like `st finetune`'s runs
(`st.pipeline.prepare_inputs`), trained with ticket sharing (`st.share`) by the one epoch loop
(`st.train.train`), into a run folder (`st.runs`): resumable, with metrics.json (per-task dev metrics,
the average, the report part, weights remaining) and report.md.

An epoch uses every batch of every task once: each task's batches are grouped by --grad-accum into
optimizer steps, tagged with the task, and the steps are shuffled with the seed (`epoch_plan`), so a
task is sampled in proportion to its training-set size. One optimizer and one warm-up/decay schedule
over all steps.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from st import dist
from st.data import steps_per_epoch, train_batches
from st.errors import UserError
from st.pipeline import (
    RunInputs,
    build_tokenizer,
    head_dropout,
    load_labelled,
    model_dir,
    prepare_inputs,
    pretrained_encoder,
    resolve_defaults,
)
from st.report_mtl import multitask_markdown
from st.runs import RunFolder
from st.share import TicketSharer, epoch_plan
from st.specs import RunSpec, TrainConfig
from st.tickets import Ticket
from st.tokenize import copy_tokenizer
from st.tracking import Tracking
from st.train import Group, OnEpoch, OnStep, groups, train


def run_share(
    specs: Sequence[RunSpec],
    tickets: Mapping[str, Ticket] | None,
    out: str | Path,
    *,
    device: str = "cpu",
    on_step: OnStep | None = None,
    on_epoch: OnEpoch | None = None,
    tracking: Tracking | None = None,
) -> dict:
    """Multi-task training of one run spec per task (model, max length, dropout, training settings and
    seed must agree) with ticket sharing, or plain MT-DNN when `tickets` is None. A finished run is
    returned as it is, an interrupted one resumed. Each task's data and held-out sets are built as for
    `st finetune` (`st.pipeline.prepare_inputs`): --dev-size, --select-fraction and --report-split
    mean the same."""
    specs = [resolve_defaults(s) for s in specs]
    if not specs:
        raise UserError("no tasks given; pass --tasks")
    names = [s.data.task for s in specs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise UserError(f"task {twice} is listed twice in --tasks; list each task once")
    base = specs[0]

    def shared(s):
        return {
            "model": s.model.name,
            "max_length": s.data.max_length,
            "dropout": s.model.dropout,
            "train": s.train,
            "seed": s.seed,
            "held_out": s.held_out,
        }

    expected = shared(base)
    for spec in specs:
        for key, value in shared(spec).items():
            if value != expected[key]:
                raise UserError(
                    f"task {spec.data.task} has {key}={value!r} but {base.data.task} has {expected[key]!r}; "
                    "a multi-task model shares them"
                )
        if spec.model.ticket is not None or spec.model.init:
            raise UserError(
                f"task {spec.data.task}: pass tickets to ticket sharing itself, not as the run's ticket/init"
            )
    if tickets is not None:
        missing = [n for n in names if n not in tickets]
        if missing:
            raise UserError(
                f"task {missing[0]} has no ticket; pass --tickets {missing[0]}=PATH (or --no-tickets for plain MT-DNN)"
            )
    settings = {
        "tasks": {s.data.task: s.settings() for s in specs},
        "tickets": None if tickets is None else {n: tickets[n].to_json() for n in names},
    }
    run = RunFolder(out)
    finished = run.check(settings)
    if finished is not None:
        return finished

    tokenizer = build_tokenizer(base)
    encoder, pooler = pretrained_encoder(base.model)
    inputs = [prepare_inputs(s, tokenizer, encoder.config) for s in specs]
    tasks = [i.task for i in inputs]
    # Epochs are chosen on each task's first dev set (or its selection part); the others (MNLI's
    # dev_mismatched) are evaluated with the chosen weights and reported beside it.
    extra_dev = {t.name: {s: load_labelled(t, tokenizer, s) for s in t.dev_splits[1:]} for t in tasks}
    ticket_list = None if tickets is None else [tickets[n] for n in names]
    dropouts = [head_dropout(s.model, t) for s, t in zip(specs, tasks)]
    sharer = TicketSharer.create(encoder, tasks, ticket_list, head_dropouts=dropouts, pooler=pooler, seed=base.seed)
    run.claim(settings)  # every input checked: only now does the folder become this run's
    if dist.is_main():
        copy_tokenizer(model_dir(base), out)
    learner = SharedTraining(
        sharer,
        {i.task.name: i for i in inputs},
        base.train,
        base.seed,
        tokenizer.pad_id,
        torch.device(device),
        {"model": base.model.name, "jobs": settings["tasks"]},
    )

    def finish(fitted: dict) -> tuple[dict, dict]:
        best, precision = fitted["best"], base.train.precision

        def score(name, data):
            return sharer.evaluate({name: data}, tokenizer.pad_id, precision)[name]

        report = {i.task.name: score(i.task.name, i.report) for i in inputs if i.report is not None}
        extra = {
            name: {split: score(name, data) for split, data in splits.items()}
            for name, splits in extra_dev.items()
            if splits
        }
        all_ones = all(t.heads_pruned == 0 and t.ffn_pruned == 0 for t in sharer.tickets)  # = MT-DNN
        result = {
            "tasks": names,
            "tickets": "none" if all_ones else "shared",
            "main_metric": {n: sharer.tasks[n].main_metric for n in names},
            "best_epoch": best["epoch"],
            "dev": best["dev"],
            "average": best["average"],
            "dev_split": {t.name: t.dev_splits[0] for t in tasks},
            "extra_dev": extra,
            **({"report": report, "report_split": report_name(base)} if report else {}),
            "percent_remaining": sharer.percent_remaining(),
            "parameters": sharer.parameter_counts(),
            "task_tickets": sharer.ticket_stats(),
            "epochs": fitted["history"],
        }
        result = _json_safe(result)  # NaN metrics -> null: metrics.json stays strict JSON, equal to the result
        return result, {"report.md": multitask_markdown(result)}

    def shown(r):
        return {
            **{f"{n}.{sharer.tasks[n].main_metric}": m[sharer.tasks[n].main_metric] for n, m in r["dev"].items()},
            "average": r["average"],
        }

    return train(
        learner,
        run,
        base.train,
        seed=base.seed,
        device=torch.device(device),
        finish=finish,
        on_step=on_step,
        on_epoch=on_epoch,
        shown=shown,
        tracking=tracking,
    )


def report_name(spec: RunSpec) -> str:
    """What the report part is called in a multi-task report: the --report-split, or dev's held-out part."""
    return spec.held_out.report_split or "dev (report part)"


class SharedTraining:
    """Algorithm 1's epochs for `st.train.train`: every batch of every task once, each optimizer step
    one task's group of --grad-accum batches, the groups in a seeded order (`epoch_plan`)."""

    find_unused = True  # a step uses one task's head only

    def __init__(
        self,
        sharer: TicketSharer,
        inputs: Mapping[str, RunInputs],
        cfg: TrainConfig,
        seed: int,
        pad_id: int,
        device: torch.device,
        meta: dict,
    ):
        self.sharer, self.model, self.inputs, self.cfg = sharer, sharer.model, inputs, cfg
        self.seed, self.pad_id, self.device, self.meta = seed, pad_id, device, meta
        batches = [steps_per_epoch(inputs[n].train, cfg.batch_size) for n in sharer.names]
        empty = [n for n, b in zip(sharer.names, batches) if b == 0]
        if empty:
            raise UserError(f"task {empty[0]} has too few training examples for one batch")
        self.sizes = [math.ceil(b / cfg.grad_accum) for b in batches]  # optimizer steps per epoch, per task
        self.steps = sum(self.sizes)
        self.sharer._updates.clear()
        self.seen: dict[str, int] = {}
        self.started = 0.0

    def groups(self, epoch: int) -> Iterator[Group]:
        names, cfg = self.sharer.names, self.cfg
        self.seen, self.started = {n: 0 for n in names}, time.perf_counter()
        per_task = [
            groups(train_batches(self.inputs[n].train, cfg.batch_size, self.seed, epoch, self.pad_id), cfg.grad_accum)
            for n in names
        ]
        for t in epoch_plan(self.sizes, self.seed, epoch):
            micro = next(per_task[t])
            self.seen[names[t]] += len(micro)
            yield self.sharer.group(names[t], micro)

    def evaluate(self) -> dict:
        dev = {n: i.select for n, i in self.inputs.items()}
        metrics = self.sharer.evaluate(dev, self.pad_id, self.cfg.precision)
        return {
            "dev": metrics,
            "average": self.sharer.average(metrics),
            "batches": self.seen,
            "seconds": round(time.perf_counter() - self.started, 2),
        }

    def score(self, record: dict) -> float:
        return record["average"]

    def save(self, folder: Path) -> None:
        self.sharer.save(folder, **self.meta)


def _json_safe(obj):
    """A copy of `obj` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
