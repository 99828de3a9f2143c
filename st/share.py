"""Multi-task learning with ticket sharing (Liang et al. 2021, Algorithm 1) on the MT-DNN model of
`st.multitask`.

An epoch uses every batch of every task once: each task's batches are listed, tagged with the task,
and the list is shuffled with the seed, so a task is sampled in proportion to its training-set size.
One optimizer and one warm-up/decay schedule over all steps; the epoch loop is `st.train.fit`.

Ticket sharing: task t has a ticket M_t (head_mask L×H0, ffn_mask L). A batch of task t runs
forward through M_t and updates only θ ⊙ M_t:
  - a weight chosen by no task is removed physically: the shared encoder is pruned to the union of
    the tickets (`MultiTask`);
  - "only" is exact: after a task-t step every parameter element outside M_t is bit-identical,
    its optimizer state (exp_avg, exp_inf / exp_avg_sq, ...) too. Masking the gradient is not
    enough (momentum and weight decay move weights whose gradient is zero), so the update is
    masked: parameters wholly outside M_t lose their gradient (the optimizer skips them), and
    those partly inside are snapshotted before `optimizer.step()` and their outside elements
    restored after it with `torch.where`.

What belongs to M_t (element level):
  - head h of layer l, where M_t keeps it: its Dh rows in each of the Q, K and V blocks of the
    fused `attention.qkv` (weight rows and bias entries) and its Dh input columns of
    `attention.out.weight`;
  - FFN block l, where M_t keeps it: `ffn.up` (weight, bias) and `ffn.down` (weight AND bias: ν
    multiplies the whole FFN output, down's bias included);
  - shared by every task, so updated by every step: embeddings, LayerNorms, `attention.out.bias`
    (a masked head's output projection still adds it), the pooler;
  - task t's head; the other tasks' heads are never touched by a task-t step.
Per-tensor scalars of the optimizer (Adam's `step` counter) cannot be split by element: they
count the steps that touched the tensor. Gradient clipping uses the norm of task t's gradient.
Without tickets (`--no-tickets`) every task's mask is all ones: plain MT-DNN.

`run_share` writes a multi-task folder (`st.multitask`) as a run folder (`st.runs`): resumable like
`st finetune`, with metrics.json (per-task dev metrics, average, weights remaining) and report.md.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from st import dist
from st.data import EncodedSet, steps_per_epoch, train_batches
from st.errors import UserError
from st.models.bert import Bert
from st.multitask import MultiTask, MultiTaskModel, union_masks
from st.pipeline import RunInputs, build_tokenizer, head_dropout, load_labelled, model_dir, prepare_inputs, pretrained_encoder, resolve_defaults
from st.prune import prune_encoder
from st.report import multitask_markdown
from st.runs import RunFolder
from st.specs import RunSpec, TrainConfig
from st.tickets import Ticket
from st.tokenize import copy_tokenizer
from st.train import Group, OnEpoch, OnStep, TrainingStep, groups, predict_set, train

# An update mask per parameter: True = wholly the task's, False = not at all, or a bool tensor
# that broadcasts to the parameter's shape (element-wise).
UpdateMask = bool | Tensor


def update_masks(model: MultiTaskModel, task: int, ticket: Ticket) -> list[tuple[str, UpdateMask]]:
    """Which elements of each parameter of `model` a step of task `task` (with `ticket`) may change.

    See the module docstring for what belongs to a head or an FFN block. Heads are located by their
    original index in each layer's kept heads, so this is right for the union-pruned encoder.
    """
    c = model.encoder.config
    heads, ffn = ticket.head_mask, ticket.ffn_mask
    masks = []
    for name, p in model.named_parameters():
        mask: UpdateMask = True
        if name.startswith("heads."):
            mask = int(name.split(".")[1]) == task
        elif name.startswith("encoder.layers."):
            _, _, layer, rest = name.split(".", 3)
            i = int(layer)
            if rest.startswith("ffn."):
                mask = bool(ffn[i])
            elif rest.startswith("attention.qkv.") or rest == "attention.out.weight":
                keep = torch.tensor([bool(heads[i][h]) for h in c.layer_heads(i)]).repeat_interleave(c.head_dim)  # H·Dh
                if not keep.all():
                    if rest == "attention.out.weight":
                        mask = keep[None, :]  # 1, H·Dh: input columns of the kept heads
                    else:
                        rows = keep.repeat(3)  # 3·H·Dh: the same heads in the Q, K and V blocks
                        mask = rows[:, None] if rest.endswith("weight") else rows
        masks.append((name, mask.to(p.device) if isinstance(mask, Tensor) else mask))
    return masks


def masked_step(optimizer: torch.optim.Optimizer, params: Sequence[tuple[nn.Parameter, UpdateMask]],
                step: Callable[[], object] | None = None) -> None:
    """`optimizer.step()` that changes only the elements inside each parameter's update mask.

    Wholly outside: the gradient is dropped, so the optimizer skips the tensor (no weight decay, no
    momentum, state untouched). Partly inside: the outside elements of the parameter and of every
    optimizer state tensor shaped like it are restored after the step (state created by this
    step is restored to zeros, the value optimizers start from).
    """
    saved = []
    for p, mask in params:
        if mask is False:
            p.grad = None
        elif mask is not True and p.grad is not None:
            state = {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
            saved.append((p, mask, p.detach().clone(), state))
    (step or optimizer.step)()
    with torch.no_grad():
        for p, mask, old, old_state in saved:
            p.copy_(torch.where(mask, p, old))
            for k, v in optimizer.state[p].items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.copy_(torch.where(mask, v, old_state[k] if k in old_state else torch.zeros_like(v)))



class MaskedUpdate:
    """What a step of one task may change (`st.train.Update`): the elements inside each parameter's
    update mask. Its gradient is dropped (wholly outside) or zeroed (partly) before clipping, so the
    clip norm is task t's own; the optimizer step itself is `masked_step`."""

    def __init__(self, params: Sequence[tuple[nn.Parameter, UpdateMask]]):
        self.params = list(params)

    @torch.no_grad()
    def mask_gradients(self) -> list[nn.Parameter]:
        for p, mask in self.params:
            if p.grad is None:
                continue
            if mask is False:
                p.grad = None
            elif mask is not True:
                p.grad.masked_fill_(~mask, 0)  # zero already in exact arithmetic; keeps the clip norm task t's own
        return [p for p, _ in self.params if p.grad is not None]

    def apply(self, optimizer: torch.optim.Optimizer, optimizer_step: Callable[[], object]) -> None:
        masked_step(optimizer, self.params, optimizer_step)


