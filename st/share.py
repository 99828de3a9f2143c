"""Multi-task learning with ticket sharing (Liang et al. 2021, Algorithm 1) on an MT-DNN model.

The model (MT-DNN, Liu et al. 2019): one shared encoder, one shared [CLS] pooler (MT-DNN keeps
BERT's pooler in the shared layers, as its `SANBertNetwork` does), and one task layer per task
(dropout + linear, `TaskHead`). An epoch uses every batch of every task once: each task's batches
are listed, tagged with the task, and the list is shuffled with the seed, so a task is sampled in
proportion to its training-set size. One optimizer and one warm-up/decay schedule over all steps.

Ticket sharing: task t has a ticket M_t (head_mask L×H0, ffn_mask L). A batch of task t runs
forward through M_t and updates only θ ⊙ M_t:
  - a weight chosen by no task is removed physically: the shared encoder is the pre-trained one
    pruned to the UNION of the tickets (masks stay in original-head coordinates, so every task's
    mask still applies to the union model);
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

Output folder of `run_share` (resumable like `st finetune`):
  run.json, model.safetensors (encoder.* = the union encoder, pooler.*, heads.<i>.*),
  tickets/<task>.json, config.json ({"format": "st-multitask", ...}), tokenizer files,
  metrics.json (per-task dev metrics, average, weights remaining), report.md.
`load_task_model(folder, task)` gives one task's `BertClassifier` (encoder pruned to its ticket).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from st import dist
from st.data import EncodedSet, steps_per_epoch, train_batches
from st.errors import UserError
from st.importance import Scores
from st.io import read_json, write_json, write_safetensors, write_text, write_torch
from st.models.bert import Bert, BertConfig, init_weights
from st.models.heads import BertClassifier, Pooler, TaskHead, per_example_loss
from st.models.weights import read_tensors
from st.prune import prune_encoder
from st.tickets import Ticket, make_ticket, percent_remaining
from st.train import TrainConfig, autocast, make_optimizer, make_schedule, predict_set

log = logging.getLogger("st")

FORMAT = "st-multitask"
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
PROGRESS, STATE, WEIGHTS, CONFIG = ".progress", "state.pt", "model.safetensors", "config.json"

# An update mask per parameter: True = wholly the task's, False = not at all, or a bool tensor
# that broadcasts to the parameter's shape (element-wise).
UpdateMask = bool | Tensor


# ---- the model ----------------------------------------------------------------------------------


class MultiTaskModel(nn.Module):
    """Shared encoder and pooler, one task head per task (MT-DNN)."""

    def __init__(self, encoder: Bert, heads: Sequence[tuple[int, float]]):  # (num_labels, dropout) per task
        super().__init__()
        d = encoder.config.hidden_size
        self.encoder = encoder
        self.pooler = Pooler(d)
        self.heads = nn.ModuleList(TaskHead(d, n, p) for n, p in heads)
        for module in (self.pooler, self.heads):
            module.apply(lambda m: init_weights(m, encoder.config.initializer_range))

    def forward(self, task: int, input_ids, token_type_ids=None, attention_mask=None, head_mask=None, ffn_mask=None) -> Tensor:
        hidden = self.encoder(input_ids, token_type_ids, attention_mask, head_mask, ffn_mask)  # B,T,D
        return self.heads[task](self.pooler(hidden))  # B,num_labels


class TaskView(nn.Module):
    """Task t's network inside the multi-task model: its ticket's masks and its head (for `predict_set`)."""

    def __init__(self, model: MultiTaskModel, index: int, head_mask: Tensor | None, ffn_mask: Tensor | None):
        super().__init__()
        self.model, self.index, self.head_mask, self.ffn_mask = model, index, head_mask, ffn_mask

    # A view has no mode of its own: .train()/.eval() reach the shared model, .training reads it.
    @property
    def training(self) -> bool:
        return self.model.training if "model" in self._modules else True

    @training.setter
    def training(self, value: bool) -> None:
        pass

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> Tensor:
        if self.head_mask is not None and self.head_mask.device != input_ids.device:
            self.head_mask = self.head_mask.to(input_ids.device)
        if self.ffn_mask is not None and self.ffn_mask.device != input_ids.device:
            self.ffn_mask = self.ffn_mask.to(input_ids.device)
        return self.model(self.index, input_ids, token_type_ids, attention_mask, self.head_mask, self.ffn_mask)


def union_masks(tickets: Sequence[Ticket]) -> tuple[Tensor, Tensor]:
    """(head_mask L×H0, ffn_mask L): what at least one ticket keeps."""
    heads = torch.stack([t.head_mask_tensor() for t in tickets]).amax(0)
    ffn = torch.stack([t.ffn_mask_tensor() for t in tickets]).amax(0)
    return heads, ffn


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


def epoch_plan(num_batches: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The task of each step of one epoch: task t appears num_batches[t] times, in a seeded shuffle.

    Every batch of every task is used once, and at any point a task is drawn in proportion to its
    training-set size (MT-DNN). Depends on (seed, epoch) only, so a resumed run sees the same order.
    """
    plan = [t for t, n in enumerate(num_batches) for _ in range(n)]
    random.Random(f"share:{seed}:{epoch}").shuffle(plan)  # str seeds are hashed with sha512: stable
    return plan


