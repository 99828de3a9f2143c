"""The run folder: the one protocol every resumable output (`st finetune`, `st share`, `st sweep`) follows.

  run.json       the settings that made it (sweep.json for a sweep): a rerun with others is refused,
                 naming the first setting that differs
  .progress/     state.pt after the last finished epoch (weights, optimizer, schedule, RNG, history),
                 best/, the best epoch's loadable folder so far, and the sha256 of each of its files:
                 a best/ damaged since is never committed (a resumed run trains again from epoch 1)
  ...            the best epoch's files, moved out of .progress/best/ when training finishes
  metrics.json   written last: its presence means the run is finished, and it is never overwritten
  .lock          held by the process writing the run (its pid inside); gone once it finished

Every input is checked before run.json is written (`check`, then `claim`), so a failed check leaves
nothing that would refuse the corrected rerun. Every file is written atomically and only rank 0
writes; the others wait at a barrier.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from st import dist
from st.errors import UserError
from st.io import check_writable, copy_file, file_digest, read_json, write_json, write_text, write_torch
from st.layout import BEST, BEST_MANIFEST, CONFIG, LOCK, METRICS, PROGRESS, RUN_SETTINGS, STATE

log = logging.getLogger("st")


# Settings that identify a run and were added after release 0.1.0: a run folder that 0.1.0 wrote
# lacks them, and still resumes.
ADDED_SINCE_0_1 = {"model_files"}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}, so a refusal names the one setting that differs."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def read_settings(folder: Path, file: str) -> dict:
    try:
        return read_json(folder / file)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / file} is corrupt ({e}); delete {folder} to start that run over") from None


def check_settings(folder: Path, settings: dict, file: str = RUN_SETTINGS, what: str = "run") -> bool:
    """Read-only: True when `folder` holds a `what` made with `settings` (to resume or finished), False
    when it is new or empty. Refuses other settings, naming the first that differs, a non-empty folder
    that holds no `what`, and a folder that cannot be written to."""
    if (folder / file).exists():
        previous, current = flatten(read_settings(folder, file)), flatten(settings)
        for key in sorted(set(previous) | set(current)):
            if key not in previous and key.rsplit(".", 1)[-1] in ADDED_SINCE_0_1:
                continue  # a folder of 0.1.0 resumes, identified as 0.1.0 identified it
            if previous.get(key) != current.get(key):
                raise UserError(
                    f"{folder} holds a {what} made with {key}={previous.get(key)!r}, not {current.get(key)!r}; "
                    f"use another --out, or delete {folder} to start over"
                )
        found = True
    elif folder.exists() and any(p.name != LOCK for p in folder.iterdir()):
        raise UserError(f"{folder} is not empty and holds no st {what}; choose an empty or new --out folder")
    else:
        found = False
    if dist.is_main():
        check_writable(folder)
    return found


def guard_settings(folder: Path, settings: dict, file: str = RUN_SETTINGS, what: str = "run") -> bool:
    """`check_settings`, then record the settings in a new folder (rank 0). Call it once every input
    is checked, so that a failed check leaves no folder behind that refuses the corrected rerun.
    Under torchrun only rank 0 checks again and writes (every rank ran the read-only check before):
    another rank's check would race rank 0's write and see its temporary file."""
    found = False
    if dist.is_main():
        found = check_settings(folder, settings, file, what)
        if not found:
            write_json(folder / file, settings)
    dist.barrier()
    return found


def lock_folder(folder: Path):
    """An exclusive lock on `folder` for this process, so that two processes never write one run: a
    second one gets a one-line error naming the holder. The kernel drops it when the process ends,
    kill -9 included. Returns the open lock file (closing it releases the lock)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unguarded, as before
        return None
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"{folder} is being written by process {holder}; wait for it to finish or stop it, or choose another --out"
        ) from None
    except OSError as e:  # a file system without locks (some network mounts): run unguarded, say so
        log.warning("could not lock %s (%s); make sure no other process writes there", folder, e.strerror)
        handle.close()
        return None
    handle.seek(0), handle.truncate(), handle.write(str(os.getpid())), handle.flush()
    return handle


