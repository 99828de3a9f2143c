"""The training loop: Adamax, linear warm-up/decay, clipping, and one resumable epoch loop (`fit`)
that single-task fine-tuning and multi-task training (`st.share`) both run, each with its own step.

The output folder is an `st.runs.RunFolder`: settings, progress after every epoch, the best epoch's
weights, metrics.json last.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from st import dist
from st.data import EncodedSet, eval_shards, steps_per_epoch, train_batches
from st.errors import UserError
from st.models.checkpoint import save_checkpoint
from st.models.heads import BertClassifier, per_example_loss, predict
from st.models.weights import read_tensors
from st.runs import RunFolder
from st.specs import TrainConfig
from st.tasks import Task

log = logging.getLogger("st")

OnStep = Callable[[int, int, float], None]  # (step in this epoch, steps per epoch, loss)
OnEpoch = Callable[[int, dict], None]  # (epoch, the metrics to show)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adamax(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    warm = max(1, math.ceil(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(precision: str, device: str | torch.device):
    if precision == "fp32" or torch.device(device).type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def predict_set(model: nn.Module, data: EncodedSet, pad_id: int, *, device: str = "cpu", precision: str = "fp32",
                batch_size: int = 128) -> list:
    """Predictions for every row of `data`, in order; under DDP each rank does a share, then all gather."""
    was_training = model.training
    model.eval()
    mine: dict[int, float | int] = {}
    for indices, batch in eval_shards(data, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with autocast(precision, device):
            logits = model(**batch)
        mine.update(zip(indices, predict(logits.float()).tolist()))
    model.train(was_training)
    merged = dist.gather_dicts(mine)
    return [merged[i] for i in range(len(data))]


def evaluate(model: nn.Module, data: EncodedSet, task: Task, pad_id: int, *, device: str = "cpu", precision: str = "fp32") -> dict[str, float]:
    return task.compute_metrics(predict_set(model, data, pad_id, device=device, precision=precision), data.labels)


def check_finite(loss: torch.Tensor, grad_norm: torch.Tensor, where: str, lr: float) -> None:
    """Stop a diverged run with one line instead of training on to NaN weights and reporting success."""
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not torch.isfinite(value).all():
            raise UserError(f"{where}: the {what} is {value.item()}, so training diverged; rerun into a new --out with a "
                            f"lower --lr (now {lr})")


def check_finite_weights(model: nn.Module, epoch: int) -> None:
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise UserError(f"epoch {epoch}: weight {bad} is no longer finite, so training diverged; the epochs before are kept, "
                        "but rerun into a new --out with a lower --lr")


# ---- the epoch loop -------------------------------------------------------------------------------


class Learner(Protocol):
    """What `fit` trains: single-task fine-tuning (`FineTuning`) or ticket sharing (`st.share`)."""

    model: nn.Module

    def batches(self, epoch: int) -> Iterable:
        """The epoch's batches, in order (called as the epoch starts)."""

    def step(self, batch) -> float | None:
        """Forward, backward and, when due, an optimizer step: its loss, or None for a micro-batch
        that only accumulated gradients."""

    def evaluate(self) -> dict:
        """The epoch's record after "epoch": its dev metrics and counters."""

    def score(self, record: dict) -> float:
        """What chooses the best epoch (higher is better)."""

    def save(self, folder: Path) -> None:
        """The model as a loadable folder (the best epoch's, into the run folder's progress)."""


def fit(learner: Learner, run: RunFolder, optimizer, schedule, *, epochs: int, seed: int, steps: int,
        device: str | torch.device = "cpu", on_step: OnStep | None = None, on_epoch: OnEpoch | None = None,
        shown: Callable[[dict], dict] = lambda record: record["dev"]) -> dict:
    """Train `learner` for `epochs` epochs, resuming from `run`'s progress; after every epoch evaluate,
    keep the best epoch's folder and save the progress. Returns the best record; `run.best_dir` then
    holds that epoch's model. `steps`: optimizer steps per epoch (for `on_step`); `shown(record)`:
    the metrics `on_epoch` gets."""
    history = run.load_progress(learner.model, optimizer, schedule, device)
    if not history:
        torch.manual_seed(seed)  # dropout masks depend on the seed only
    for epoch in range(len(history), epochs):
        learner.model.train()
        done = 0
        for batch in learner.batches(epoch):
            loss = learner.step(batch)
            if loss is None:
                continue
            schedule.step()
            done += 1
            if on_step:
                on_step(done, steps, loss)
        check_finite_weights(learner.model, epoch + 1)  # never evaluate, let alone keep, diverged weights
        record = {"epoch": epoch + 1, **learner.evaluate()}
        history.append(record)
        if on_epoch:
            on_epoch(epoch + 1, shown(record))
        if dist.is_main():
            if max(history, key=learner.score) is record:
                learner.save(run.best_dir)
            run.save_progress(learner.model, optimizer, schedule, history)
        dist.barrier()
    return {"best": max(history, key=learner.score), "history": history}


