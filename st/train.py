"""Training: Adamax, linear warm-up/decay, the one training step (`TrainingStep`) and the one
resumable epoch loop (`train`) that every run uses: single-task fine-tuning (`finetune`, here) and
multi-task training with ticket sharing (`st.share`), which adds only its masked update to the step.

The output folder is an `st.runs.RunFolder`: settings, progress after every epoch, the best epoch's
weights, metrics.json last.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from st import dist
from st.data import EncodedSet, eval_shards, steps_per_epoch, train_batches
from st.errors import UserError
from st.models.checkpoint import save_checkpoint
from st.models.heads import BertClassifier, per_example_loss, predict
from st.models.weights import read_tensors
from st.precision import accumulate_grads, check_precision, compute_copy, sync_weights
from st.runs import RunFolder
from st.specs import TrainConfig
from st.tasks import Task
from st.tracking import Tracking, open_tracker

log = logging.getLogger("st")

OnStep = Callable[[int, int, float], None]  # (step in this epoch, steps per epoch, loss)
OnEpoch = Callable[[int, dict], None]  # (epoch, the metrics to show)
Forward = Callable[
    [nn.Module, dict], torch.Tensor
]  # (the module to call: the model or its DDP wrapper, batch) -> logits


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adamax(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    warm = max(1, math.ceil(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict_set(
    model: nn.Module,
    data: EncodedSet,
    pad_id: int,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    batch_size: int = 128,
) -> list:
    """Predictions for every row of `data`, in order, computed in `precision` (`st.precision`); under
    DDP each rank does a share, then all gather."""
    check_precision(precision, device)
    was_training = model.training
    model.eval()
    compute = compute_copy(model, precision)
    mine: dict[int, float | int] = {}
    for indices, batch in eval_shards(data, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        mine.update(zip(indices, predict(compute(**batch).float()).tolist()))
    model.train(was_training)
    merged = dist.gather_dicts(mine)
    return [merged[i] for i in range(len(data))]


def evaluate(
    model: nn.Module, data: EncodedSet, task: Task, pad_id: int, *, device: str = "cpu", precision: str = "fp32"
) -> dict[str, float]:
    return task.compute_metrics(predict_set(model, data, pad_id, device=device, precision=precision), data.labels)


def check_finite(loss: torch.Tensor, grad_norm: torch.Tensor, where: str, lr: float) -> None:
    """Stop a diverged run with one line instead of training on to NaN weights and reporting success."""
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not torch.isfinite(value).all():
            raise UserError(
                f"{where}: the {what} is {value.item()}, so training diverged; rerun into a new --out with a "
                f"lower --lr (now {lr})"
            )


def check_finite_weights(model: nn.Module, epoch: int) -> None:
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise UserError(
            f"epoch {epoch}: weight {bad} is no longer finite, so training diverged; the epochs before are kept, "
            "but rerun into a new --out with a lower --lr"
        )


# ---- the one training step ------------------------------------------------------------------------


class Update(Protocol):
    """What an optimizer step may change. None in `Group`: every weight; multi-task training
    restricts a task's step to its ticket (`st.share.MaskedUpdate`)."""

    def mask_gradients(self) -> list[nn.Parameter]:
        """Drop the gradient outside what the step may change; returns the parameters it may change."""

    def apply(self, optimizer: torch.optim.Optimizer, optimizer_step: Callable[[], object]) -> None:
        """Run `optimizer_step` so that it changes only those elements."""


def call(module: nn.Module, batch: dict) -> torch.Tensor:
    return module(**batch)


@dataclass
class Group:
    """The micro-batches of one optimizer step (more than one with --grad-accum), how a batch goes
    forward, what the step may change, and where it is (for the one-line error of a diverged run)."""

    batches: list[dict]
    where: str
    forward: Forward = call
    update: Update | None = None


