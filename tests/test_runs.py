"""The run folder: the settings guard, the best epoch's commit, the finished mark."""

from __future__ import annotations

import json
import os

import pytest
import torch

from st.errors import UserError
from st.runs import PROGRESS, RunFolder, flatten, guard_settings

SETTINGS = {"task": "csv", "train": {"lr": 0.001, "epochs": 2}, "ticket": None}


def test_flatten_names_nested_settings():
    assert flatten({"a": 1, "train": {"lr": 2, "opt": {"b": 3}}, "empty": {}}) == {
        "a": 1,
        "train.lr": 2,
        "train.opt.b": 3,
        "empty": {},
    }


def test_a_new_folder_records_its_settings_and_other_settings_are_refused(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.check(SETTINGS) is None and not list((tmp_path / "run").iterdir())  # checking leaves the folder empty
    run.claim(SETTINGS)
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == SETTINGS
    assert run.check(SETTINGS) is None  # the same run again: resume
    with pytest.raises(UserError, match=r"holds a run made with train.lr=0.001, not 0.002; use another --out"):
        run.check({**SETTINGS, "train": {"lr": 0.002, "epochs": 2}})
    with pytest.raises(UserError, match=r"ticket=None, not \[1, 0\]"):  # a setting that appears is named too
        run.check({**SETTINGS, "ticket": [1, 0]})


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no st sweep"):
        guard_settings(tmp_path, SETTINGS, "sweep.json", "sweep")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "sweep.json").exists()


def test_progress_round_trips_model_optimizer_schedule_and_rng(tmp_path):
    def parts():
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adamax(model.parameters(), lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))

    run = RunFolder(tmp_path)
    model, optimizer, schedule = parts()
    assert run.load_progress(model, optimizer, schedule, "cpu") == []  # a new run
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step(), schedule.step()
    torch.manual_seed(7)
    run.save_progress(model, optimizer, schedule, [{"epoch": 1}])
    expected = torch.rand(3)

    again, optimizer2, schedule2 = parts()
    assert run.load_progress(again, optimizer2, schedule2, "cpu") == [{"epoch": 1}]
    assert torch.equal(again.weight, model.weight) and schedule2.last_epoch == 1
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected)  # the RNG continues where the epoch left it


def test_commit_moves_the_best_files_and_marks_the_run_finished(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.claim(SETTINGS)
    assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())
    (run.best_dir / "tickets").mkdir(parents=True)
    (run.best_dir / "model.safetensors").write_bytes(b"weights")
    (run.best_dir / "config.json").write_text("{}")
    (run.best_dir / "tickets" / "a.json").write_text("[1]")
    run.commit({"dev": {"accuracy": 0.75}}, {"report.md": "# done\n"})

    folder = tmp_path / "run"
    assert (folder / "model.safetensors").read_bytes() == b"weights" and (
        folder / "tickets" / "a.json"
    ).read_text() == "[1]"
    assert (folder / "report.md").read_text() == "# done\n" and not (folder / PROGRESS).exists()
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
        "report.md",
        "run.json",
        "tickets",
    ]  # no temporary file left
    assert run.check(SETTINGS) == {"dev": {"accuracy": 0.75}}  # finished: its metrics, nothing to do


def test_one_writer_per_folder_and_the_lock_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    from st.runs import lock_folder

    held = lock_folder(tmp_path)
    with pytest.raises(UserError, match=f"is being written by process {os.getpid()}; wait for it to finish"):
        RunFolder(tmp_path).claim(SETTINGS)
    assert not (tmp_path / "run.json").exists()
    held.close()
    # a process killed while holding the lock leaves the file but not the lock
    code = (
        "from pathlib import Path; from st.runs import lock_folder; import os; "
        f"h = lock_folder(Path({str(tmp_path)!r})); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    RunFolder(tmp_path).claim(SETTINGS)
    assert (tmp_path / "run.json").exists()
