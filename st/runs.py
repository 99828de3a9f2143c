"""The run folder: the one protocol every resumable output (`st finetune`, `st share`, `st sweep`) follows.

  run.json       the settings that made it (sweep.json for a sweep): a rerun with others is refused,
                 naming the first setting that differs
  .progress/     state.pt after the last finished epoch (weights, optimizer, schedule, RNG, history)
                 and best/, the best epoch's loadable folder so far
  ...            the best epoch's files, moved out of .progress/best/ when training finishes
  metrics.json   written last: its presence means the run is finished, and it is never overwritten

Every file is written atomically and only rank 0 writes; the others wait at a barrier.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from st import dist
from st.errors import UserError
from st.io import read_json, write_json, write_text, write_torch

log = logging.getLogger("st")

PROGRESS, STATE, BEST, METRICS = ".progress", "state.pt", "best", "metrics.json"


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}, so a refusal names the one setting that differs."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def guard_settings(folder: Path, settings: dict, file: str = "run.json", what: str = "run") -> bool:
    """Record `settings` in a new (or empty) `folder`, or check them against those it holds; refuses
    other settings, naming the first that differs, and a non-empty folder that holds no `what`.
    Returns True when the folder was made by an earlier call (a resume or a finished run)."""
    path = folder / file
    if path.exists():
        previous, current = flatten(read_json(path)), flatten(settings)
        for key in sorted(set(previous) | set(current)):
            if previous.get(key) != current.get(key):
                raise UserError(f"{folder} holds a {what} made with {key}={previous.get(key)!r}, not {current.get(key)!r}; "
                                f"use another --out, or delete {folder} to start over")
        return True
    if dist.is_main():
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"{folder} is not empty and holds no st {what}; choose an empty or new --out folder")
        write_json(path, settings)
    dist.barrier()
    return False


class RunFolder:
    """One training run's output folder (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state_path = self.path / PROGRESS / STATE
        self.best_dir = self.path / PROGRESS / BEST

    def claim(self, settings: dict) -> dict | None:
        """Guard the folder for a run with `settings`: the finished run's metrics, or None to start or resume."""
        with self.lock():
            if guard_settings(self.path, settings) and (self.path / METRICS).exists():
                log.info("%s already finished; nothing to do", self.path)
                return read_json(self.path / METRICS)
        return None

    @contextmanager
    def lock(self):
        """Where an exclusive lock on the folder goes, so that two processes never run one run at once.
        Not taken yet: every caller already goes through here, so adding it changes one place."""
        yield

    # ---- progress, after every epoch ----

    def load_progress(self, model, optimizer, schedule, device) -> list[dict]:
        """Restore the state after the last finished epoch; returns the history so far ([] for a new run)."""
        if not self.state_path.exists():
            return []
        import torch

        state = torch.load(self.state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        log.info("resuming %s after epoch %d", self.path, state["epoch"])
        return state["history"]

    def save_progress(self, model, optimizer, schedule, history: list[dict]) -> None:
        """Rank 0 only (the caller checks): the state to resume from after this epoch."""
        import torch

        write_torch(self.state_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "rng": torch.get_rng_state(), "history": history, "epoch": len(history),
        })

    # ---- finishing ----

    def commit(self, result: dict, texts: dict[str, str] | None = None) -> None:
        """Rank 0 only: move the best epoch's files into the folder (config.json last: its presence means
        the weights beside it are complete), write `texts` (e.g. report.md), then metrics.json, the mark
        of a finished run, and drop the progress."""
        files = sorted((p for p in self.best_dir.rglob("*") if p.is_file()), key=lambda p: (p.name == "config.json", str(p)))
        for source in files:
            target = self.path / source.relative_to(self.best_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        for name, text in (texts or {}).items():
            write_text(self.path / name, text)
        write_json(self.path / METRICS, result)
        shutil.rmtree(self.path / PROGRESS)