# ---- ticket sharing -------------------------------------------------------------------------------


class TicketSharer:
    """Tasks, their tickets and the multi-task model whose encoder is pruned to the tickets' union.

    `TicketSharer.create(encoder, tasks, tickets)` from a pre-trained encoder (tickets None: MT-DNN);
    `.train(...)` runs Algorithm 1; `.evaluate(...)`; `.task_model(name)` one task's BertClassifier;
    `.save(folder)` / `TicketSharer.load(folder)`.
    """

    def __init__(self, model: MultiTaskModel, names: Sequence[str], tickets: Sequence[Ticket],
                 tasks: Mapping[str, object] | None = None, labels: Mapping[str, Sequence[str]] | None = None):
        if len(set(names)) != len(names):
            twice = next(n for n in names if list(names).count(n) > 1)
            raise UserError(f"task {twice} is listed twice; list each task once")
        self.model, self.names, self.tickets = model, list(names), list(tickets)
        self.tasks = dict(tasks or {})  # name -> Task, needed for metrics
        if labels is None:
            labels = {n: getattr(self.tasks.get(n), "labels", ()) for n in names}
        self.labels = {n: list(labels.get(n, ())) for n in names}  # label names, written to config.json
        self.dense_config = replace(model.encoder.config, kept_heads=None, ffn_sizes=None)
        self._update_masks: dict[tuple[int, str], list[tuple[nn.Parameter, UpdateMask]]] = {}
        self._views: dict[str, TaskView] = {}

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

    # -- per task --

    def index(self, name: str) -> int:
        if name not in self.names:
            raise UserError(f"task {name!r} is not in this multi-task model; it has {', '.join(self.names)}")
        return self.names.index(name)

    def masks(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """Task `name`'s (head_mask, ffn_mask) forward arguments; None for an all-ones mask (the same
        result, without the multiplications)."""
        ticket = self.tickets[self.index(name)]
        head, ffn = ticket.head_mask_tensor(), ticket.ffn_mask_tensor()
        return (None if bool(head.all()) else head), (None if bool(ffn.all()) else ffn)

    def view(self, name: str) -> TaskView:
        """Task `name`'s network as a module taking a batch (shares the model's weights)."""
        if name not in self._views:
            self._views[name] = TaskView(self.model, self.index(name), *self.masks(name))
        return self._views[name]

    def task_model(self, name: str) -> BertClassifier:
        """Task `name` as a single-task model: the shared encoder pruned further to its ticket (so
        exactly its ticket is kept), the shared pooler and its head; weights copied."""
        i = self.index(name)
        ticket = self.tickets[i]
        encoder = prune_encoder(self.model.encoder, ticket.head_mask_tensor(), ticket.ffn_mask_tensor())
        head = self.model.heads[i]
        reference = next(self.model.parameters())
        model = BertClassifier(encoder, head.out.out_features, head.dropout.p).to(device=reference.device, dtype=reference.dtype)
        model.pooler.load_state_dict(self.model.pooler.state_dict())
        model.classifier.load_state_dict(head.state_dict())
        return model.train(self.model.training)

    # -- weights remaining --

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the union model and of the dense model it came from, counted from tensors."""
        numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        with torch.device("meta"):
            dense = Bert(self.dense_config)
        shared_top = numel(self.model.pooler) + numel(self.model.heads)
        return {"encoder": numel(self.model.encoder), "dense_encoder": numel(dense),
                "model": numel(self.model), "dense_model": numel(dense) + shared_top}

    def percent_remaining(self) -> dict[str, float]:
        n = self.parameter_counts()
        return {"encoder": 100.0 * n["encoder"] / n["dense_encoder"], "model": 100.0 * n["model"] / n["dense_model"]}

    # -- training --

    def _params(self, index: int) -> list[tuple[nn.Parameter, UpdateMask]]:
        """Task `index`'s (parameter, update mask) pairs, made once per task and device."""
        key = (index, str(next(self.model.parameters()).device))
        if key not in self._update_masks:
            params = dict(self.model.named_parameters())
            self._update_masks[key] = [(params[n], m) for n, m in update_masks(self.model, index, self.tickets[index])]
        return self._update_masks[key]

    def step(self, name: str, batch: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, cfg: TrainConfig,
             scaler: torch.amp.GradScaler | None = None) -> float:
        """One step of Algorithm 1 on a batch of task `name`: forward through its ticket, backward,
        clip its gradient, update only θ ⊙ M_t (and its head). Returns the loss."""
        index = self.index(name)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        optimizer.zero_grad(set_to_none=True)
        with autocast(cfg):
            loss = per_example_loss(self.view(name)(**batch).float(), labels).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        params = self._params(index)
        if scaler:
            scaler.unscale_(optimizer)
        with torch.no_grad():
            for p, mask in params:
                if p.grad is None:
                    continue
                if mask is False:
                    p.grad = None
                elif mask is not True:
                    p.grad.masked_fill_(~mask, 0)  # zero already in exact arithmetic; keeps the clip norm task t's own
        _average_gradients([p for p, _ in params if p.grad is not None])
        nn.utils.clip_grad_norm_([p for p, _ in params if p.grad is not None], cfg.clip)
        masked_step(optimizer, params, (lambda: scaler.step(optimizer)) if scaler else None)
        if scaler:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def evaluate(self, dev: Mapping[str, EncodedSet], cfg: TrainConfig, pad_id: int) -> dict[str, dict[str, float]]:
        """{task: dev metrics}, each task through its own ticket and head."""
        results = {}
        for name, data in dev.items():
            if name not in self.tasks:
                raise UserError(f"no task object for {name!r}: pass tasks to TicketSharer to compute metrics")
            predictions = predict_set(self.view(name), data, cfg, pad_id)
            results[name] = self.tasks[name].compute_metrics(predictions, data.labels)
        return results

    def average(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        """The mean over tasks of each task's main metric. An undefined metric (NaN or None: a
        correlation of constant predictions, e.g. STS-B's Pearson early on) counts as 0, no
        correlation, so one such task neither poisons the average nor the choice of epoch."""
        return sum(_or_zero(metrics[n][self.tasks[n].main_metric]) for n in metrics) / len(metrics)

    def train(self, train: Mapping[str, EncodedSet], dev: Mapping[str, EncodedSet], cfg: TrainConfig, pad_id: int, *,
              out: str | Path | None = None, optimizer: Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer] | None = None,
              on_step: Callable[[int, int, float], None] | None = None,
              on_epoch: Callable[[int, dict], None] | None = None, meta: dict | None = None,
              extra_dev: Mapping[str, Mapping[str, EncodedSet]] | None = None,
              dev_split: Mapping[str, str] | None = None) -> dict:
        """Multi-task training (Algorithm 1) for cfg.epochs epochs; the epoch with the best average
        main dev metric is kept (its weights are loaded into the model at the end).

        With `out`, the state after each epoch goes to out/.progress (an interrupted run resumes)
        and the best epoch's model is saved into `out` with metrics.json. `optimizer` builds the
        optimizer from the parameters (default: the paper's Adamax, `make_optimizer`).
        `extra_dev` ({task: {split: data}}): further dev sets (MNLI's dev_mismatched), evaluated once
        with the chosen epoch's weights and reported as result["extra_dev"][task][split]; epochs are
        chosen on `dev` only. `dev_split` ({task: split name of `dev`}) is recorded for the report.
        """
        missing = [n for n in self.names if n not in train or n not in dev]
        if missing:
            raise UserError(f"no training or dev data for task {missing[0]}")
        if cfg.grad_accum != 1:
            raise UserError("gradient accumulation is not supported with ticket sharing (every step is one task's batch); use --grad-accum 1")
        device = torch.device(cfg.device)
        self.model.to(device)
        self._update_masks.clear()
        opt = optimizer(list(self.model.parameters())) if optimizer else make_optimizer(self.model, cfg)
        sizes = [steps_per_epoch(train[n], cfg.batch_size) for n in self.names]
        empty = [n for n, s in zip(self.names, sizes) if s == 0]
        if empty:
            raise UserError(f"task {empty[0]} has too few training examples for one batch")
        total = sum(sizes) * cfg.epochs
        schedule = make_schedule(opt, total, cfg.warmup)
        scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and device.type == "cuda" else None
        history, start = [], 0
        state_path = Path(out) / PROGRESS / STATE if out is not None else None
        if state_path is not None and state_path.exists():
            state = torch.load(state_path, map_location=device, weights_only=True)
            self.model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            torch.set_rng_state(state["rng"])
            history, start = state["history"], state["epoch"]
            log.info("resuming %s after epoch %d", out, start)
        else:
            torch.manual_seed(cfg.seed)  # dropout masks depend on the seed only
        best_state = None
        step = sum(sizes) * start
        for epoch in range(start, cfg.epochs):
            self.model.train()
            started, seen = time.perf_counter(), {n: 0 for n in self.names}
            batches = [iter(train_batches(train[n], cfg.batch_size, cfg.seed, epoch, pad_id)) for n in self.names]
            for t in epoch_plan(sizes, cfg.seed, epoch):
                loss = self.step(self.names[t], next(batches[t]), opt, cfg, scaler)
                schedule.step()
                seen[self.names[t]] += 1
                step += 1
                if on_step:
                    on_step(step - sum(sizes) * epoch, sum(sizes), loss)
            metrics = self.evaluate(dev, cfg, pad_id)
            record = {"epoch": epoch + 1, "dev": metrics, "average": self.average(metrics), "batches": seen,
                      "seconds": round(time.perf_counter() - started, 2)}
            history.append(record)
            if on_epoch:
                on_epoch(epoch + 1, {**{f"{n}.{self.tasks[n].main_metric}": m[self.tasks[n].main_metric] for n, m in metrics.items()},
                                     "average": record["average"]})
            best = max(history, key=lambda h: h["average"])
            if best is record:
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if state_path is not None and dist.is_main():
                if best is record:
                    self.save(state_path.parent / "best", **(meta or {}))
                write_torch(state_path, {"model": self.model.state_dict(), "optimizer": opt.state_dict(),
                                         "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
                                         "history": history, "epoch": epoch + 1})
            dist.barrier()

        best = max(history, key=lambda h: h["average"])
        if best_state is not None:
            self.model.load_state_dict(best_state)
        elif state_path is not None and (state_path.parent / "best").exists():  # resumed after the best epoch
            self.model.load_state_dict(_read_model_tensors(state_path.parent / "best"))
        extra = {name: {split: self.evaluate({name: data}, cfg, pad_id)[name] for split, data in splits.items()}
                 for name, splits in (extra_dev or {}).items() if splits}
        counts = self.parameter_counts()
        all_ones = all(t.heads_pruned == 0 and t.ffn_pruned == 0 for t in self.tickets)  # = MT-DNN
        result = {"tasks": self.names, "tickets": "none" if all_ones else "shared",
                  "main_metric": {n: self.tasks[n].main_metric for n in self.names},
                  "best_epoch": best["epoch"], "dev": best["dev"], "average": best["average"],
                  "dev_split": dict(dev_split or {}), "extra_dev": extra,
                  "percent_remaining": self.percent_remaining(), "parameters": counts,
                  "task_tickets": self.ticket_stats(), "epochs": history}
        result = _json_safe(result)  # NaN metrics -> null: metrics.json stays strict JSON, equal to the result
        if out is not None and dist.is_main():
            out = Path(out)
            best_dir = out / PROGRESS / "best"
            for path in sorted((best_dir / "tickets").glob("*.json")):
                (out / "tickets").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, out / "tickets" / path.name)
            for name in (WEIGHTS, CONFIG):  # config.json last: its presence means the weights are complete
                shutil.copyfile(best_dir / name, out / f".{name}.tmp")
                (out / f".{name}.tmp").replace(out / name)
            write_json(out / "metrics.json", result)
            write_text(out / "report.md", report_markdown(result))
            shutil.rmtree(out / PROGRESS)
        dist.barrier()
        return result

    def ticket_stats(self) -> dict[str, dict]:
        """Per task: heads and FFN blocks its ticket keeps, and the percent of the dense encoder that is."""
        stats = {}
        for name, ticket in zip(self.names, self.tickets):
            kept = percent_remaining(self.dense_config, ticket, self.model.heads[self.index(name)].out.out_features)
            stats[name] = {"kind": ticket.kind, "ratio": ticket.ratio,
                           "heads": ticket.num_layers * ticket.num_heads - ticket.heads_pruned,
                           "ffn": ticket.num_layers - ticket.ffn_pruned, "percent_encoder": kept["encoder"]}
        return stats

    # -- files --

    def save(self, folder: str | Path, **meta) -> None:
        """model.safetensors, tickets/<task>.json, config.json (last: its presence means complete)."""
        folder = Path(folder)
        write_safetensors(folder / WEIGHTS, self.model.state_dict())
        tasks = []
        for i, (name, ticket) in enumerate(zip(self.names, self.tickets)):
            ticket.save(folder / "tickets" / f"{name}.json")
            head = self.model.heads[i]
            tasks.append({"name": name, "num_labels": head.out.out_features, "dropout": head.dropout.p,
                          "labels": self.labels.get(name, []), "ticket": f"tickets/{name}.json"})
        write_json(folder / CONFIG, {"format": FORMAT, "encoder": self.model.encoder.config.to_dict(), "tasks": tasks, **meta})

    @classmethod
    def load(cls, folder: str | Path, tasks: Mapping[str, object] | None = None) -> "TicketSharer":
        folder = Path(folder)
        cfg = read_mtl_config(folder)
        entries = cfg["tasks"]
        model = MultiTaskModel(Bert(BertConfig.from_dict(cfg["encoder"])), [(e["num_labels"], e["dropout"]) for e in entries])
        tensors, source = read_tensors(folder)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            key = (missing or unexpected)[0]
            raise UserError(f"{source}: {'missing' if missing else 'unknown'} key {key!r}; the model does not match its config.json")
        tickets = [Ticket.load(folder / e["ticket"]) for e in entries]
        return cls(model, [e["name"] for e in entries], tickets, tasks, {e["name"]: e.get("labels", []) for e in entries})