def load_best(model: nn.Module, run: RunFolder, device: str | torch.device = "cpu") -> None:
    """The best epoch's weights, as rank 0 saved them before the last barrier; every rank reads them."""
    tensors, _ = read_tensors(run.best_dir)
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()})


# ---- single-task fine-tuning ------------------------------------------------------------------------


class FineTuning:
    """One task's step (with gradient accumulation, DDP and a grad scaler) and evaluation, for `fit`."""

    def __init__(self, model: BertClassifier, train: EncodedSet, dev: EncodedSet, task: Task, cfg: TrainConfig,
                 optimizer, seed: int, pad_id: int, device: torch.device, meta: dict):
        self.model, self.train, self.dev, self.task, self.cfg = model, train, dev, task, cfg
        self.optimizer, self.seed, self.pad_id, self.device, self.meta = optimizer, seed, pad_id, device, meta
        self.ddp = dist.wrap(model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")
        # The last accumulation group of an epoch may be short: it still makes a step (of its own mean).
        self.batches_per_epoch = steps_per_epoch(train, cfg.batch_size)
        self.steps = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.epoch, self.micro, self.seen, self.started = 0, 0, 0, 0.0

    def batches(self, epoch: int):
        self.epoch, self.micro, self.seen, self.started = epoch, 0, 0, time.perf_counter()
        return train_batches(self.train, self.cfg.batch_size, self.seed, epoch, self.pad_id)

    def step(self, batch) -> float | None:
        cfg = self.cfg
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        group = self.micro // cfg.grad_accum
        size = min(cfg.grad_accum, self.batches_per_epoch - group * cfg.grad_accum)  # micro-batches in this group
        self.micro += 1
        last_micro = self.micro == group * cfg.grad_accum + size
        with (nullcontext() if last_micro or self.ddp is self.model else self.ddp.no_sync()), autocast(cfg.precision, self.device):
            loss = per_example_loss(self.ddp(**batch).float(), labels).mean() / size
            self.scaler.scale(loss).backward()
        self.seen += len(labels)
        if not last_micro:
            return None
        self.scaler.unscale_(self.optimizer)
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        if not self.scaler.is_enabled():  # fp16's scaler skips non-finite steps itself
            check_finite(loss, norm, f"epoch {self.epoch + 1}, step {group + 1}", cfg.lr)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item() * size

    def evaluate(self) -> dict:
        metrics = evaluate(self.model, self.dev, self.task, self.pad_id, device=self.device, precision=self.cfg.precision)
        elapsed = time.perf_counter() - self.started
        return {"dev": metrics, "seconds": round(elapsed, 2),
                "examples_per_second": round(self.seen * dist.world_size() / elapsed, 1)}

    def score(self, record: dict) -> float:
        return record["dev"][self.task.main_metric]

    def save(self, folder: Path) -> None:
        save_checkpoint(folder, self.model, **self.meta)


def finetune(model: BertClassifier, train: EncodedSet, dev: EncodedSet, task: Task, cfg: TrainConfig, run: RunFolder,
             pad_id: int, *, seed: int = 0, device: str = "cpu", on_step: OnStep | None = None,
             on_epoch: OnEpoch | None = None, meta: dict | None = None, report: EncodedSet | None = None) -> dict:
    """Fine-tune `model` on `train`, choosing the epoch by `task.main_metric` on `dev`, into `run`.

    Resumes from the run's progress. Returns the metrics written to metrics.json; `meta` goes into
    config.json beside the weights. A `report` set plays no part in the choice: it is evaluated once,
    on the chosen epoch's weights, into "report".
    """
    device = torch.device(device)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    learner = FineTuning(model, train, dev, task, cfg, optimizer, seed, pad_id, device, meta or {})
    schedule = make_schedule(optimizer, learner.steps * cfg.epochs, cfg.warmup)
    fitted = fit(learner, run, optimizer, schedule, epochs=cfg.epochs, seed=seed, steps=learner.steps, device=device,
                 on_step=on_step, on_epoch=on_epoch)
    best = fitted["best"]
    result = {"task": task.name, "main_metric": task.main_metric, "best_epoch": best["epoch"], "dev": best["dev"],
              "epochs": fitted["history"]}
    if report is not None:
        load_best(model, run, device)
        result.update(report=evaluate(model, report, task, pad_id, device=device, precision=cfg.precision),
                      dev_examples=len(dev), report_examples=len(report))
    if dist.is_main():
        run.commit(result)
    dist.barrier()
    return result
