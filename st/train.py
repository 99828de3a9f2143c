"""Plain fine-tuning and evaluation loops: Adamax, linear warm-up/decay, clipping, resumable epochs.

Output folder layout (everything written atomically):
  run.json       the settings that made the run (a rerun with other settings is refused)
  .progress/     state after the last finished epoch (weights, optimizer, schedule, RNG, history)
  model.safetensors + config.json   the weights of the best dev epoch, once training finished
  metrics.json   written last: its presence means the run is finished and is never overwritten
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from st import dist
from st.data import EncodedSet, eval_shards, steps_per_epoch, train_batches
from st.errors import UserError
from st.io import read_json, write_json, write_torch
from st.models.checkpoint import save_checkpoint
from st.models.heads import BertClassifier, per_example_loss, predict
from st.tasks import Task

log = logging.getLogger("st")

PROGRESS, STATE = ".progress", "state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """The paper's fine-tuning defaults (Liang et al. 2021, following MT-DNN)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    warmup: float = 0.1  # fraction of all steps with a linear warm-up, then linear decay to 0
    weight_decay: float = 0.0
    clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, CUDA only)
    eval_batch_size: int = 128


def default_lr(model: str) -> float:
    """The paper's 5e-5 was tuned for BERT-base and -large. Small encoders need a larger rate to
    move in the same few hundred steps: measured on rotten_tomatoes with all-MiniLM-L6-v2
    (hidden 384), 1,000 examples × 2 epochs reach dev accuracy 0.51 at 5e-5 and 0.76 at 2e-4."""
    from st.models.weights import read_config, resolve_model_dir

    config = read_config(resolve_model_dir(model))
    hidden = config["encoder"]["hidden_size"] if "encoder" in config else config.get("hidden_size", 768)
    return 5e-5 if hidden >= 768 else 2e-4


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adamax(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    warm = max(1, math.ceil(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(cfg: TrainConfig):
    if cfg.precision == "fp32" or not cfg.device.startswith("cuda"):
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


@torch.no_grad()
def predict_set(model: nn.Module, data: EncodedSet, cfg: TrainConfig, pad_id: int) -> list:
    """Predictions for every row of `data`, in order; under DDP each rank does a share, then all gather."""
    was_training = model.training
    model.eval()
    mine: dict[int, float | int] = {}
    for indices, batch in eval_shards(data, cfg.eval_batch_size, pad_id):
        batch = {k: v.to(cfg.device) for k, v in batch.items() if k != "labels"}
        with autocast(cfg):
            logits = model(**batch)
        mine.update(zip(indices, predict(logits.float()).tolist()))
    model.train(was_training)
    merged = dist.gather_dicts(mine)
    return [merged[i] for i in range(len(data))]


def evaluate(model: nn.Module, data: EncodedSet, task: Task, cfg: TrainConfig, pad_id: int) -> dict[str, float]:
    return task.compute_metrics(predict_set(model, data, cfg, pad_id), data.labels)


def finetune(
    model: BertClassifier,
    train: EncodedSet,
    dev: EncodedSet,
    task: Task,
    cfg: TrainConfig,
    out: Path,
    pad_id: int,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    meta: dict | None = None,
    report: EncodedSet | None = None,
) -> dict:
    """Fine-tune `model` on `train`, choosing the epoch by `task.main_metric` on `dev`.

    Resumes from `out/.progress` when present. Returns the metrics written to `out/metrics.json`;
    `meta` goes into config.json beside the weights. Only rank 0 writes. A `report` set plays no
    part in the choice: it is evaluated once, on the chosen epoch's weights, into "report".
    """
    out = Path(out)
    device = torch.device(cfg.device)
    model.to(device)
    ddp = dist.wrap(model)
    optimizer = make_optimizer(model, cfg)
    steps = steps_per_epoch(train, cfg.batch_size) // cfg.grad_accum
    schedule = make_schedule(optimizer, steps * cfg.epochs, cfg.warmup)
    history, start_epoch = [], 0
    state_path = out / PROGRESS / STATE
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"]
        log.info("resuming %s after epoch %d", out, start_epoch)
    else:
        torch.manual_seed(cfg.seed)  # dropout masks depend on the seed only

    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started, seen, step = time.perf_counter(), 0, 0
        batches = train_batches(train, cfg.batch_size, cfg.seed, epoch, pad_id)
        for i, batch in enumerate(batches):
            if i >= steps * cfg.grad_accum:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            last_micro = (i + 1) % cfg.grad_accum == 0
            with (nullcontext() if last_micro or ddp is model else ddp.no_sync()), autocast(cfg):
                loss = per_example_loss(ddp(**batch).float(), labels).mean() / cfg.grad_accum
                scaler.scale(loss).backward()
            seen += len(labels)
            if last_micro:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                step += 1
                if on_step:
                    on_step(step, steps, loss.item() * cfg.grad_accum)
        metrics = evaluate(model, dev, task, cfg, pad_id)
        elapsed = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "dev": metrics, "seconds": round(elapsed, 2),
                        "examples_per_second": round(seen * dist.world_size() / elapsed, 1)})
        if on_epoch:
            on_epoch(epoch + 1, metrics)
        best = max(history, key=lambda h: h["dev"][task.main_metric])
        if dist.is_main():
            if best is history[-1]:  # keep the best epoch's weights for the final checkpoint
                save_checkpoint(out / PROGRESS / "best", model, **(meta or {}))
            write_torch(state_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
                "history": history, "epoch": epoch + 1,
            })
        dist.barrier()

    best = max(history, key=lambda h: h["dev"][task.main_metric])
    result = {"task": task.name, "main_metric": task.main_metric, "best_epoch": best["epoch"],
              "dev": best["dev"], "epochs": history}
    if report is not None:
        # The chosen epoch's weights, as rank 0 saved them before the last barrier; every rank reads them.
        model.load_state_dict(load_file(out / PROGRESS / "best" / "model.safetensors", device=str(device)))
        result.update(report=evaluate(model, report, task, cfg, pad_id), dev_examples=len(dev), report_examples=len(report))
    if dist.is_main():
        for name in ("model.safetensors", "config.json"):
            shutil.copyfile(out / PROGRESS / "best" / name, out / f".{name}.tmp")
            (out / f".{name}.tmp").replace(out / name)
        write_json(out / "metrics.json", result)
        shutil.rmtree(out / PROGRESS)
    dist.barrier()
    return result


def check_run_settings(out: Path, settings: dict) -> dict | None:
    """Guard an output folder: returns finished metrics if the same run already finished, None to
    start or resume; refuses a folder made with other settings, naming the first that differs."""
    run_file = out / "run.json"
    if run_file.exists():
        previous, settings = _flatten(read_json(run_file)), _flatten(settings)
        for key in sorted(set(previous) | set(settings)):
            if previous.get(key) != settings.get(key):
                raise UserError(
                    f"{out} holds a run made with {key}={previous.get(key)!r}, not {settings.get(key)!r}; "
                    f"use another --out, or delete {out} to start over"
                )
        if (out / "metrics.json").exists():
            return read_json(out / "metrics.json")
    elif dist.is_main():
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty and holds no st run; choose an empty or new --out folder")
        write_json(run_file, settings)
    dist.barrier()
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}, so a refusal names the one setting that differs."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