def _average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Under torchrun, average the gradients over processes (every rank runs the same task's step,
    so all hold the same set of gradients); a no-op on one process."""
    if dist.world_size() == 1:
        return
    for p in params:
        dist.all_reduce_sum(p.grad).div_(dist.world_size())


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


def _read_model_tensors(folder: Path) -> dict[str, Tensor]:
    tensors, _ = read_tensors(folder)
    return tensors


def read_mtl_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"{folder} holds no multi-task model (no config.json); pass the --out folder of `st share`")
    cfg = read_json(path)
    if cfg.get("format") != FORMAT:
        raise UserError(f"{folder} is not a multi-task model (its config.json lacks \"format\": \"{FORMAT}\"); run `st share` first")
    return cfg


def is_multitask_dir(folder: str | Path) -> bool:
    """True for a folder written by `st share` (so `st finetune --init` can pick `load_task_model`)."""
    path = Path(folder) / CONFIG
    try:
        return path.is_file() and read_json(path).get("format") == FORMAT
    except ValueError:
        return False


def load_task_model(mtl_dir: str | Path, task_name: str) -> BertClassifier:
    """Task `task_name` of a multi-task model folder as a single-task BertClassifier: the shared
    encoder pruned further to the task's ticket (the ticket stays kept), the pooler and its head."""
    return TicketSharer.load(mtl_dir).task_model(task_name)


