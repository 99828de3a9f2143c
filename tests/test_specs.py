"""Run specs: options in, defaults filled, presets merged in the library; a run's identity is its
content (a ticket's masks, not the path of its file)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from st.errors import UserError
from st.pipeline import resolve_defaults, run_finetune
from st.runs import ADDED_SINCE_0_1, check_settings
from st.specs import DataSpec, HeldOut, ModelSpec, RunSpec, TrainConfig, run_spec
from st.sweep_config import QUICK, plan
from st.tickets import Ticket


def test_options_left_out_take_the_defaults():
    spec = run_spec("csv", epochs=2, text_columns="a,b", regression=True, seed=None)
    assert spec == RunSpec(
        DataSpec("csv", task_options=(("text_columns", "a,b"), ("regression", True))),
        ModelSpec(),
        TrainConfig(epochs=2),
    )
    assert spec.train.lr is None and spec.model.name == "minilm-l6" and spec.seed == 0
    with pytest.raises(UserError, match=r"--train-fraction must be in \(0, 1\]"):
        run_spec("csv", train_fraction=1.5)


def test_settings_keep_run_json_layout_and_read_back():
    spec = RunSpec(
        DataSpec("csv", "data", (("label_column", "y"),), 10, None, 64),
        ModelSpec("m", 0.0, 0.05, weights="ab12"),
        TrainConfig(epochs=1, lr=1e-3, precision="bf16"),
        seed=4,
        held_out=HeldOut(0.5, 200),
    )
    settings = spec.settings()
    assert list(settings) == [
        "task",
        "model",
        "data_dir",
        "task_options",
        "train_size",
        "train_fraction",
        "max_length",
        "dropout",
        "head_dropout",
        "ticket",
        "init",
        "model_weights",
        "model_files",
        "train",
        "dev_size",
        "select_fraction",
    ]
    assert settings["train"] == {
        "epochs": 1,
        "batch_size": 32,
        "lr": 1e-3,
        "warmup": 0.1,
        "weight_decay": 0.0,
        "clip": 1.0,
        "grad_accum": 1,
        "seed": 4,
        "precision": "bf16",
    }
    assert RunSpec.from_settings(json.loads(json.dumps(settings))) == spec
    # a run.json written before specs (it also held the device) still reads back
    old = {
        **settings,
        "train": {**settings["train"], "device": "cuda:1", "eval_batch_size": 128},
        "ticket": "/old/ticket.json",
    }
    assert RunSpec.from_settings(old) == spec


def test_model_dependent_defaults_follow_the_model(tiny_bert_dir):
    spec = run_spec("csv", model=str(tiny_bert_dir))
    assert resolve_defaults(spec).train.lr == 2e-4  # hidden 16 < 768
    assert resolve_defaults(spec).data.max_length == 64  # the tiny model has 64 positions, fewer than 128
    assert resolve_defaults(replace(spec, train=TrainConfig(lr=1e-3))).train.lr == 1e-3  # a given lr wins


def test_sweep_presets_merge_in_the_library(tiny_bert_dir):
    cfg, jobs = plan(quick=True)
    assert (cfg.spec.data.task, cfg.spec.data.train_size, cfg.spec.train.batch_size) == ("rotten_tomatoes", 192, 12)
    assert (cfg.ratios, cfg.seeds, cfg.held_out.dev_size, cfg.spec.train.lr) == (QUICK.ratios, 1, 200, QUICK.lr)
    cfg, _ = plan(quick=True, epochs=1, seeds=2, ratios=[0.5], jobs=1, model=str(tiny_bert_dir))  # given options win
    assert (cfg.spec.train.epochs, cfg.seeds, cfg.ratios, cfg.spec.model.name) == (1, 2, (0.5,), str(tiny_bert_dir))
    cfg, jobs = plan(task="csv", model=str(tiny_bert_dir))  # a task of one's own: no preset
    assert (cfg.spec.data.train_size, cfg.seeds, cfg.held_out, jobs, cfg.spec.train.lr) == (None, 3, HeldOut(), 1, 2e-4)
    assert cfg.control_ratios == cfg.ratios and cfg.total_runs == 3 * (1 + 3 * 8)
    cfg, _ = plan(quick=True)
    assert cfg.control_ratios == cfg.ratios == (0.3, 0.6) and cfg.total_runs == 7
    cfg, _ = plan()  # the main job: controls at three ratios
    assert (cfg.spec.data.train_size, cfg.control_ratios, cfg.total_runs) == (512, (0.1, 0.3, 0.5), 3 * (1 + 5 + 2 * 3))
    assert cfg.settings()["control_ratios"] == [0.1, 0.3, 0.5]


def test_a_run_is_its_ticket_not_the_ticket_file(tiny_bert_dir, sentiment_dir, tmp_path):
    keep_first = Ticket(((0, 1, 1, 1), (1, 1, 1, 1)), (1, 1), 0.1, "winning")
    keep_last = Ticket(((1, 1, 1, 1), (1, 1, 1, 0)), (1, 1), 0.1, "winning")
    spec = run_spec(
        "csv",
        model=str(tiny_bert_dir),
        data_dir=str(sentiment_dir),
        epochs=1,
        batch_size=16,
        lr=5e-3,
        ticket=keep_first,
    )
    first = run_finetune(spec, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["ticket"]["head_mask"] == [
        list(r) for r in keep_first.head_mask
    ]
    shutil.move(tmp_path / "run", tmp_path / "moved")  # a moved folder is the same run: finished
    assert run_finetune(spec, tmp_path / "moved") == first
    with pytest.raises(
        UserError, match=r"ticket.head_mask=\[\[0, 1, 1, 1\], \[1, 1, 1, 1\]\], not \[\[1, 1, 1, 1\], \[1, 1, 1, 0\]\]"
    ):
        run_finetune(replace(spec, model=replace(spec.model, ticket=keep_last)), tmp_path / "moved")


def test_a_run_is_its_model_weights_and_absolute_data(sentiment_dir, tmp_path, monkeypatch):
    from tests.conftest import write_tiny_bert

    model = write_tiny_bert(tmp_path / "model")
    monkeypatch.chdir(sentiment_dir.parent)  # a relative --data-dir ...
    spec = run_spec("csv", model=str(model), data_dir=sentiment_dir.name, epochs=1, batch_size=32, lr=5e-3)
    assert spec.data.data_dir == str(sentiment_dir.resolve())
    run_finetune(spec, tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # ... still works from elsewhere: st score reads the recorded data
    from st.pipeline import score_checkpoint

    assert score_checkpoint(tmp_path / "run", num_examples=16).num_examples == 16
    write_tiny_bert(model, seed=1)  # the same shapes, other weights: another run
    with pytest.raises(UserError, match=r"holds a run made with model_weights='[0-9a-f]{64}', not '[0-9a-f]{64}'"):
        run_finetune(spec, tmp_path / "run")


def test_folders_written_by_release_0_1_0_still_resume(tiny_bert_dir, sentiment_dir, tmp_path):
    """tests/data/settings_0.1.0.json holds what the 0.1.0 code wrote to run.json (single-task runs, a
    sweep's ticket run, a multi-task run) and sweep.json for the same tiny model and data: today's specs
    write exactly that, so those folders resume, and each reads back into the spec that wrote it."""
    from st.pipeline import weights_digest
    from st.sweep_config import SweepConfig

    text = (Path(__file__).parent / "data" / "settings_0.1.0.json").read_text()
    for name, value in (
        ("{MODEL}", tiny_bert_dir),
        ("{DATA}", sentiment_dir),
        ("{WEIGHTS}", weights_digest(tiny_bert_dir)),
    ):
        text = text.replace(name, str(value))
    old = json.loads(text)
    ticket = Ticket(((0, 1, 1, 1), (1, 1, 1, 1)), (1, 0), 0.3, "winning", seed=2)
    common = dict(model=str(tiny_bert_dir), data_dir=str(sentiment_dir))
    plain = resolve_defaults(run_spec("csv", **common, epochs=1, batch_size=16))
    options = resolve_defaults(
        run_spec(
            "csv",
            **common,
            text_columns="sentence",
            label_column="label",
            epochs=2,
            grad_accum=2,
            train_size=64,
            report_split="test",
            seed=3,
            precision="bf16",
            head_dropout=0.05,
        )
    )
    sweep = SweepConfig.create(
        plain, ratios=(0.3, 0.5), kinds=("winning", "random"), control_ratios=(0.5,), seeds=2, held_out=HeldOut(0.5, 40)
    )
    shared = resolve_defaults(run_spec("csv", **common, epochs=1))

    def as_0_1(settings: dict) -> dict:  # what 0.1.0 wrote: all but the keys added since (runs.ADDED_SINCE_0_1)
        if isinstance(settings, dict):
            return {k: as_0_1(v) for k, v in settings.items() if k not in ADDED_SINCE_0_1}
        return settings

    assert as_0_1(plain.settings()) == old["finetune"] and as_0_1(options.settings()) == old["finetune_options"]
    assert as_0_1(sweep.settings()) == old["sweep"]
    assert as_0_1(sweep.seed_spec(1, ticket).settings()) == old["sweep_ticket_run"]
    assert as_0_1({"tasks": {"csv": shared.settings()}, "tickets": {"csv": ticket.to_json()}}) == old["share"]
    for spec, key in (
        (plain, "finetune"),
        (options, "finetune_options"),
        (sweep.seed_spec(1, ticket), "sweep_ticket_run"),
    ):
        expected = replace(spec, model=replace(spec.model, ticket=None, files=None))  # 0.1.0 recorded no files digest
        assert RunSpec.from_settings(old[key]) == expected
    # the folder itself: a run.json of 0.1.0 is this run's, so the same command resumes (here: starts) it
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps(old["finetune"]))
    assert run_finetune(plain, tmp_path / "run")["best_epoch"] == 1
    for folder, file, settings in (("sweep", "sweep.json", sweep.settings()), ("share", "run.json", old["share"])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / file).write_text(json.dumps(old[folder]))
        current = (
            settings if folder == "sweep" else {"tasks": {"csv": shared.settings()}, "tickets": old["share"]["tickets"]}
        )
        assert check_settings(tmp_path / folder, current, file, folder)  # accepted: it resumes


@pytest.mark.parametrize("edit", ["config.json", "vocab.txt", "tokenizer_config.json"])
def test_a_run_is_its_whole_model_folder_not_only_its_weights(edit, tiny_bert_dir, sentiment_dir, tmp_path):
    """Edit the model's config.json or a tokenizer file after a run finished: the same command is
    another run (refused in that folder, naming model_files), not the old result returned as a match."""
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    spec = run_spec("csv", model=str(model), data_dir=str(sentiment_dir), epochs=1, batch_size=32)
    first = run_finetune(spec, tmp_path / "run")
    assert run_finetune(spec, tmp_path / "run") == first  # unchanged: the finished run
    path = model / edit
    if edit == "config.json":
        path.write_text(path.read_text().replace('"layer_norm_eps": 1e-12', '"layer_norm_eps": 1e-06'))
    elif edit == "vocab.txt":
        path.write_text(path.read_text() + "extra\n")
    else:
        path.write_text(json.dumps({"do_lower_case": False}))
    with pytest.raises(UserError, match=r"holds a run made with model_files="):
        run_finetune(spec, tmp_path / "run")
