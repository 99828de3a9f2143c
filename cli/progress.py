"""What a command shows while it works: a rich progress bar for training (loss and throughput per
step, one line per epoch), and the library's log level around a command."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def training_progress(enabled: bool = True):
    """Yield (on_step, on_epoch) callbacks for `st.train.finetune`; silent when not enabled."""
    if not enabled:
        yield None, None
        return
    columns = (
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.1f} steps/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("train", total=None, epoch=1, loss=float("nan"), rate=0.0)
        clock = {"start": time.perf_counter(), "epoch": 1}

        def on_step(step: int, total: int, loss: float) -> None:
            if step == 1:
                clock["start"] = time.perf_counter()
            rate = step / max(time.perf_counter() - clock["start"], 1e-9)
            progress.update(bar, completed=step, total=total, loss=loss, rate=rate, epoch=clock["epoch"])

        def on_epoch(epoch: int, metrics: dict) -> None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            progress.console.print(f"epoch {epoch}: dev {shown}")
            clock["epoch"] = epoch + 1
            progress.reset(bar, epoch=epoch + 1, loss=float("nan"), rate=0.0)

        yield on_step, on_epoch


@contextmanager
def log_level(level):
    """The "st" logger at `level` (None: as it is) for the block, then as before."""
    logger = logging.getLogger("st")
    before = logger.level
    if level is not None:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