# ---- from names and files to a run ----------------------------------------------------------------


def parse_tasks(spec: str) -> list[str]:
    """"a,b,c" -> [a, b, c]; "glue" -> the nine GLUE tasks. A task listed twice is refused."""
    names = list(GLUE_TASKS) if spec.strip().lower() == "glue" else [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks is empty; pass comma-separated task names, or glue")
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"task {name} is listed twice in --tasks; list each task once")
    return names


def parse_pairs(values: Sequence[str], what: str) -> dict[str, str]:
    """["a=x", "b=y"] -> {a: x, b: y}; a task given twice is refused."""
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"{what} {value!r} must be TASK=PATH")
        if name.strip() in pairs:
            raise UserError(f"task {name.strip()} has two {what} values; give one per task")
        pairs[name.strip()] = path.strip()
    return pairs


def resolve_tickets(task_names: Sequence[str], sources: Sequence[str], config: BertConfig,
                    ratios: Sequence[float] | None = None, num_labels: Mapping[str, int] | None = None) -> dict[str, Ticket]:
    """One ticket per task from `sources`: all TASK=PATH pairs, or bare paths in the order of the tasks.

    A PATH is a ticket JSON file (ticket.json, super_ticket.json) or a folder holding
    super_ticket.json (an `st sweep` output) or ticket.json. With `ratios` (one for all tasks or
    one per task) tickets are made instead from importance scores: a scores.json file, or a folder
    holding one, and the winning ticket at the task's ratio is taken. Tickets are checked against
    `config` (shape and model fingerprint).
    """
    sources = [s for value in sources for s in value.split(",") if s.strip()]
    named = ["=" in s for s in sources]
    if any(named) and not all(named):
        raise UserError("--tickets mixes TASK=PATH pairs and bare paths; use one form")
    if all(named) and sources:
        pairs = parse_pairs(sources, "--tickets")
        unknown = [n for n in pairs if n not in task_names]
        if unknown:
            raise UserError(f"--tickets names task {unknown[0]}, which is not in --tasks ({', '.join(task_names)})")
    else:
        if len(sources) != len(task_names):
            raise UserError(f"--tickets has {len(sources)} paths for {len(task_names)} tasks; give one per task, "
                            "in the order of --tasks, or TASK=PATH pairs")
        pairs = dict(zip(task_names, sources))
    without = [n for n in task_names if n not in pairs]
    if without:
        raise UserError(f"task {without[0]} has no ticket; pass --tickets {without[0]}=PATH (or --no-tickets for plain MT-DNN)")
    if ratios is not None:
        ratios = list(ratios)
        if len(ratios) not in (1, len(task_names)):
            raise UserError(f"--ratios has {len(ratios)} values for {len(task_names)} tasks; give one, or one per task")
        ratios = ratios * len(task_names) if len(ratios) == 1 else ratios
    tickets = {}
    for i, name in enumerate(task_names):
        path = Path(pairs[name])
        if ratios is None:
            ticket = _load_ticket(path, name)
        else:
            scores = _load_scores(path, name)
            scores.check_matches(config, source=f"scores {path}")
            ticket = make_ticket(scores, ratios[i], "winning", config=config, num_labels=(num_labels or {}).get(name, 2))
            ticket = replace(ticket, source=str(path))
        ticket.check_matches(config)
        tickets[name] = ticket
    return tickets


