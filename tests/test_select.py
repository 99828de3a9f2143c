"""The super ticket's choice and its statistics from results.json's contents alone: chosen on the
selection part, ties to the full model, a paired t-test on the report part only when it means
something; one std rule and one score formatter; and no torch behind any of it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from st.errors import UserError
from st.select import FULL, fmt, fmt_value, select_super_ticket, stats


def _doc(table: dict, seeds=(0, 1, 2)) -> dict:
    """A results.json with, per (kind, ratio), (selection, report) accuracies plus a little per-seed noise."""
    runs = [{"seed": s, "kind": kind, "ratio": ratio, "percent_remaining": {"model": 100 - 50 * ratio, "encoder": 0},
             "selection": {"accuracy": sel + 0.01 * s}, "report": {"accuracy": rep + 0.01 * s * s * (1 + 3 * ratio)}, "error": None}
            for (kind, ratio), (sel, rep) in table.items() for s in seeds]
    return {"task": "t", "main_metric": "accuracy", "settings": {}, "runs": runs}


def test_choice_uses_selection_scores_and_tests_the_report_gain():
    doc = _doc({("full", 0.0): (0.80, 0.90), ("winning", 0.2): (0.85, 0.70), ("winning", 0.5): (0.70, 0.99),
                ("random", 0.2): (0.95, 0.99)})  # random tickets are never candidates
    chosen = select_super_ticket(doc)
    assert (chosen.kind, chosen.ratio) == ("winning", 0.2)
    assert chosen.gain == pytest.approx(-0.20 + 0.006 * 5 / 3) and chosen.p_value is not None and chosen.p_value < 0.01
    assert "paired t-test over 3 seeds" in chosen.test_note
    tie = select_super_ticket(_doc({("full", 0.0): (0.8, 0.8), ("winning", 0.2): (0.8, 0.9)}))
    assert tie.kind == "full" and tie.gain is None  # a ticket must do strictly better
    one_seed = select_super_ticket(_doc({("full", 0.0): (0.8, 0.8), ("winning", 0.2): (0.9, 0.9)}, seeds=(0,)))
    assert one_seed.p_value is None and "at least 2 seeds" in one_seed.test_note


def test_candidates_are_best_first_and_equal_tickets_go_to_the_lower_ratio():
    chosen = select_super_ticket(_doc({("full", 0.0): (0.7, 0.7), ("winning", 0.5): (0.9, 0.8), ("winning", 0.2): (0.9, 0.8)}))
    assert (chosen.kind, chosen.ratio, chosen.percent_remaining) == ("winning", 0.2, {"model": 90.0, "encoder": 0})
    assert [(c["kind"], c["ratio"]) for c in chosen.candidates] == [("winning", 0.2), ("winning", 0.5), (FULL, 0.0)]
    assert chosen.candidates[0]["mean"] == pytest.approx(0.91) and chosen.candidates[0]["n"] == 3


def test_failed_runs_are_left_out_and_listed():
    doc = _doc({("full", 0.0): (0.8, 0.8), ("winning", 0.2): (0.9, 0.9)})
    crashed = next(r for r in doc["runs"] if (r["seed"], r["kind"]) == (1, "winning"))
    crashed.update(selection=None, report=None, error="RuntimeError: boom")
    chosen = select_super_ticket(doc)
    assert set(chosen.selection) == set(chosen.report) == {0, 2} and set(chosen.full_report) == {0, 1, 2}
    assert chosen.failures == [crashed] and "paired t-test over 2 seeds" in chosen.test_note
    for r in doc["runs"]:
        if r["kind"] in (FULL, "winning"):
            r["error"] = "RuntimeError: boom"
    with pytest.raises(UserError, match="nothing to choose from"):
        select_super_ticket(doc)


def test_no_p_value_when_every_seed_gains_the_same():
    doc = _doc({("full", 0.0): (0.8, 0.8), ("winning", 0.2): (0.9, 0.85)})
    for r in doc["runs"]:
        r["report"]["accuracy"] = {FULL: 0.8, "winning": 0.85}[r["kind"]] + 0.01 * r["seed"]  # the same difference per seed
    chosen = select_super_ticket(doc)
    assert chosen.gain == pytest.approx(0.05) and chosen.p_value is None and "t-test is undefined" in chosen.test_note


def test_stats_is_mean_and_sample_std():
    assert stats([0.5, 0.7, 0.9]) == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2), "n": 3}  # ddof=1: not 0.163
    assert stats([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    assert stats([]) == {"mean": None, "std": None, "n": 0}


def test_scores_are_formatted_times_100():
    assert fmt_value(0.85123) == "85.12" and fmt_value(1) == "100.00"
    assert fmt_value(0.0512, sign=True) == "+5.12" and fmt_value(-0.0512, sign=True) == "-5.12"
    assert fmt_value(None) == fmt_value(float("nan")) == "n/a"
    assert fmt(stats([0.5, 0.7, 0.9])) == "70.00 ± 20.00"
    assert fmt(stats([0.5, 0.7, 0.9]), seeds=3) == "70.00 ± 20.00"
    assert fmt(stats([0.5]), seeds=3) == "50.00 (n=1)"
    assert fmt(stats([]), seeds=3) == "—"


def test_select_and_report_never_import_torch():
    code = "import sys, st.report, st.select; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
