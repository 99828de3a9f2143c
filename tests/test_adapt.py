"""Domain adaptation: every (start, fraction, seed) is a run; the table has Table 4's shape."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from cli.main import cli
from st.adapt import run_adapt
from st.errors import UserError
from st.pipeline import run_finetune
from st.specs import DataSpec, ModelSpec, RunSpec, TrainConfig


def test_adapt_from_pretrained_and_from_a_checkpoint(tiny_bert_dir, sentiment_dir, tmp_path):
    base = RunSpec(
        DataSpec("csv", str(sentiment_dir)),
        ModelSpec(str(tiny_bert_dir), dropout=0.0, head_dropout=0.0),
        TrainConfig(epochs=1, batch_size=8, lr=5e-3),
    )
    source = run_finetune(replace(base, train=replace(base.train, epochs=4)), tmp_path / "source")
    assert source["dev"]["accuracy"] >= 0.8
    result = run_adapt(
        base,
        {"pretrained": str(tiny_bert_dir), "finetuned": str(tmp_path / "source")},
        fractions=(0.1, 1.0),
        seeds=(0, 1),
        out=tmp_path / "adapt",
    )
    assert len(result["rows"]) == 2 * 2 * 2
    runs = json.loads((tmp_path / "adapt" / "pretrained" / "fraction0.1-seed0" / "run.json").read_text())
    assert runs["train_fraction"] == 0.1 and runs["init"] is None
    runs = json.loads((tmp_path / "adapt" / "finetuned" / "fraction1-seed1" / "run.json").read_text())
    assert runs["train_fraction"] is None and runs["init"] == str(tmp_path / "source") and runs["train"]["seed"] == 1
    # starting from the fine-tuned checkpoint beats starting from scratch on the same task
    assert result["table"]["finetuned"][0.1]["mean"] > result["table"]["pretrained"][0.1]["mean"]
    report = (tmp_path / "adapt" / "report.md").read_text()
    assert "| finetuned |" in report and "10.0%" in report and "100.0%" in report
    again = run_adapt(
        base,
        {"pretrained": str(tiny_bert_dir), "finetuned": str(tmp_path / "source")},
        fractions=(0.1, 1.0),
        seeds=(0, 1),
        out=tmp_path / "adapt",
    )
    assert again["table"] == result["table"]  # finished runs are reused, not retrained


def test_adapt_reports_the_test_split_beside_dev(tiny_bert_dir, sentiment_dir, tmp_path):
    out = tmp_path / "adapt"
    result = CliRunner().invoke(
        cli,
        [
            "adapt",
            "--task",
            "csv",
            "--data-dir",
            str(sentiment_dir),
            "--model",
            str(tiny_bert_dir),
            "--from",
            f"pretrained={tiny_bert_dir}",
            "--fractions",
            "0.5,1",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--report-split",
            "test",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["fraction"] for r in rows] == [0.5, 1.0] and all(0 <= r["report"]["accuracy"] <= 1 for r in rows)
    assert json.loads((out / "pretrained" / "fraction1-seed0" / "metrics.json").read_text())["report_examples"] == 48
    report = (out / "report.md").read_text()
    assert "on the --report-split split" in report and report.count("| pretrained |") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fractions", "0,1"], "(0, 1]"),
        (["--fractions", "a"], "comma-separated"),
        (["--from", "x"], "must be TASK=PATH"),
        (["--from", "x={tmp}/nowhere"], "not a folder"),
    ],
)
def test_adapt_bad_input(args, message, tiny_bert_dir, sentiment_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(
        cli,
        [
            "adapt",
            "--task",
            "csv",
            "--data-dir",
            str(sentiment_dir),
            "--model",
            str(tiny_bert_dir),
            *args,
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_adapt_needs_a_source():
    with pytest.raises(UserError, match="--from"):
        run_adapt(RunSpec(DataSpec("csv")), {}, out="unused")


def test_every_run_is_checked_before_the_first_starts(tiny_bert_dir, sentiment_dir, tmp_path):
    """A clash that only a later run would meet (a fraction that keeps no example, a folder made with
    other settings) is refused before any run: no finished run is left to refuse the corrected command."""
    base = RunSpec(DataSpec("csv", str(sentiment_dir)), ModelSpec(str(tiny_bert_dir)), TrainConfig(epochs=1))
    sources = {"pretrained": str(tiny_bert_dir)}
    with pytest.raises(UserError, match=r"--train-fraction 0.001 of 192 training examples keeps none"):
        run_adapt(base, sources, fractions=(1.0, 0.001), out=tmp_path / "adapt")
    assert not [p for p in (tmp_path / "adapt").rglob("*") if p.is_file()]  # (empty folders refuse nothing)
    with pytest.raises(UserError, match=r"st adapt samples the training set by --fractions; drop --train-size 50"):
        run_adapt(replace(base, data=replace(base.data, train_size=50)), sources, fractions=(1.0,), out=tmp_path / "a")
    # a folder of the second run made with other settings: refused before the first run trains
    other = replace(base, train=replace(base.train, epochs=2), data=replace(base.data, train_fraction=0.5))
    run_finetune(other, tmp_path / "adapt" / "pretrained" / "fraction0.5-seed0")
    with pytest.raises(UserError, match="holds a run made with train.epochs=2, not 1"):
        run_adapt(base, sources, fractions=(1.0, 0.5), out=tmp_path / "adapt")
    assert not [p for p in (tmp_path / "adapt" / "pretrained" / "fraction1-seed0").rglob("*") if p.is_file()]
    result = run_adapt(base, sources, fractions=(1.0, 0.25), out=tmp_path / "adapt")  # the corrected command
    assert [r["fraction"] for r in result["rows"]] == [1.0, 0.25]