def _load_ticket(path: Path, task: str) -> Ticket:
    if path.is_dir():
        found = next((path / f for f in ("super_ticket.json", "ticket.json") if (path / f).is_file()), None)
        if found is None:
            raise UserError(f"{path} holds neither super_ticket.json nor ticket.json; pass a ticket file or an `st sweep` folder for task {task}")
        path = found
    if not path.exists():
        raise UserError(f"ticket {path} for task {task} does not exist")
    data = _read(path)
    if "head_raw" in data:
        raise UserError(f"{path} holds importance scores, not a ticket; add --ratios to make tickets from scores")
    if "head_mask" not in data and isinstance(data.get("ticket"), dict):  # a record with the ticket inside
        data = {**data["ticket"], "task": data.get("task")}
    recorded = data.get("task")
    if isinstance(recorded, str) and recorded != task:
        raise UserError(f"ticket {path} was made for task {recorded}, not {task}; check the order of --tickets")
    try:
        return Ticket.from_json(data, source=str(path))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is not a valid ticket file: {e}") from None


def _load_scores(path: Path, task: str) -> Scores:
    if path.is_dir():  # a folder holding scores.json, or an `st sweep` folder: its first seed's seed<s>/scores.json
        seeds = sorted(path.glob("seed*/scores.json"), key=lambda p: (len(p.parent.name), p.parent.name))
        path = path / "scores.json" if (path / "scores.json").is_file() or not seeds else seeds[0]
    if not path.is_file():
        raise UserError(f"--ratios makes tickets from importance scores: {path} does not exist (task {task}); "
                        "pass scores.json from `st score` or a folder holding it")
    data = _read(path)
    if "head_raw" not in data:
        raise UserError(f"{path} is not a scores file (task {task}); with --ratios pass scores.json from `st score`")
    try:
        return Scores.from_json(data)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is not a valid scores file: {e}") from None


