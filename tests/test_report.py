"""`st report` renders a sweep folder from results.json and the files its runs name, without torch:
super_ticket.json holds the chosen seed's own ticket file, or for the full model exactly the
all-ones ticket that st.tickets makes; the super ticket's gain comes with its 95% bootstrap CI and
p-value."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from scipy.stats import ttest_rel

from st.models.bert import BertConfig
from st.report import full_ticket_json, summary_lines
from st.select import FULL, select_super_ticket
from st.tickets import Ticket

CONFIG = BertConfig(vocab_size=30, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24)


def test_full_ticket_is_the_one_st_tickets_makes():
    made = replace(Ticket.full(CONFIG), seed=7).to_json()
    # the same file, key order included: super_ticket.json must not change with the refactor
    assert json.dumps(full_ticket_json(CONFIG.to_dict(), 7)) == json.dumps(made)
    assert Ticket.from_json(full_ticket_json(CONFIG.to_dict(), 7)) == replace(Ticket.full(CONFIG), seed=7)


def _sweep(out, winning_selection: float, spread: float = 0.0) -> None:
    """A finished 2-seed sweep folder (full + winning r=0.5): results.json, run configs, ticket files;
    the winning ticket's report score gains `spread` more on seed 1 than on seed 0."""
    runs = []
    for seed in (0, 1):
        (out / f"seed{seed}" / "full").mkdir(parents=True)
        (out / f"seed{seed}" / "full" / "config.json").write_text(json.dumps({"encoder": CONFIG.to_dict()}))
        ticket = Ticket(
            ((1, 0), (0, 1), (1, 1)) if seed == 0 else ((0, 1), (1, 1), (1, 0)), (1, 0, 1), 0.5, "winning", seed
        )
        ticket.save(out / f"seed{seed}" / "winning-r0.50" / "ticket.json")
        for kind, ratio, run, score in (
            (FULL, 0.0, f"seed{seed}/full", 0.8),
            ("winning", 0.5, f"seed{seed}/winning-r0.50/run", winning_selection),
        ):
            runs.append(
                {
                    "seed": seed,
                    "kind": kind,
                    "ratio": ratio,
                    "percent_remaining": {"model": 100 - 60 * ratio, "encoder": 100 - 70 * ratio},
                    "selection": {"accuracy": score + 0.01 * seed},
                    "report": {"accuracy": score - 0.02 * seed * seed + (spread * seed if kind == "winning" else 0)},
                    "best_epoch": 1,
                    "seconds": 1.0,
                    "run": run,
                    "error": None,
                }
            )
    train = {"epochs": 1, "batch_size": 8, "lr": 5e-5, "seed": 0}
    settings = {
        "job": {"model": "tiny", "train_size": None, "max_length": 128, "train": train},
        "ratios": [0.5],
        "kinds": ["winning"],
        "seeds": 2,
        "select_fraction": 0.5,
        "dev_size": None,
    }
    (out / "results.json").write_text(
        json.dumps({"task": "t", "main_metric": "accuracy", "settings": settings, "runs": runs})
    )


def _render_without_torch(out) -> None:
    code = (
        f"import sys, st.report; st.report.render({str(out)!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_report_finds_the_chosen_ticket_through_results_json(tmp_path):
    _sweep(tmp_path, winning_selection=0.9)
    _render_without_torch(tmp_path)
    chosen = json.loads((tmp_path / "super_ticket.json").read_text())
    assert Ticket.from_json(chosen) == Ticket.load(
        tmp_path / "seed0" / "winning-r0.50" / "ticket.json"
    )  # the first seed's
    assert chosen["ticket_files"] == {"0": "seed0/winning-r0.50/ticket.json", "1": "seed1/winning-r0.50/ticket.json"}
    report = (tmp_path / "report.md").read_text()
    assert "| 0.5 | 70.0 | — | **90.50 ± 0.71** |" in report  # — : no speed-up measured in this results.json
    assert "| 1 | 91.00 | 81.00 | 88.00 | 78.00 | +10.00 |" in report
    assert (tmp_path / "phase.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_full_model_choice_is_its_all_ones_ticket(tmp_path):
    _sweep(tmp_path, winning_selection=0.7)
    _render_without_torch(tmp_path)
    chosen = json.loads((tmp_path / "super_ticket.json").read_text())
    assert Ticket.from_json(chosen) == Ticket.full(CONFIG) and chosen["ticket_files"] == {}
    Ticket.load(tmp_path / "super_ticket.json").check_matches(CONFIG)  # loadable, for this model


def test_report_shows_the_gain_with_its_confidence_interval(tmp_path):
    _sweep(tmp_path, winning_selection=0.9, spread=0.03)  # report differences: +10.00 on seed 0, +13.00 on seed 1
    _render_without_torch(tmp_path)
    p = ttest_rel([0.9, 0.88 + 0.03], [0.8, 0.78]).pvalue
    line = f"gain +11.50 points (95% CI +10.00 to +13.00, bootstrap over 2 seeds), p = {p:.3g}"
    report = (tmp_path / "report.md").read_text()
    assert f"on the report part: 90.50 ± 0.71 vs the full model's 79.00 ± 1.41, {line}" in report
    assert "percentile bootstrap of the mean difference" in report
    chosen = json.loads((tmp_path / "super_ticket.json").read_text())
    assert (
        chosen["gain"] == pytest.approx(0.115)
        and chosen["ci"] == pytest.approx([0.10, 0.13])
        and chosen["p_value"] == pytest.approx(p)
    )


def test_summary_has_no_interval_where_every_seed_gains_the_same(tmp_path):
    _sweep(tmp_path, winning_selection=0.9)  # +10.00 on both seeds
    lines = summary_lines(select_super_ticket(json.loads((tmp_path / "results.json").read_text())))
    assert lines[1].endswith(", gain +10.00 points") and "CI" not in lines[1] and "p =" not in lines[1]
    assert "t-test is undefined" in lines[2]


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda d: d["runs"][1].pop("report"), "lacks the key runs[1].report"),
        (lambda d: d["settings"].pop("seeds"), "lacks the key settings.seeds"),
        (lambda d: d["settings"]["job"]["train"].pop("lr"), "lacks the key settings.job.train.lr"),
        (lambda d: d["runs"][2]["selection"].pop("accuracy"), "lacks the key runs[2].selection.accuracy"),
        (lambda d: d["runs"][0].__setitem__("ratio", "half"), "runs[0].ratio holds 'half'"),
        (lambda d: d.__setitem__("runs", {"0": {}}), "runs must be a list"),
    ],
)
def test_a_hand_edited_results_file_is_one_line_naming_the_key(tmp_path, edit, named):
    from click.testing import CliRunner

    from cli.main import cli

    _sweep(tmp_path, 0.9)
    assert CliRunner().invoke(cli, ["report", str(tmp_path)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "results.json"}
    doc = json.loads((tmp_path / "results.json").read_text())
    edit(doc)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1 and named in result.output and len(result.output.strip().splitlines()) == 1, (
        result.output
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "results.json"} == before
