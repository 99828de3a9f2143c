"""`--log-to tensorboard,wandb,mlflow`: each log read back with its library's own reader, offline:
TensorBoard's `EventAccumulator`, `MlflowClient` on a file store, and W&B's offline run files through
`wandb leet inspect --json`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from st.pipeline import run_finetune
from st.specs import run_spec
from st.tracking import Tracker, Tracking, open_tracker
from tests.conftest import Interrupt, stop_at_epoch

pytestmark = pytest.mark.usefixtures("one_thread", "offline_trackers")

EPOCHS, STEPS = 3, 4  # 64 examples, batch 16


@pytest.fixture
def offline_trackers(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def needs(*libraries: str) -> None:
    """Skip unless the trackers' libraries are installed (the st[tensorboard,wandb,mlflow] extras)."""
    for name in libraries:
        pytest.importorskip(name)


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_runs(store: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("st")
    return client, client.search_runs([experiment.experiment_id])


def wandb_records(root: Path) -> list[dict]:
    """Every record of every offline run under root/wandb, as W&B's own inspector prints them."""
    records = []
    for path in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        wandb_cli = Path(sys.executable).with_name("wandb")
        out = subprocess.run(
            [str(wandb_cli), "leet", "inspect", "--json", str(path)], capture_output=True, text=True, check=True
        )
        records += [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return records


def spec(tiny_bert_dir, sentiment_dir):
    return run_spec(
        "csv",
        model=str(tiny_bert_dir),
        data_dir=str(sentiment_dir),
        train_size=64,
        epochs=EPOCHS,
        batch_size=16,
        lr=1e-3,
        seed=3,
    )


def test_finetune_logs_steps_epochs_and_settings_to_all_three(tmp_path, tiny_bert_dir, sentiment_dir):
    needs("tensorboard", "wandb", "mlflow")
    out = tmp_path / "run"
    args = ["finetune", "--task", "csv", "--data-dir", sentiment_dir, "--model", tiny_bert_dir, "--train-size", 64]
    args += ["--epochs", EPOCHS, "--batch-size", 16, "--lr", 1e-3, "--log-to", "tensorboard,mlflow", "--log-to"]
    args += ["wandb", "--out", out]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    dev = [e["dev"]["accuracy"] for e in metrics["epochs"]]
    epoch_ends = [STEPS * (i + 1) for i in range(EPOCHS)]

    tb = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == list(range(1, EPOCHS * STEPS + 1))
    assert {"train/lr", "train/grad_norm"} <= set(tb)
    assert tb["dev/accuracy"] == [(s, pytest.approx(v)) for s, v in zip(epoch_ends, dev)]

    client, runs = mlflow_runs(out / "mlruns")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "dev/accuracy")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(v)) for s, v in zip(epoch_ends, dev)]
    params = runs[0].data.params
    assert params["task"] == "csv" and float(params["train.lr"]) == 1e-3 and params["train.seed"] == "0"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/grad_norm")) == EPOCHS * STEPS

    records = wandb_records(out)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged_dev = [h["dev/accuracy"] for h in history if "dev/accuracy" in h]
    assert logged_dev == pytest.approx(dev)
    assert len([h for h in history if "train/loss" in h]) == EPOCHS * STEPS
    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["config"]["update"]["task"] == "csv"
    ids = json.loads((out / "tracking.json").read_text())
    assert run_record["run_id"] == ids["wandb"] and ids["mlflow"] == runs[0].info.run_id


def test_a_killed_and_resumed_run_has_one_continuous_log(tmp_path, tiny_bert_dir, sentiment_dir):
    needs("tensorboard", "wandb", "mlflow")
    out, s = tmp_path / "run", spec(tiny_bert_dir, sentiment_dir)
    tracking = Tracking(("tensorboard", "mlflow", "wandb"), root=str(tmp_path))
    with pytest.raises(Interrupt):  # stopped once epoch 2 is evaluated, before its progress is saved
        run_finetune(s, out, on_epoch=stop_at_epoch(2), tracking=tracking)
    first_ids = json.loads((out / "tracking.json").read_text())
    metrics = run_finetune(s, out, tracking=tracking)
    assert json.loads((out / "tracking.json").read_text()) == first_ids
    dev = [e["dev"]["accuracy"] for e in metrics["epochs"]]

    tb = tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in tb["train/loss"]] == list(range(1, EPOCHS * STEPS + 1))
    assert [v for _, v in tb["dev/accuracy"]] == pytest.approx(dev)

    client, runs = mlflow_runs(tmp_path / "mlruns")
    assert len(runs) == 1 and runs[0].info.run_id == first_ids["mlflow"]
    steps = [m.step for m in client.get_metric_history(first_ids["mlflow"], "train/loss")]
    assert sorted(steps) == list(range(1, EPOCHS * STEPS + 1))
    assert [m.value for m in client.get_metric_history(first_ids["mlflow"], "dev/accuracy")] == pytest.approx(dev)

    # W&B offline keeps one file per session; both carry the one run id, and the second resumes it
    runs = [r["run"] for r in wandb_records(tmp_path) if r["type"] == "run"]
    assert len(runs) == 2 and {r["run_id"] for r in runs} == {first_ids["wandb"]}


