"""`st sweep` end to end on a tiny model: a killed sweep resumes and skips finished runs, a crashed run
is recorded while the rest go on, the super ticket is chosen on the selection part only, the report
and plot are written (and re-rendered by `st report`), and bad input is one clear line."""

from __future__ import annotations

import csv
import errno
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import st.pipeline as pipeline
import st.sweep as sweep
from cli.main import cli
from st.errors import UserError
from st.pipeline import dev_parts
from st.report import render
from st.select import select_super_ticket
from st.specs import DataSpec, ModelSpec, RunSpec, TrainConfig
from st.sweep import run_sweep
from st.sweep_config import SweepConfig
from st.tickets import Ticket

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def config(model, data, *, seeds=2, ratios=(0.2, 0.5), kinds=("winning", "random", "losing"), epochs=2) -> SweepConfig:
    spec = RunSpec(
        DataSpec("csv", str(data)),
        ModelSpec(str(model), dropout=0.0, head_dropout=0.0),
        TrainConfig(epochs=epochs, batch_size=8, lr=5e-3),
    )
    return SweepConfig.create(spec, ratios=ratios, kinds=kinds, seeds=seeds)


def st(*args, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    assert "Traceback" not in result.output
    return result.output


class Killed(BaseException):
    """Stands for Ctrl-C or a killed process: nothing a run could catch and record."""


@pytest.fixture(scope="module")
def swept(tiny_bert_dir, sentiment_dir, tmp_path_factory):
    """2 seeds x (full + 2 ratios x 3 kinds): killed after 5 runs, one of which crashed, then resumed."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    cfg = config(tiny_bert_dir, sentiment_dir)
    patch = pytest.MonkeyPatch()
    real_run = sweep.run_finetune

    def crash_one(job, folder, **kw):
        if job.seed == 0 and "random-r0.20" in str(folder):
            raise RuntimeError("boom")
        return real_run(job, folder, **kw)

    seen = []

    def kill_after_five(record):
        seen.append(record)
        if len(seen) == 5:
            raise Killed

    patch.setattr(sweep, "run_finetune", crash_one)
    with pytest.raises(Killed):
        run_sweep(cfg, out, on_result=kill_after_five)
    patch.undo()
    partial = json.loads((out / "results.json").read_text())
    stamps = {
        r["run"]: (out / r["run"] / "model.safetensors").stat().st_mtime_ns for r in partial["runs"] if not r["error"]
    }

    trained, real_finetune = [], pipeline.finetune
    patch.setattr(pipeline, "finetune", lambda *a, **k: trained.append(a[5].path) or real_finetune(*a, **k))
    resumed = []
    doc = run_sweep(cfg, out, keep_weights="all", on_result=resumed.append)
    patch.undo()
    render(out)
    return SimpleNamespace(out=out, cfg=cfg, doc=doc, partial=partial, stamps=stamps, trained=trained, resumed=resumed)


def test_killed_sweep_resumes_skipping_finished_runs_and_recording_the_crash(swept):
    runs = [(r["seed"], r["kind"], r["ratio"]) for r in swept.partial["runs"]]
    assert runs == [(0, "full", 0.0), (0, "winning", 0.2), (0, "winning", 0.5), (0, "random", 0.2), (0, "random", 0.5)]
    crashed = [r for r in swept.partial["runs"] if r["error"]]
    assert [r["error"] for r in crashed] == ["RuntimeError: boom"] and crashed[0]["report"] is None
    # the run after the crash went on; the kill left results.json complete up to it
    assert swept.partial["runs"][4]["error"] is None and swept.partial["runs"][4]["report"] is not None

    finished = {swept.out / run for run in swept.stamps}
    assert len(finished) == 4 and not finished & set(swept.trained)  # never retrained ...
    for run, stamp in swept.stamps.items():  # ... nor rewritten
        assert (swept.out / run / "model.safetensors").stat().st_mtime_ns == stamp
    assert (
        len(swept.trained) == 14 - 4 and swept.out / "seed0/random-r0.20/run" in swept.trained
    )  # the crashed one is retried
    assert sorted(str(Path(r["run"])) for r in swept.resumed if r["reused"]) == sorted(swept.stamps)
    assert len(swept.doc["runs"]) == 14 and not any(r["error"] for r in swept.doc["runs"])


def test_results_report_plot_and_super_ticket(swept):
    out, doc = swept.out, json.loads((swept.out / "results.json").read_text())
    assert doc == swept.doc and doc["task"] == "csv" and doc["main_metric"] == "accuracy"
    assert doc["settings"] == json.loads((out / "sweep.json").read_text())
    percent = {}
    for r in doc["runs"]:
        assert set(r["selection"]) == set(r["report"]) == {"accuracy", "f1"}
        assert r["best_epoch"] in (1, 2) and r["seconds"] > 0 and r["error"] is None
        percent.setdefault(r["ratio"], set()).add(round(r["percent_remaining"]["model"], 6))
        metrics = json.loads((out / r["run"] / "metrics.json").read_text())
        assert metrics["dev"] == r["selection"] and metrics["report"] == r["report"]
        assert metrics["dev_examples"] == metrics["report_examples"] == 24  # the 48 dev rows, halved
    assert all(len(p) == 1 for p in percent.values())  # every kind and seed prunes the same amount at a ratio
    assert percent[0.0] == {100.0} and 100 > min(percent[0.2]) > min(percent[0.5])
    for seed in (0, 1):
        assert (out / f"seed{seed}" / "scores.json").exists() and (out / f"seed{seed}" / "scores.png").exists()
        for kind in ("winning", "random", "losing"):
            ticket = Ticket.load(out / f"seed{seed}" / f"{kind}-r0.50" / "ticket.json")
            assert (ticket.kind, ticket.ratio, ticket.seed, ticket.heads_pruned) == (kind, 0.5, seed, 4)

    selection = select_super_ticket(doc)
    best = max(c["mean"] for c in selection.candidates)
    assert selection.candidates[0]["mean"] == best and (selection.kind, selection.ratio) == (
        selection.candidates[0]["kind"],
        selection.candidates[0]["ratio"],
    )
    chosen = json.loads((out / "super_ticket.json").read_text())
    ticket = Ticket.load(out / "super_ticket.json")  # a loadable ticket file (st share takes it)
    assert (ticket.kind, ticket.ratio) == (selection.kind, selection.ratio) and chosen["task"] == "csv"
    assert set(chosen["report"]["per_seed"]) == {"0", "1"} and chosen["full_model"]["report"]["per_seed"]
    if selection.kind == "winning":
        diffs = [selection.report[s] - selection.full_report[s] for s in (0, 1)]
        assert chosen["gain"] == pytest.approx(sum(diffs) / 2)

    report = (out / "report.md").read_text()
    for text in (
        "## Phase transition: report part",
        "## Phase transition: selection part",
        "## Super ticket",
        "| 0.5 |",
        "| 0 (full) | 100.0 |",
    ):
        assert text in report, text
    assert "**" in report and (selection.p_value is None or f"p = {selection.p_value:.3g}" in report)
    assert (out / "phase.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command_rerenders_from_results(swept):
    before = {name: (swept.out / name).read_bytes() for name in ("report.md", "super_ticket.json")}
    for name in ("report.md", "super_ticket.json", "phase.png"):
        (swept.out / name).unlink()
    output = st("report", swept.out)
    assert "accuracy on the report part" in output and "super ticket:" in output
    assert all((swept.out / name).read_bytes() == content for name, content in before.items())
    assert (swept.out / "phase.png").stat().st_size > 0
    assert "does not exist" in st("report", swept.out / "seed0", ok=False)


def test_parallel_jobs_give_the_same_runs(swept, tiny_bert_dir, sentiment_dir, tmp_path):
    doc = run_sweep(
        config(tiny_bert_dir, sentiment_dir, seeds=1, ratios=(0.5,), kinds=("winning",)), tmp_path / "par", jobs=2
    )
    sequential = {(r["seed"], r["kind"], r["ratio"]): r for r in swept.doc["runs"]}
    assert len(doc["runs"]) == 2
    for r in doc["runs"]:
        twin = sequential[r["seed"], r["kind"], r["ratio"]]
        assert r["error"] is None and (r["selection"], r["report"]) == (twin["selection"], twin["report"])


# ---- selection on the selection part only ------------------------------------------------------


def test_dev_parts_split_the_dev_sample_by_seed():
    select, report = dev_parts(48, 0, None, 0.5)
    assert len(select) == len(report) == 24 and sorted(select + report) == list(range(48))
    assert dev_parts(48, 0, None, 0.5) == (select, report) and dev_parts(48, 1, None, 0.5) != (select, report)
    select, report = dev_parts(48, 0, 20, 0.25)
    assert (len(select), len(report)) == (5, 15) and not set(select) & set(report)
    with pytest.raises(UserError, match="at least one example"):
        dev_parts(1, 0, None, 0.5)


def test_report_labels_never_change_the_choice(tiny_bert_dir, sentiment_dir, tmp_path):
    """Flip every label of the report part: the epochs, the selection scores and the super ticket stay
    the same, while the report scores turn into their complements."""
    flipped = tmp_path / "flipped"
    shutil.copytree(sentiment_dir, flipped)
    with open(sentiment_dir / "dev.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    _, report = dev_parts(len(rows), 0, None, 0.5)
    for i in report:
        rows[i][1] = {"pos": "neg", "neg": "pos"}[rows[i][1]]
    with open(flipped / "dev.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])

    docs = [
        run_sweep(config(tiny_bert_dir, data, seeds=1, kinds=("winning",)), tmp_path / f"sweep-{name}")
        for name, data in (("original", sentiment_dir), ("flipped", flipped))
    ]
    for a, b in zip(docs[0]["runs"], docs[1]["runs"]):
        assert (a["selection"], a["best_epoch"]) == (b["selection"], b["best_epoch"])
        assert b["report"]["accuracy"] == pytest.approx(1 - a["report"]["accuracy"])
    chosen = [select_super_ticket(doc) for doc in docs]
    assert (chosen[0].kind, chosen[0].ratio) == (chosen[1].kind, chosen[1].ratio)


# ---- failures and bad input ---------------------------------------------------------------------


def test_crashed_run_is_reported_and_the_exit_code_says_so(tiny_bert_dir, sentiment_dir, tmp_path, monkeypatch):
    real = sweep.run_finetune
    monkeypatch.setattr(
        sweep,
        "run_finetune",
        lambda job, folder, **k: (
            (_ for _ in ()).throw(RuntimeError("boom")) if "winning" in str(folder) else real(job, folder, **k)
        ),
    )
    out = st(
        "sweep",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--epochs",
        1,
        "--batch-size",
        8,
        "--ratios",
        "0.5",
        "--kinds",
        "winning,random",
        "--seeds",
        1,
        "--device",
        "cpu",
        "--out",
        tmp_path / "s",
        ok=False,
    )
    assert "1 of 3 runs failed" in out and "RuntimeError: boom" in out
    runs = json.loads((tmp_path / "s" / "results.json").read_text())["runs"]
    assert [r["error"] is not None for r in runs] == [False, True, False]  # full, winning (crashed), random
    assert "## Failed runs" in (tmp_path / "s" / "report.md").read_text() and (tmp_path / "s" / "phase.png").exists()
    assert json.loads((tmp_path / "s" / "super_ticket.json").read_text())["kind"] == "full"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratios", ""], "--ratios is empty"),
        (["--ratios", "0.2,1.0"], "must each be in [0, 1)"),
        (["--ratios=-0.1"], "must each be in [0, 1)"),
        (["--ratios", "0.2,x"], "comma-separated numbers"),
        (["--kinds", "winning,lucky"], "--kinds must be among winning, random, losing"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--select-fraction", "1"], "--select-fraction must be in (0, 1)"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (
            ["--train-size", "100000"],
            "--train-size 100000",
        ),  # found by the full run, but checked before anything is written
        (["--max-length", "100"], "--max-length 100 is more than the 64 positions"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tiny_bert_dir, sentiment_dir, tmp_path):
    out = st(
        "sweep",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--device",
        "cpu",
        "--out",
        tmp_path / "s",
        *args,
        ok=False,
    )
    assert message in out and out.strip().startswith("Error:") and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "sweep.json").exists()  # so the corrected command may use the same --out


def test_folder_of_another_sweep_is_refused_naming_the_setting(swept, tiny_bert_dir, sentiment_dir, tmp_path):
    def args(**changes):  # the fixture's sweep through the CLI, with `changes` to its options
        options = {
            "--task": "csv",
            "--data-dir": sentiment_dir,
            "--model": tiny_bert_dir,
            "--epochs": 2,
            "--batch-size": 8,
            "--lr": 5e-3,
            "--dropout": 0,
            "--head-dropout": 0,
            "--seeds": 2,
            "--ratios": "0.2,0.5",
            "--device": "cpu",
            "--out": swept.out,
            **{f"--{k.replace('_', '-')}": v for k, v in changes.items()},
        }
        return ["sweep", *(x for pair in options.items() for x in pair)]

    out = st(*args(lr=1e-3), ok=False)
    assert "job.train.lr=0.005, not 0.001" in out and len(out.strip().splitlines()) == 1
    assert "ratios=[0.2, 0.5], not [0.3]" in st(*args(ratios="0.3"), ok=False)
    (tmp_path / "notes.txt").write_text("mine")
    assert "holds no st sweep" in st(*args(out=tmp_path), ok=False)


def test_full_disk_leaves_the_previous_results_intact(swept, monkeypatch):
    results = swept.out / "results.json"
    before = results.read_bytes()
    real_write = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name.startswith(".results.json."):  # st.io's temporary file: half of it fits, then the disk is full
            real_write(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(UserError, match="No space left on device.*rerun the same command"):
        run_sweep(swept.cfg, swept.out)
    assert results.read_bytes() == before and json.loads(before)["runs"]
    assert not list(swept.out.glob(".results.json.*"))  # no partial file left behind


# ---- a sweep that respects its user ----------------------------------------------------------------


def test_weights_are_kept_where_needed(swept, tmp_path):
    """--keep-weights best (the default): the full model's and the super ticket's weights stay, every
    other run's go; none: none stay; the sweep still reports and a rerun trains nothing."""
    best, none = tmp_path / "best", tmp_path / "none"
    for folder in (best, none):
        shutil.copytree(swept.out, folder)
    chosen = select_super_ticket(swept.doc)
    dropped = sweep.drop_weights(best, swept.doc, "best")
    kept = {(r["kind"], r["ratio"]) for r in swept.doc["runs"] if (best / r["run"] / "model.safetensors").exists()}
    assert kept == {("full", 0.0), (chosen.kind, chosen.ratio)} and len(dropped) == len(swept.doc["runs"]) - 2 * len(
        kept
    )
    sweep.drop_weights(none, swept.doc, "none")
    assert not any((none / r["run"] / "model.safetensors").exists() for r in swept.doc["runs"])
    assert (
        run_sweep(swept.cfg, none, keep_weights="none")["runs"] == swept.doc["runs"]
    )  # finished runs: kept as results
    assert sweep.drop_weights(best, {**swept.doc, "runs": [{**swept.doc["runs"][0], "error": "boom"}]}, "none") == []


def test_progress_line_and_one_seed_claims_nothing(swept):
    import io

    from rich.console import Console

    from st.progress import RunPrinter, progress_note
    from st.report import summary_lines

    assert progress_note(3, 7, 62, 3, 4) == "3/7 runs, 1:02 elapsed, ~1:22 left"
    assert progress_note(7, 7, 3725, 2, 0) == "7/7 runs, 1:02:05 elapsed"
    ticks = iter([0.0, 10.0, 20.0])
    text = io.StringIO()
    # the full model (reused: it says nothing about speed), then a ticket at r = 0.2, then two at 0.5:
    # a pruned run costs less, 1 - 0.85 r of the full one, so the two left take 2 x 0.575 / 0.83 of 20 s
    printer = RunPrinter(Console(file=text, width=200), "accuracy", [0.0, 0.2, 0.5, 0.5], clock=lambda: next(ticks))
    printer({**swept.doc["runs"][0], "reused": True})
    printer({**swept.doc["runs"][1], "ratio": 0.2})
    assert "1/4 runs, 0:10 elapsed" in text.getvalue() and "2/4 runs, 0:20 elapsed, ~0:27 left" in text.getvalue()

    one_seed = {**swept.doc, "runs": [r for r in swept.doc["runs"] if r["seed"] == 0]}
    lines = summary_lines(select_super_ticket(one_seed))
    assert lines[0].startswith("one seed is a smoke test, not evidence: no super ticket is claimed")
    assert not any("gain" in line or "p =" in line for line in lines)
    assert summary_lines(select_super_ticket(swept.doc))[0].startswith("super ticket:")  # two seeds: claimed


def test_controls_at_fewer_ratios_and_report_on_test(tiny_bert_dir, sentiment_dir, tmp_path):
    """--control-ratios runs random and losing tickets only where asked; --report-split test chooses
    each run's epoch on all of dev and evaluates the test split once, on the chosen weights."""
    out = tmp_path / "s"
    args = [
        "sweep",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--lr",
        5e-3,
        "--ratios",
        "0.2,0.5",
        "--control-ratios",
        "0.5",
        "--seeds",
        1,
        "--report-split",
        "test",
        "--device",
        "cpu",
        "--out",
        out,
    ]
    printed = st(*args)
    assert "full model + 4 tickets" in printed
    doc = json.loads((out / "results.json").read_text())
    assert [(r["kind"], r["ratio"]) for r in doc["runs"]] == [
        ("full", 0.0),
        ("winning", 0.2),
        ("winning", 0.5),
        ("random", 0.5),
        ("losing", 0.5),
    ]
    assert doc["settings"]["control_ratios"] == [0.5] and doc["settings"]["report_split"] == "test"
    metrics = json.loads((out / "seed0" / "full" / "metrics.json").read_text())
    assert (metrics["dev_examples"], metrics["report_examples"]) == (48, 48)  # all of dev chooses; test reports
    assert json.loads((out / "seed0" / "full" / "run.json").read_text())["report_split"] == "test"
    without = [a for a in args if a not in ("--report-split", "test")]  # reporting on a part of dev is another sweep
    assert "report_split" in st(*without, ok=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--report-split", "test", "--select-fraction", "0.5"], "give one of them, not both"),
        (["--report-split", "train2"], "has no split 'train2'"),
        (["--control-ratios", "0.3,0.3"], "--control-ratios lists a ratio twice"),
    ],
)
def test_bad_held_out_options_are_one_line(args, message, tiny_bert_dir, sentiment_dir, tmp_path):
    out = st(
        "sweep",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--device",
        "cpu",
        "--out",
        tmp_path / "s",
        *args,
        ok=False,
    )
    assert message in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "sweep.json").exists()


def test_old_sweep_settings_are_unchanged_without_the_new_options(tiny_bert_dir, sentiment_dir):
    settings = config(tiny_bert_dir, sentiment_dir).settings()
    assert "control_ratios" not in settings and "report_split" not in settings
    assert "report_split" not in settings["job"]