def epoch_plan(num_batches: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The task of each step of one epoch: task t appears num_batches[t] times, in a seeded shuffle.

    Every batch of every task is used once, and at any point a task is drawn in proportion to its
    training-set size (MT-DNN). Depends on (seed, epoch) only, so a resumed run sees the same order.
    """
    plan = [t for t, n in enumerate(num_batches) for _ in range(n)]
    random.Random(f"share:{seed}:{epoch}").shuffle(plan)  # str seeds are hashed with sha512: stable
    return plan

# ---- ticket sharing -------------------------------------------------------------------------------


class TicketSharer(MultiTask):
    """The multi-task model trained by Algorithm 1: `TicketSharer.create(encoder, tasks, tickets)` from
    a pre-trained encoder (tickets None: MT-DNN), `.step(...)` one masked step, `.train(...)` the
    epochs, `.evaluate(...)`; saving, loading and per-task views come from `MultiTask`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._updates: dict[tuple[int, str], MaskedUpdate] = {}

    @classmethod
    def create(cls, encoder: Bert, tasks: Sequence, tickets: Sequence[Ticket] | None = None, *,
               head_dropouts: Sequence[float] | None = None, pooler: Mapping[str, Tensor] | None = None,
               seed: int = 0) -> "TicketSharer":
        """The multi-task model on a full pre-trained `encoder`: pruned to the union of `tickets`
        (one per task, in task order; None = all ones), a pooler (pre-trained if given) and one
        task head per task, initialised from `seed`."""
        config = encoder.config
        if config.kept_heads is not None or config.ffn_sizes is not None:
            raise UserError("the encoder is physically pruned already; start ticket sharing from the full pre-trained model")
        names = [t.name for t in tasks]
        if tickets is None:
            tickets = [Ticket.full(config)] * len(tasks)  # plain MT-DNN
        if len(tickets) != len(tasks):
            raise UserError(f"{len(tickets)} tickets for {len(tasks)} tasks; give one ticket per task")
        for ticket in tickets:
            ticket.check_matches(config)
        head_mask, ffn_mask = union_masks(tickets)
        union = prune_encoder(encoder, head_mask, ffn_mask)
        dropouts = list(head_dropouts) if head_dropouts is not None else [t.head_dropout for t in tasks]
        torch.manual_seed(seed)  # the same seed gives the same heads, with or without tickets
        model = MultiTaskModel(union, [(t.num_labels, p) for t, p in zip(tasks, dropouts)])
        if pooler is not None:  # BERT's pre-trained pooler; MiniLM-style checkpoints may lack one
            model.pooler.load_state_dict(pooler)
        return cls(model, names, tickets, dict(zip(names, tasks)))

    def update(self, name: str) -> "MaskedUpdate":
        """Algorithm 1's update for a step of task `name`, made once per task and device."""
        index = self.index(name)
        key = (index, str(next(self.model.parameters()).device))
        if key not in self._updates:
            params = dict(self.model.named_parameters())
            self._updates[key] = MaskedUpdate([(params[n], m) for n, m in update_masks(self.model, index, self.tickets[index])])
        return self._updates[key]

    def group(self, name: str, batches: Sequence[Mapping[str, Tensor]]) -> Group:
        """One optimizer step of task `name` for `st.train.TrainingStep`: its batches go forward through
        its ticket and head, and the update changes only θ ⊙ M_t (and its head)."""
        view = self.view(name)
        return Group(list(batches), f"a step of task {name}", lambda module, batch: view(**batch, through=module), self.update(name))

    def step(self, name: str, batch: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> float:
        """One step of Algorithm 1 on a batch of task `name`, outside the epoch loop: the same
        `TrainingStep` that `train` takes. Returns the loss."""
        device = next(self.model.parameters()).device
        return TrainingStep(self.model, optimizer, cfg, device, find_unused=True)(self.group(name, [batch]))

    def evaluate(self, dev: Mapping[str, EncodedSet], pad_id: int, precision: str = "fp32") -> dict[str, dict[str, float]]:
        """{task: dev metrics}, each task through its own ticket and head."""
        results = {}
        for name, data in dev.items():
            if name not in self.tasks:
                raise UserError(f"no task object for {name!r}: pass tasks to TicketSharer to compute metrics")
            device = next(self.model.parameters()).device
            predictions = predict_set(self.view(name), data, pad_id, device=device, precision=precision)
            results[name] = self.tasks[name].compute_metrics(predictions, data.labels)
        return results

    def average(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        """The mean over tasks of each task's main metric. An undefined metric (NaN or None: a
        correlation of constant predictions, e.g. STS-B's Pearson early on) counts as 0, no
        correlation, so one such task neither poisons the average nor the choice of epoch."""
        return sum(_or_zero(metrics[n][self.tasks[n].main_metric]) for n in metrics) / len(metrics)


def run_share(specs: Sequence[RunSpec], tickets: Mapping[str, Ticket] | None, out: str | Path, *, device: str = "cpu",
              on_step: OnStep | None = None, on_epoch: OnEpoch | None = None) -> dict:
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
    shared = lambda s: {"model": s.model.name, "max_length": s.data.max_length, "dropout": s.model.dropout,  # noqa: E731
                        "train": s.train, "seed": s.seed, "held_out": s.held_out}
    expected = shared(base)
    for spec in specs:
        for key, value in shared(spec).items():
            if value != expected[key]:
                raise UserError(f"task {spec.data.task} has {key}={value!r} but {base.data.task} has {expected[key]!r}; "
                                "a multi-task model shares them")
        if spec.model.ticket is not None or spec.model.init:
            raise UserError(f"task {spec.data.task}: pass tickets to ticket sharing itself, not as the run's ticket/init")
    if tickets is not None:
        missing = [n for n in names if n not in tickets]
        if missing:
            raise UserError(f"task {missing[0]} has no ticket; pass --tickets {missing[0]}=PATH (or --no-tickets for plain MT-DNN)")
    settings = {"tasks": {s.data.task: s.settings() for s in specs},
                "tickets": None if tickets is None else {n: tickets[n].to_json() for n in names}}
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
    learner = SharedTraining(sharer, {i.task.name: i for i in inputs}, base.train, base.seed, tokenizer.pad_id,
                             torch.device(device), {"model": base.model.name, "jobs": settings["tasks"]})

    def finish(fitted: dict) -> tuple[dict, dict]:
        best, precision = fitted["best"], base.train.precision
        score = lambda name, data: sharer.evaluate({name: data}, tokenizer.pad_id, precision)[name]  # noqa: E731
        report = {i.task.name: score(i.task.name, i.report) for i in inputs if i.report is not None}
        extra = {name: {split: score(name, data) for split, data in splits.items()} for name, splits in extra_dev.items() if splits}
        all_ones = all(t.heads_pruned == 0 and t.ffn_pruned == 0 for t in sharer.tickets)  # = MT-DNN
        result = {"tasks": names, "tickets": "none" if all_ones else "shared",
                  "main_metric": {n: sharer.tasks[n].main_metric for n in names},
                  "best_epoch": best["epoch"], "dev": best["dev"], "average": best["average"],
                  "dev_split": {t.name: t.dev_splits[0] for t in tasks}, "extra_dev": extra,
                  **({"report": report, "report_split": report_name(base)} if report else {}),
                  "percent_remaining": sharer.percent_remaining(), "parameters": sharer.parameter_counts(),
                  "task_tickets": sharer.ticket_stats(), "epochs": fitted["history"]}
        result = _json_safe(result)  # NaN metrics -> null: metrics.json stays strict JSON, equal to the result
        return result, {"report.md": multitask_markdown(result)}

    shown = lambda r: {**{f"{n}.{sharer.tasks[n].main_metric}": m[sharer.tasks[n].main_metric] for n, m in r["dev"].items()},  # noqa: E731
                       "average": r["average"]}
    return train(learner, run, base.train, seed=base.seed, device=torch.device(device), finish=finish,
                 on_step=on_step, on_epoch=on_epoch, shown=shown)


def report_name(spec: RunSpec) -> str:
    """What the report part is called in a multi-task report: the --report-split, or dev's held-out part."""
    return spec.held_out.report_split or "dev (report part)"


class SharedTraining:
    """Algorithm 1's epochs for `st.train.train`: every batch of every task once, each optimizer step
    one task's group of --grad-accum batches, the groups in a seeded order (`epoch_plan`)."""

    find_unused = True  # a step uses one task's head only

    def __init__(self, sharer: TicketSharer, inputs: Mapping[str, RunInputs], cfg: TrainConfig, seed: int, pad_id: int,
                 device: torch.device, meta: dict):
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
        per_task = [groups(train_batches(self.inputs[n].train, cfg.batch_size, self.seed, epoch, self.pad_id), cfg.grad_accum)
                    for n in names]
        for t in epoch_plan(self.sizes, self.seed, epoch):
            micro = next(per_task[t])
            self.seen[names[t]] += len(micro)
            yield self.sharer.group(names[t], micro)

    def evaluate(self) -> dict:
        dev = {n: i.select for n, i in self.inputs.items()}
        metrics = self.sharer.evaluate(dev, self.pad_id, self.cfg.precision)
        return {"dev": metrics, "average": self.sharer.average(metrics), "batches": self.seen,
                "seconds": round(time.perf_counter() - self.started, 2)}

    def score(self, record: dict) -> float:
        return record["average"]

    def save(self, folder: Path) -> None:
        self.sharer.save(folder, **self.meta)

def _or_zero(x) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _json_safe(obj):
    """A copy of `obj` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
