"""The three logging backends behind `st.tracking.Tracker`, each written against its library's own API:
TensorBoard (torch's `SummaryWriter`), W&B (`wandb.init` / `run.log`), MLflow (`MlflowClient`).

Each has `name`, `id` (what resumes its log, kept in the run folder), `step(step, metrics)`,
`summary(values)`, `flush()` (at each epoch's end, so that a killed run keeps its finished epochs) and
`close(failed)`; each is built from the run's `st.tracking.Tracking` (which imports this module, so
the type is not named here). The libraries load only when a backend is built.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path


def flat_params(settings: dict, prefix: str = "") -> dict[str, str]:
    """run.json's settings as flat string params (`train.lr`), what MLflow's params and TensorBoard's text take."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, str) else json.dumps(value)
    return flat


class TensorBoard:
    name = "tensorboard"
    id = None  # the folder is the log: nothing to remember

    def __init__(self, tracking, folder: Path, name: str, settings: dict, start_step: int, _):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: the steps an interrupted session logged past the last finished epoch are redone now,
        # so TensorBoard drops them and the resumed run stays one continuous curve
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step + 1)
        if start_step == 0:
            tags = "".join(f"- {k}: {v}\n" for k, v in tracking.tags)
            params = "\n".join(f"    {k} = {v}" for k, v in flat_params(settings).items())
            self.writer.add_text("settings", f"{name}\n\n{tags}\n{params}")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, 0)

    def flush(self) -> None:
        # events wait in a queue for the writer's thread, and on TensorFlow's or a remote file system in a
        # buffer flushed every 2 minutes: a kill in between would lose finished epochs
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB:
    name = "wandb"

    def __init__(self, tracking, folder: Path, name: str, settings: dict, start_step: int, run_id):
        import wandb

        self.id = run_id or uuid.uuid4().hex[:12]  # W&B ids are [a-z0-9]; ours so that a resume can reuse it
        root = Path(tracking.root or folder)
        root.mkdir(parents=True, exist_ok=True)
        tags = dict(tracking.tags)
        self.run = wandb.init(
            id=self.id,
            resume="allow",  # the same id again continues the run's log
            name=name,
            group=tracking.group,
            job_type=tags.get("kind") or ("summary" if tracking.group else "finetune"),
            tags=[f"{k}={v}" for k, v in tracking.tags],
            config={**settings, **tags},
            dir=str(root),
            reinit="create_new",  # a sweep's in-process runs follow one another in one process
        )

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def flush(self) -> None:
        pass  # run.log hands each record to W&B's service process at once; W&B has no flush to call

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    name = "mlflow"

    def __init__(self, tracking, folder: Path, name: str, settings: dict, start_step: int, run_id):
        import mlflow
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_URI
        from mlflow.tracking import MlflowClient

        uri = MLFLOW_TRACKING_URI.get() if MLFLOW_TRACKING_URI.defined else None
        if uri is None:
            # no tracking server given: a file store beside the runs (mlflow-skinny has no database store)
            uri = (Path(tracking.root or folder).resolve() / "mlruns").as_uri()
            _allow_file_store()
        self.client, self.entities = MlflowClient(tracking_uri=uri), mlflow.entities
        self.uri = uri
        if run_id is not None and self._exists(run_id):
            self.id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = MLFLOW_EXPERIMENT_NAME.get() if MLFLOW_EXPERIMENT_NAME.defined else "st"
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            tags = dict(tracking.tags) | ({"mlflow.parentRunId": tracking.parent} if tracking.parent else {})
            if tracking.group:
                tags["group"] = tracking.group
            self.id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            params = [self.entities.Param(k, v[:6000]) for k, v in flat_params(settings).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.id, params=params[i : i + 100])
        # the steps and epochs this run already holds (an interrupted session logged them): not logged twice
        self.logged = {
            key: max((m.step for m in self.client.get_metric_history(self.id, key)), default=0)
            for key in ("train/loss", "epoch")
        }

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001  another store, or a deleted run: start a new one
            return False
        return True

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.logged["epoch" if "epoch" in metrics else "train/loss"]:
            return
        stamp = int(time.time() * 1000)
        batch = [self.entities.Metric(k, v, stamp, step) for k, v in metrics.items()]
        self.client.log_batch(self.id, metrics=batch)

    def summary(self, values: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[self.entities.Metric(k, v, stamp, 0) for k, v in values.items()])

    def flush(self) -> None:
        pass  # log_batch writes synchronously

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.id, status="FAILED" if failed else "FINISHED")


def _allow_file_store() -> None:
    """MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set; the store we chose is one on
    purpose (the light mlflow-skinny has no database store), so say so, for this process only."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


OPEN = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
