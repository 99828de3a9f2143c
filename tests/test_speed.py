"""Speed beside accuracy: a sweep measures each winning ticket's inference speed-up (`st.speed`), the
report shows it (and "—" for results.json files written before), `st report --measure-speed`
re-measures, and `--min-speedup` names the deploy ticket or says in one line that none is fast enough."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli.main import cli
from st.layout import FULL, run_dir
from st.models.bert import BertConfig
from st.tickets import Ticket

CONFIG = BertConfig(vocab_size=30, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24)
# ratio -> (mean selection score, measured speed-up); the report part adds a seed-dependent wobble
GRID = {0.0: (0.80, 1.0), 0.2: (0.82, 1.2), 0.4: (0.79, 1.6), 0.6: (0.75, 2.8)}


def run_st(*args, ok=True) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    assert "Traceback" not in result.output
    return result.output


def fabricated(out, speed: bool = True) -> None:
    """A finished 3-seed sweep folder (results.json, run configs, ticket files) over GRID; without
    `speed` it is a results.json as written before speed-ups were measured."""
    runs = []
    for seed in (0, 1, 2):
        (out / f"seed{seed}" / "full").mkdir(parents=True)
        (out / f"seed{seed}" / "full" / "config.json").write_text(json.dumps({"encoder": CONFIG.to_dict()}))
        for ratio, (score, speedup) in GRID.items():
            kind = FULL if ratio == 0 else "winning"
            name = "full" if ratio == 0 else f"winning-r{ratio:.2f}"
            if ratio:
                Ticket(((1, 1), (1, 0), (0, 1)), (1, 1, 0), ratio, kind, seed).save(
                    out / f"seed{seed}" / name / "ticket.json"
                )
            runs.append(
                {
                    "seed": seed,
                    "kind": kind,
                    "ratio": ratio,
                    "percent_remaining": {"model": 100 - 50 * ratio, "encoder": 100 - 60 * ratio},
                    "selection": {"accuracy": score + 0.01 * seed},
                    "report": {"accuracy": score + 0.005 * seed * (ratio * 10 % 3)},
                    "run": f"seed{seed}/{name}" + ("/run" if ratio else ""),
                    "error": None,
                    **({"speedup": speedup} if speed else {}),
                }
            )
    train = {"epochs": 1, "batch_size": 8, "lr": 5e-5, "seed": 0}
    settings = {
        "job": {"model": "tiny", "train_size": None, "max_length": 128, "train": train},
        "ratios": [0.2, 0.4, 0.6],
        "kinds": ["winning"],
        "seeds": 3,
        "select_fraction": 0.5,
        "dev_size": None,
    }
    doc = {"task": "t", "main_metric": "accuracy", "settings": settings, "runs": runs}
    if speed:
        workload = {"batch": 32, "seq": 128, "rounds": 3, "threads": 1}
        doc["speed"] = {"runtime": "onnxruntime 1.0", "cpu": "a test CPU", "workload": workload, "full_seconds": 1.0}
    (out / "results.json").write_text(json.dumps(doc))


def test_min_speedup_picks_the_most_accurate_ticket_that_is_fast_enough(tmp_path):
    fabricated(tmp_path)
    out = run_st("report", tmp_path, "--min-speedup", 1.5)
    # the super ticket is r = 0.2 (best on selection, 1.2x); at >= 1.5x: r = 0.4 beats the faster r = 0.6
    chosen = json.loads((tmp_path / "super_ticket.json").read_text())
    deploy = json.loads((tmp_path / "deploy_ticket.json").read_text())
    assert chosen["ratio"] == 0.2 and deploy["ratio"] == 0.4 and deploy["speedup"] == 1.6
    assert deploy["min_speedup"] == 1.5 and deploy["speed"]["runtime"] == "onnxruntime 1.0"
    assert Ticket.from_json(deploy) == Ticket.load(tmp_path / "seed0" / "winning-r0.40" / "ticket.json")
    assert [c["ratio"] for c in deploy["candidates"]] == [0.4, 0.6]  # only the fast enough ones competed
    report = (tmp_path / "report.md").read_text()
    assert "| 0.4 | 80.0 | 1.60× |" in report and "| 0 (full) | 100.0 | 1.00× |" in report
    assert "## Deploy ticket" in report and "deploy ticket (speed-up ≥ 1.5×): the winning ticket at r = 0.4" in report
    assert "95% CI" in report.split("## Deploy ticket")[1] and "onnxruntime 1.0 on a test CPU" in report
    assert "deploy ticket (speed-up ≥ 1.5×)" in out and "deploy_ticket.json" in out

    run_st("report", tmp_path, "--min-speedup", 1.2)  # the super ticket is fast enough: it is the deploy ticket
    assert json.loads((tmp_path / "deploy_ticket.json").read_text())["ratio"] == 0.2


def test_an_impossible_speed_target_is_one_line_and_writes_no_file(tmp_path):
    fabricated(tmp_path)
    out = run_st("report", tmp_path, "--min-speedup", 3, ok=False)
    assert len(out.strip().splitlines()) == 1, out
    assert "no ticket of this sweep reaches a 3x speed-up" in out and "r = 0.6, measured 2.80x" in out
    assert not (tmp_path / "deploy_ticket.json").exists()  # no file rather than an empty or a wrong one
    assert "## Deploy ticket" not in (tmp_path / "report.md").read_text()  # the sweep's own report is there


def test_an_old_results_file_renders_without_torch_and_shows_no_speed(tmp_path):
    fabricated(tmp_path, speed=False)
    code = (
        f"import sys, st.report; st.report.render({str(tmp_path)!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    assert "| 0.4 | 80.0 | — |" in report and "not measured for this sweep" in report
    out = run_st("report", tmp_path, "--min-speedup", 1.5, ok=False)
    assert "needs measured speed-ups" in out and "--measure-speed" in out and len(out.strip().splitlines()) == 1


def test_a_wrong_speedup_in_results_json_is_named(tmp_path):
    fabricated(tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    doc["runs"][2]["speedup"] = "fast"
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert "runs[2].speedup holds 'fast'" in run_st("report", tmp_path, ok=False)


@pytest.mark.filterwarnings("ignore")
def test_a_sweep_measures_its_tickets_and_st_report_re_measures(tmp_path, tiny_bert_dir, sentiment_dir):
    args = ["--task", "csv", "--data-dir", sentiment_dir, "--model", tiny_bert_dir, "--epochs", 1]
    args += ["--batch-size", 8, "--train-size", 32, "--ratios", "0.25,0.5", "--kinds", "winning", "--seeds", 1]
    run_st("sweep", *args, "--device", "cpu", "--out", tmp_path / "s", "--min-speedup", 0.5)
    doc = json.loads((tmp_path / "s" / "results.json").read_text())
    speedups = {r["ratio"]: r["speedup"] for r in doc["runs"]}
    assert speedups[0.0] == 1.0 and all(s > 0 for s in speedups.values()), speedups
    assert doc["speed"]["runtime"].startswith("onnxruntime") and doc["speed"]["workload"]["batch"] == 32
    row = f"| 0.5 | {doc['runs'][2]['percent_remaining']['model']:.1f} | "
    assert row + f"{speedups[0.5]:.2f}× |" in (tmp_path / "s" / "report.md").read_text()
    deploy = json.loads((tmp_path / "s" / "deploy_ticket.json").read_text())
    # README's deploying steps: the deploy ticket's own run (kept with its weights) exported in int8
    folder = run_dir(tmp_path / "s", 0, deploy["kind"], deploy["ratio"])
    out = run_st(
        "export", "--checkpoint", folder, "--onnx", tmp_path / "m.onnx", "--quantize", "int8", "--max-drop", 100
    )
    assert "int8 accuracy on dev" in out and (tmp_path / "m.onnx").exists()

    for r in doc["runs"]:  # as a results.json from before: `st report --measure-speed` fills it in
        del r["speedup"]
    del doc["speed"]
    (tmp_path / "s" / "results.json").write_text(json.dumps(doc))
    run_st("report", tmp_path / "s")
    assert row + "— |" in (tmp_path / "s" / "report.md").read_text()
    out = run_st("report", tmp_path / "s", "--measure-speed")
    assert "speed-ups measured in onnxruntime" in out
    again = json.loads((tmp_path / "s" / "results.json").read_text())
    assert all(r["speedup"] > 0 for r in again["runs"]) and again["speed"]["cpu"]
    assert row + f"{again['runs'][2]['speedup']:.2f}× |" in (tmp_path / "s" / "report.md").read_text()


def test_keep_weights_best_keeps_the_deploy_tickets_runs_too(tmp_path):
    from st.sweep import drop_weights

    fabricated(tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    dropped = {p.parent.parent.name for p in drop_weights(tmp_path, doc, "best", min_speedup=1.5)}
    assert dropped == {"winning-r0.60"}  # kept: the full model, the super ticket (0.2), the deploy ticket (0.4)
    dropped = {p.parent.parent.name for p in drop_weights(tmp_path, doc, "best", min_speedup=9.0)}
    assert dropped == {"winning-r0.40", "winning-r0.60"}  # no deploy ticket: nothing more is kept, nothing fails