def groups(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive groups of `size` micro-batches; the last may be short (it still makes a step, of its own mean)."""
    batches = iter(batches)
    while group := list(itertools.islice(batches, size)):
        yield group


class TrainingStep:
    """The training step of every run: forward and backward of a group's micro-batches in the run's
    precision (on `st.precision`'s compute copy; DDP averages gradients on the last micro-batch only),
    the fp16 gradient scaler, clipping, the finiteness check, the optimizer step on the fp32 master
    weights (through the group's update), zero_grad, and the weights cast back into the copy."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        device: torch.device,
        *,
        find_unused: bool = False,
    ):
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, torch.device(device)
        check_precision(cfg.precision, self.device)
        self.compute = compute_copy(model, cfg.precision)  # the model itself in fp32
        # find_unused: a multi-task step leaves the other tasks' heads out of its graph
        self.ddp = dist.wrap(self.compute, find_unused=find_unused)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

    def __call__(self, group: Group) -> float:
        """One optimizer step; returns the loss of its last micro-batch."""
        size = len(group.batches)
        self.compute.train(self.model.training)
        for i, batch in enumerate(group.batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            sync = i == size - 1 or self.ddp is self.compute
            with nullcontext() if sync else self.ddp.no_sync():
                loss = per_example_loss(group.forward(self.ddp, batch).float(), labels).mean() / size  # fp32
                self.scaler.scale(loss).backward()
            if sync:  # into the fp32 master gradients; under DDP only once it has all-reduced them
                accumulate_grads(self.model, self.compute)
        self.scaler.unscale_(self.optimizer)
        if group.update is None:
            params = [p for p in self.model.parameters() if p.grad is not None]
        else:
            params = group.update.mask_gradients()  # the clip norm is that of what the step may change
        norm = nn.utils.clip_grad_norm_(params, self.cfg.clip)
        self.grad_norm = norm.item()  # before clipping: what a tracker plots
        if not self.scaler.is_enabled():  # fp16's scaler skips non-finite steps itself
            check_finite(loss, norm, group.where, self.cfg.lr)
        if group.update is None:
            self.scaler.step(self.optimizer)
        else:
            group.update.apply(self.optimizer, lambda: self.scaler.step(self.optimizer))
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        sync_weights(self.model, self.compute)
        return loss.item() * size


# ---- the one epoch loop ---------------------------------------------------------------------------


class Learner(Protocol):
    """What `train` trains: single-task fine-tuning (`FineTuning`) or ticket sharing (`st.share`)."""

    model: nn.Module
    steps: int  # optimizer steps per epoch
    find_unused: bool  # whether a step may leave parameters out of the graph (DDP must know)

    def groups(self, epoch: int) -> Iterable[Group]:
        """The epoch's optimizer steps, in order (called as the epoch starts)."""

    def evaluate(self) -> dict:
        """The epoch's record after "epoch": its dev metrics and counters."""

    def score(self, record: dict) -> float:
        """What chooses the best epoch (higher is better)."""

    def save(self, folder: Path) -> None:
        """The model as a loadable folder (the best epoch's, into the run folder's progress)."""


def train(
    learner: Learner,
    run: RunFolder,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    finish: Callable[[dict], tuple[dict, dict[str, str]]],
    on_step: OnStep | None = None,
    on_epoch: OnEpoch | None = None,
    shown: Callable[[dict], dict] = lambda record: record["dev"],
    tracking: Tracking | None = None,
) -> dict:
    """Train `learner` for cfg.epochs epochs into `run`, resuming from its progress: after every epoch
    evaluate, keep the best epoch's folder and save the progress. Then load the best epoch's weights,
    and commit `finish({"best", "history"})` = (metrics.json's contents, further text files). Returns
    the metrics. `shown(record)`: the metrics `on_epoch` gets, and a tracker (`tracking`) logs as dev."""
    model = learner.model.to(device)
    optimizer = make_optimizer(model, cfg)
    schedule = make_schedule(optimizer, learner.steps * cfg.epochs, cfg.warmup)
    history = run.load_progress(model, optimizer, schedule, device)
    step = TrainingStep(model, optimizer, cfg, device, find_unused=learner.find_unused)  # from the resumed weights
    if not history:
        torch.manual_seed(seed)  # dropout masks depend on the seed only
    with open_tracker(tracking, run.path, len(history) * learner.steps) as tracker:
        for epoch in range(len(history), cfg.epochs):
            model.train()
            for done, group in enumerate(learner.groups(epoch), 1):
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                loss = step(group)
                schedule.step()
                tracker.step(epoch * learner.steps + done, {"loss": loss, "lr": lr, "grad_norm": step.grad_norm})
                if on_step:
                    on_step(done, learner.steps, loss)
            check_finite_weights(model, epoch + 1)  # never evaluate, let alone keep, diverged weights
            record = {"epoch": epoch + 1, **learner.evaluate()}
            history.append(record)
            tracker.epoch((epoch + 1) * learner.steps, epoch + 1, shown(record))
            if on_epoch:
                on_epoch(epoch + 1, shown(record))
            if dist.is_main():
                if max(history, key=learner.score) is record:
                    learner.save(run.best_dir)
                run.save_progress(model, optimizer, schedule, history)
            dist.barrier()
        load_best(model, run, device)
        result, texts = finish({"best": max(history, key=learner.score), "history": history})
        tracker.summary({"final": {k: v for k, v in result.items() if k != "epochs"}})  # the chosen epoch's
    if dist.is_main():
        run.commit(result, texts)
    dist.barrier()
    return result


def load_best(model: nn.Module, run: RunFolder, device: str | torch.device = "cpu") -> None:
    """The best epoch's weights, as rank 0 saved them before the last barrier; every rank reads them."""
    tensors, _ = read_tensors(run.best_dir)
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()})


# ---- single-task fine-tuning ------------------------------------------------------------------------


class FineTuning:
    """One task's epochs for `train`: every training batch once, in a seeded order, grad_accum to a step."""

    find_unused = False

    def __init__(
        self,
        model: BertClassifier,
        data: EncodedSet,
        dev: EncodedSet,
        task: Task,
        cfg: TrainConfig,
        seed: int,
        pad_id: int,
        device: torch.device,
        meta: dict,
    ):
        self.model, self.data, self.dev, self.task, self.cfg = model, data, dev, task, cfg
        self.seed, self.pad_id, self.device, self.meta = seed, pad_id, device, meta
        self.steps = math.ceil(steps_per_epoch(data, cfg.batch_size) / cfg.grad_accum)
        self.seen, self.started = 0, 0.0

    def groups(self, epoch: int) -> Iterator[Group]:
        self.seen, self.started = 0, time.perf_counter()
        batches = train_batches(self.data, self.cfg.batch_size, self.seed, epoch, self.pad_id)
        for i, micro in enumerate(groups(batches, self.cfg.grad_accum), 1):
            self.seen += sum(len(b["labels"]) for b in micro)
            yield Group(micro, f"epoch {epoch + 1}, step {i}")

    def evaluate(self) -> dict:
        metrics = evaluate(
            self.model, self.dev, self.task, self.pad_id, device=self.device, precision=self.cfg.precision
        )
        elapsed = time.perf_counter() - self.started
        return {
            "dev": metrics,
            "seconds": round(elapsed, 2),
            "examples_per_second": round(self.seen * dist.world_size() / elapsed, 1),
        }

    def score(self, record: dict) -> float:
        return record["dev"][self.task.main_metric]

    def save(self, folder: Path) -> None:
        save_checkpoint(folder, self.model, **self.meta)


def finetune(
    model: BertClassifier,
    data: EncodedSet,
    dev: EncodedSet,
    task: Task,
    cfg: TrainConfig,
    run: RunFolder,
    pad_id: int,
    *,
    seed: int = 0,
    device: str = "cpu",
    on_step: OnStep | None = None,
    on_epoch: OnEpoch | None = None,
    meta: dict | None = None,
    report: EncodedSet | None = None,
    tracking: Tracking | None = None,
) -> dict:
    """Fine-tune `model` on `data`, choosing the epoch by `task.main_metric` on `dev`, into `run`.

    Resumes from the run's progress. Returns the metrics written to metrics.json; `meta` goes into
    config.json beside the weights. A `report` set plays no part in the choice: it is evaluated once,
    on the chosen epoch's weights, into "report".
    """
    device = torch.device(device)
    learner = FineTuning(model, data, dev, task, cfg, seed, pad_id, device, meta or {})

    def finish(fitted: dict) -> tuple[dict, dict]:
        best = fitted["best"]
        result = {
            "task": task.name,
            "main_metric": task.main_metric,
            "best_epoch": best["epoch"],
            "dev": best["dev"],
            "epochs": fitted["history"],
        }
        if report is not None:
            metrics = evaluate(model, report, task, pad_id, device=device, precision=cfg.precision)
            result.update(report=metrics, dev_examples=len(dev), report_examples=len(report))
        return result, {}

    return train(
        learner,
        run,
        cfg,
        seed=seed,
        device=device,
        finish=finish,
        on_step=on_step,
        on_epoch=on_epoch,
        tracking=tracking,
    )