def _read(path: Path) -> dict:
    try:
        data = read_json(path)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def run_share(jobs: Sequence, tickets: Mapping[str, Ticket] | None, out: str | Path, *,
              on_step=None, on_epoch=None) -> dict:
    """Multi-task training of `jobs` (one `pipeline.Job` per task; model, max length, dropout and
    training settings must agree) with ticket sharing, or plain MT-DNN when `tickets` is None.
    A finished run is returned as it is, an interrupted one resumed."""
    # Imported here: pipeline is the single-task path and may itself import this module.
    from st.models.weights import load_pretrained_parts
    from st.pipeline import build_task, build_tokenizer, load_split, load_train, model_dir
    from st.tokenize import check_vocab, copy_tokenizer
    from st.train import check_run_settings

    out = Path(out)
    jobs = list(jobs)
    if not jobs:
        raise UserError("no tasks given; pass --tasks")
    names = [j.task for j in jobs]
    parse_tasks(",".join(names))  # refuses a task listed twice
    base = jobs[0]
    for job in jobs:
        for key in ("model", "max_length", "dropout", "train"):
            if getattr(job, key) != getattr(base, key):
                raise UserError(f"task {job.task} has {key}={getattr(job, key)!r} but {base.task} has {getattr(base, key)!r}; "
                                "a multi-task model shares them")
        if job.ticket or job.init:
            raise UserError(f"task {job.task}: pass tickets to ticket sharing itself, not as the job's ticket/init")
    if tickets is not None:
        missing = [n for n in names if n not in tickets]
        if missing:
            raise UserError(f"task {missing[0]} has no ticket; pass --tickets {missing[0]}=PATH (or --no-tickets for plain MT-DNN)")
    settings = {"tasks": {j.task: j.settings() for j in jobs},
                "tickets": None if tickets is None else {n: tickets[n].to_json() for n in names}}
    finished = check_run_settings(out, settings)
    if finished is not None:
        log.info("%s already finished; nothing to do", out)
        return finished

    tasks = [build_task(j) for j in jobs]
    tokenizer = build_tokenizer(base)
    config, encoder_state, pooler, _ = load_pretrained_parts(base.model)
    encoder = Bert(replace(config, hidden_dropout=base.dropout, attention_dropout=base.dropout))
    encoder.load_state_dict(encoder_state)
    check_vocab(tokenizer, config.vocab_size, model_dir(base))
    ticket_list = None if tickets is None else [tickets[n] for n in names]
    dropouts = [j.head_dropout if j.head_dropout is not None else t.head_dropout for j, t in zip(jobs, tasks)]
    sharer = TicketSharer.create(encoder, tasks, ticket_list, head_dropouts=dropouts, pooler=pooler, seed=base.train.seed)
    train = {t.name: load_train(j, t, tokenizer) for j, t in zip(jobs, tasks)}
    # Epochs are chosen on each task's first dev set; the others (MNLI's dev_mismatched) are
    # evaluated with the chosen weights and reported beside it.
    dev = {t.name: load_split(t, tokenizer, t.dev_splits[0])[1] for t in tasks}
    extra_dev = {t.name: {s: load_split(t, tokenizer, s)[1] for s in t.dev_splits[1:]} for t in tasks if len(t.dev_splits) > 1}
    dev_split = {t.name: t.dev_splits[0] for t in tasks}
    if dist.is_main():
        copy_tokenizer(model_dir(base), out)
    meta = {"model": base.model, "jobs": {j.task: j.settings() for j in jobs}}
    return sharer.train(train, dev, base.train, tokenizer.pad_id, out=out, on_step=on_step, on_epoch=on_epoch, meta=meta,
                        extra_dev=extra_dev, dev_split=dev_split)


