"""Experiment tracking (`--log-to tensorboard,wandb,mlflow`): every run's optimizer steps (loss, learning
rate, gradient norm) and epochs (dev metrics), its settings as config/params, and a sweep's summary,
each through the library's own API (`st[tensorboard]`, `st[wandb]`, `st[mlflow]`).

The training loop calls one `Tracker`; it fans out to the backends. Logging never breaks a run: a
backend that fails is one warning line and is dropped, training goes on. Only rank 0 logs. Where each
run's log goes:
  tensorboard   <run folder>/tensorboard/ (`tensorboard --logdir` a sweep folder shows every run)
  wandb         W&B's own settings (WANDB_PROJECT, WANDB_MODE, ...), files under <root>/wandb/
  mlflow        MLFLOW_TRACKING_URI, else a file store in <root>/mlruns; experiment MLFLOW_EXPERIMENT_NAME,
                else "st"
A run's W&B id and MLflow run id are kept in its folder (`TRACKING`), so a resumed run continues its log:
W&B resumes the id, MLflow logs into the same run and skips the steps it already holds, TensorBoard
purges the steps the interrupted session logged beyond the last finished epoch.

Steps are global optimizer steps (epoch × steps per epoch + step); dev metrics are logged at the
step that ends their epoch, so both share one axis and a resumed run's steps line up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from st import dist, trackers
from st.errors import UserError
from st.io import read_json, write_json
from st.layout import RUN_SETTINGS

log = logging.getLogger("st")

BACKENDS = ("tensorboard", "wandb", "mlflow")
TRACKING = "tracking.json"  # in a run folder: the W&B id and MLflow run id, to continue the log on resume
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@dataclass(frozen=True)
class Tracking:
    """What a run logs to and how it is known there; no part of the run's settings (logging changes no result)."""

    to: tuple[str, ...] = ()
    root: str | None = None  # the command's --out: where W&B's files and a default MLflow store go
    name: str | None = None  # the run's name there (default: its folder's), e.g. a sweep's seed0/winning-r0.30
    group: str | None = None  # a sweep's name: the W&B group, a "group" tag on MLflow runs
    tags: tuple[tuple[str, str], ...] = ()  # e.g. seed, kind and ratio of a sweep's run
    parent: str | None = None  # the MLflow run id of the sweep that holds this run

    def for_run(self, name: str, **tags) -> Tracking:
        return replace(self, name=name, tags=self.tags + tuple((k, str(v)) for k, v in tags.items()))


def check_installed(to) -> None:
    """Before any run starts: each backend's library is importable, or one line saying how to install it."""
    import importlib.util

    for name in to:
        if name not in BACKENDS:
            raise UserError(f"--log-to {name!r} is not one of {', '.join(BACKENDS)}")
        if importlib.util.find_spec(MODULES[name]) is None:
            raise UserError(f"--log-to {name} needs the {MODULES[name]} library; install it: pip install 'st[{name}]'")


@dataclass
class Tracker:
    """The training loop's one logging object: `step`, `epoch`, `summary`, `close`; a no-op when empty."""

    backends: list = field(default_factory=list)

    def _each(self, what: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, what)(*args)
            except Exception as e:  # noqa: BLE001  a tracker must never stop training
                log.warning(
                    "%s logging failed (%s: %s); training goes on without it", backend.name, type(e).__name__, e
                )
                self.backends.remove(backend)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self._each("step", step, {f"train/{k}": float(v) for k, v in metrics.items()})

    def epoch(self, step: int, epoch: int, metrics: dict) -> None:
        values = {f"dev/{k}": float(v) for k, v in _numbers(metrics).items()}
        self._each("step", step, {"epoch": float(epoch), **values})
        self._each("flush")  # before the loop saves the epoch's progress: a killed run keeps its finished epochs

    def summary(self, values: dict) -> None:
        self._each("summary", _numbers(values))

    def close(self, failed: bool = False) -> None:
        self._each("close", failed)
        self.backends = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.close(failed=kind is not None)


def _numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict, flattened with "/" (a multi-task record's per-task metrics)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def open_tracker(
    tracking: Tracking | None, folder: str | Path, start_step: int = 0, settings: dict | None = None
) -> Tracker:
    """The tracker of the run in `folder` (its settings: run.json's unless given), on rank 0; an empty one
    elsewhere or when nothing is tracked. `start_step`: the optimizer steps its finished epochs already made."""
    tracker = Tracker()
    if tracking is None or not tracking.to or not dist.is_main():
        return tracker
    folder = Path(folder)
    if settings is None:
        settings = read_json(folder / RUN_SETTINGS) if (folder / RUN_SETTINGS).is_file() else {}
    ids = read_json(folder / TRACKING) if (folder / TRACKING).is_file() else {}
    name = tracking.name or folder.name
    for kind in tracking.to:
        try:
            backend = trackers.OPEN[kind](tracking, folder, name, settings, start_step, ids.get(kind))
        except Exception as e:  # noqa: BLE001  one warning line, and the run goes on
            log.warning("%s logging could not start (%s: %s); training goes on without it", kind, type(e).__name__, e)
            continue
        tracker.backends.append(backend)
        ids[kind] = backend.id
    if any(ids.values()):
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / TRACKING, {k: v for k, v in ids.items() if v})
    return tracker