def test_a_failing_tracker_is_one_warning_and_training_goes_on(tmp_path, tiny_bert_dir, sentiment_dir, caplog):
    class Broken:
        name, id = "broken", None

        def step(self, step, metrics):
            raise RuntimeError("disk full")

        def summary(self, values):
            pass

        def close(self, failed):
            pass

    tracker = Tracker([Broken()])
    tracker.step(1, {"loss": 1.0})
    tracker.step(2, {"loss": 1.0})
    assert tracker.backends == [] and len([r for r in caplog.records if "broken logging failed" in r.message]) == 1
    # a tracking URI nobody can reach: a warning, and the run finishes with its metrics
    needs("mlflow")
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "unsupported-scheme://nowhere")
        metrics = run_finetune(spec(tiny_bert_dir, sentiment_dir), out, tracking=Tracking(("mlflow",), root=str(out)))
    assert metrics["best_epoch"] >= 1 and any("mlflow logging could not start" in r.message for r in caplog.records)


def test_only_rank_0_logs(tmp_path, monkeypatch):
    needs("tensorboard")
    from st import dist

    monkeypatch.setattr(dist, "is_main", lambda: False)
    assert open_tracker(Tracking(("tensorboard",)), tmp_path).backends == []
    assert not (tmp_path / "tensorboard").exists()


def test_a_missing_library_says_how_to_install_it(tmp_path, monkeypatch, sentiment_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = CliRunner().invoke(
        cli,
        ["finetune", "--task", "csv", "--data-dir", str(sentiment_dir), "--log-to", "wandb", "--out", str(tmp_path)],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--log-to wandb needs the wandb library; install it: pip install 'st[wandb]'" in result.output
    result = CliRunner().invoke(cli, ["finetune", "--task", "csv", "--log-to", "neptune", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "'neptune' is not one of tensorboard, wandb, mlflow" in result.output


def test_no_wandb_binary_needed_for_the_rest(tmp_path):
    needs("wandb")
    assert shutil.which("wandb", path=str(Path(sys.executable).parent))  # the inspector the tests read W&B with


def test_a_sweep_logs_each_run_tagged_and_its_summary(tmp_path, tiny_bert_dir, sentiment_dir):
    needs("tensorboard", "wandb", "mlflow")
    from st.select import select_super_ticket
    from st.specs import DataSpec, HeldOut, ModelSpec, RunSpec, TrainConfig
    from st.sweep import run_sweep
    from st.sweep_config import SweepConfig

    spec = RunSpec(
        DataSpec("csv", str(sentiment_dir), train_size=48),
        ModelSpec(str(tiny_bert_dir), dropout=0.0, head_dropout=0.0),
        TrainConfig(epochs=1, batch_size=16, lr=5e-3),
    )
    cfg = SweepConfig.create(spec, ratios=(0.5,), kinds=("winning",), seeds=2, held_out=HeldOut(0.5, None, None))
    out = tmp_path / "sweep"
    run_sweep(cfg, out, tracking=Tracking(("tensorboard", "mlflow", "wandb"), root=str(out)))

    client, runs = mlflow_runs(out / "mlruns")
    parent = next(r for r in runs if r.info.run_name == "sweep summary")
    children = [r for r in runs if r is not parent]
    assert {(r.data.tags["seed"], r.data.tags["kind"], r.data.tags["ratio"]) for r in children} == {
        (seed, kind, ratio) for seed in ("0", "1") for kind, ratio in (("full", "0.0"), ("winning", "0.5"))
    }
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert "super_ticket/ratio" in parent.data.metrics and "super_ticket/difference" in parent.data.metrics
    chosen = select_super_ticket(json.loads((out / "results.json").read_text()))
    assert parent.data.metrics["super_ticket/ratio"] == chosen.ratio
    assert parent.data.metrics["super_ticket/difference"] == pytest.approx(chosen.gain or 0.0)

    assert "super_ticket/ratio" in tensorboard_scalars(out / "tensorboard")
    assert "dev/accuracy" in tensorboard_scalars(out / "seed1" / "winning-r0.50" / "run" / "tensorboard")
    starts = [r["run"] for r in wandb_records(out) if r["type"] == "run"]
    assert len(starts) == 5 and {r["run_group"] for r in starts} == {"sweep"}
    assert sum("seed=1" in r.get("tags", []) and "kind=winning" in r.get("tags", []) for r in starts) == 1


def test_each_epoch_is_flushed_before_its_progress_is_saved(tmp_path, tiny_bert_dir, sentiment_dir, monkeypatch):
    """A kill after an epoch's progress is saved must not lose that epoch's log: the backends flush at the
    epoch's end, before the loop saves its progress (TensorBoard's writer holds events in a queue, and on
    TensorFlow's or a remote file system, in a buffer, until a flush or two minutes)."""
    needs("tensorboard")
    from st import trackers
    from st.layout import PROGRESS, STATE

    out, calls = tmp_path / "run", []

    class Watched(trackers.TensorBoard):
        def step(self, step, metrics):
            calls.append(("step", step, "dev/accuracy" in metrics))
            super().step(step, metrics)

        def flush(self):
            super().flush()
            logged = tensorboard_scalars(out / "tensorboard").get("dev/accuracy", [])
            calls.append(("flush", (out / PROGRESS / STATE).exists(), [s for s, _ in logged]))

    monkeypatch.setitem(trackers.OPEN, "tensorboard", Watched)
    s = run_spec("csv", model=str(tiny_bert_dir), data_dir=str(sentiment_dir), train_size=16, batch_size=16, lr=1e-3)
    with pytest.raises(Interrupt):  # stopped once epoch 2 is logged and flushed, before its progress is saved
        run_finetune(s, out, tracking=Tracking(("tensorboard",)), on_epoch=stop_at_epoch(2))  # 1 step per epoch
    flushes = [(i, c) for i, c in enumerate(calls) if c[0] == "flush"]
    assert [c for _, c in flushes] == [("flush", False, [1]), ("flush", True, [1, 2])]  # epoch 2: epoch 1's state
    assert all(calls[i - 1] == ("step", epoch, True) for epoch, (i, _) in enumerate(flushes, 1))