# ---- report -----------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def report_markdown(result: dict) -> str:
    """report.md of a multi-task run: per-task dev metrics, the average, weights remaining."""
    mode = "ticket sharing (Algorithm 1)" if result["tickets"] == "shared" else "MT-DNN, no tickets (every weight shared)"
    n, pct = result["parameters"], result["percent_remaining"]
    lines = [f"# Multi-task model: {', '.join(result['tasks'])}", "",
             f"Mode: {mode}. Best epoch {result['best_epoch']} of {len(result['epochs'])} by the average main dev metric.", "",
             "| task | main metric | dev | all dev metrics | ticket heads | ticket FFN | ticket % of encoder |",
             "|---|---|---|---|---|---|---|"]
    for name in result["tasks"]:
        metrics, main, t = result["dev"][name], result["main_metric"][name], result["task_tickets"][name]
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        lines.append(f"| {name} | {main} | {_fmt(metrics[main])} | {shown} | {t['heads']} | {t['ffn']} | {t['percent_encoder']:.1f} |")
    lines += [f"| **average** | | **{_fmt(result['average'])}** | | | | |", ""]
    undefined = [n for n in result["tasks"] if _fmt(result["dev"][n][result["main_metric"][n]]) == "n/a"]
    if undefined:
        lines += [f"n/a: undefined (e.g. a correlation of constant predictions), counted as 0 in the average: "
                  f"{', '.join(undefined)}.", ""]
    extra = result.get("extra_dev") or {}
    if extra:
        first = result.get("dev_split") or {}
        lines += ["Other dev sets, scored with the same weights (epochs are chosen on each task's first dev set"
                  + (", " + ", ".join(f"{n}: {first[n]}" for n in extra if n in first) if first else "") + "):", "",
                  "| task | dev set | main metric | dev | all dev metrics |", "|---|---|---|---|---|"]
        for name, splits in extra.items():
            main = result["main_metric"][name]
            for split, metrics in splits.items():
                shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
                lines.append(f"| {name} | {split} | {main} | {_fmt(metrics.get(main))} | {shown} |")
        lines.append("")
    lines += [(f"Weights remaining (the union of the tickets, counted from the parameter tensors): encoder "
               f"{n['encoder']:,} of {n['dense_encoder']:,} ({pct['encoder']:.1f}%), whole model with pooler and "
               f"{len(result['tasks'])} task heads {n['model']:,} of {n['dense_model']:,} ({pct['model']:.1f}%)."), ""]
    return "\n".join(lines)


def report_table(result: dict):
    """A rich table of the same."""
    from rich.table import Table

    pct = result["percent_remaining"]
    table = Table("task", "main metric", "dev", "ticket % encoder",
                  title=f"multi-task dev ({'ticket sharing' if result['tickets'] == 'shared' else 'MT-DNN'}), "
                        f"{pct['encoder']:.1f}% of encoder weights remain")
    for name in result["tasks"]:
        main = result["main_metric"][name]
        table.add_row(name, main, _fmt(result["dev"][name][main]), f"{result['task_tickets'][name]['percent_encoder']:.1f}")
        for split, metrics in (result.get("extra_dev") or {}).get(name, {}).items():
            table.add_row(f"  {name} {split}", main, _fmt(metrics.get(main)), "")
    table.add_row("average", "", _fmt(result["average"]), "")
    return table