class RunFolder:
    """One training run's output folder (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state_path = self.path / PROGRESS / STATE
        self.best_dir = self.path / PROGRESS / BEST
        self.best_manifest = self.path / PROGRESS / BEST_MANIFEST
        self._lock = None

    def check(self, settings: dict) -> dict | None:
        """Read-only, before any heavy work: the finished run's metrics, or None to start or resume.
        Refuses other settings, a foreign non-empty folder, an unwritable one."""
        if check_settings(self.path, settings) and (self.path / METRICS).exists():
            log.info("%s already finished; nothing to do", self.path)
            return read_json(self.path / METRICS)
        return None

    def claim(self, settings: dict) -> None:
        """Once every input is checked: lock the folder for this process (rank 0) and record the settings."""
        if dist.is_main():
            self._lock = lock_folder(self.path)
        guard_settings(self.path, settings)

    # ---- progress, after every epoch ----

    def load_progress(self, model, optimizer, schedule, device) -> list[dict]:
        """Restore the state after the last finished epoch; returns the history so far ([] for a new run)."""
        if not self.state_path.exists():
            return []
        if not self.best_intact():
            log.warning(
                "the best epoch's model in %s was damaged since it was saved; training this run again "
                "from its first epoch",
                self.best_dir,
            )
            if dist.is_main():
                shutil.rmtree(self.path / PROGRESS, ignore_errors=True)
            return []
        import torch

        try:
            state = torch.load(self.state_path, map_location=device, weights_only=True)
        except Exception as e:  # truncated or corrupt: the pickle reader raises many kinds
            raise UserError(
                f"{self.state_path} is unreadable ({type(e).__name__}); delete {self.path / PROGRESS} "
                "to restart this run from its first epoch"
            ) from None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        log.info("resuming %s after epoch %d", self.path, state["epoch"])
        return state["history"]

    def save_progress(self, model, optimizer, schedule, history: list[dict]) -> None:
        """Rank 0 only (the caller checks): the state to resume from after this epoch, with the digests
        of the best epoch's files (checked before they are trusted: `best_intact`)."""
        import torch

        digests = {str(p.relative_to(self.best_dir)): file_digest(p) for p in self.best_dir.rglob("*") if p.is_file()}
        write_json(self.best_manifest, digests)

        write_torch(
            self.state_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "rng": torch.get_rng_state(),
                "history": history,
                "epoch": len(history),
            },
        )

    # ---- finishing ----

    def best_intact(self) -> bool:
        """Whether the best epoch's files are the ones saved (their digests); a folder written before the
        digests were recorded is taken as it is."""
        if not self.best_manifest.exists():
            return True
        try:
            digests = read_json(self.best_manifest)
            return all(file_digest(self.best_dir / name) == digest for name, digest in digests.items())
        except (OSError, ValueError):
            return False

    def commit(self, result: dict, texts: dict[str, str] | None = None) -> None:
        """Rank 0 only: move the best epoch's files into the folder (config.json last: its presence means
        the weights beside it are complete), write `texts` (e.g. report.md), then metrics.json, the mark
        of a finished run, and drop the progress."""
        if not self.best_intact():
            shutil.rmtree(self.path / PROGRESS)
            raise UserError(
                f"the best epoch's model in {self.best_dir} was damaged since it was saved, so it was "
                "dropped; rerun the same command to train this run again"
            )
        files = sorted((p for p in self.best_dir.rglob("*") if p.is_file()), key=lambda p: (p.name == CONFIG, str(p)))
        for source in files:
            copy_file(source, self.path / source.relative_to(self.best_dir))
            if file_digest(self.path / source.relative_to(self.best_dir)) != file_digest(source):
                raise UserError(
                    f"{self.path / source.relative_to(self.best_dir)} differs from the file copied into "
                    "it; check the disk, then rerun the same command"
                )
        for name, text in (texts or {}).items():
            write_text(self.path / name, text)
        write_json(self.path / METRICS, result)
        shutil.rmtree(self.path / PROGRESS)
        if self._lock is not None:  # finished: nobody writes here again
            (self.path / LOCK).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None
