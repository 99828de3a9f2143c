"""The super ticket's choice and its statistics from results.json's contents alone: chosen on the
selection part, ties to the full model; one comparison rule (`paired`: mean paired difference, 95%
bootstrap CI, paired t-test) used only when it means something; one std rule and one score
formatter; and no torch behind any of it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from scipy import stats as sps

from st.errors import UserError
from st.select import FULL, fmt, fmt_paired, fmt_value, paired, select_super_ticket, stats


def _doc(table: dict, seeds=(0, 1, 2)) -> dict:
    """A results.json with, per (kind, ratio), (selection, report) accuracies plus a little per-seed noise."""
    runs = [
        {
            "seed": s,
            "kind": kind,
            "ratio": ratio,
            "percent_remaining": {"model": 100 - 50 * ratio, "encoder": 0},
            "selection": {"accuracy": sel + 0.01 * s},
            "report": {"accuracy": rep + 0.01 * s * s * (1 + 3 * ratio)},
            "error": None,
        }
        for (kind, ratio), (sel, rep) in table.items()
        for s in seeds
    ]
    return {"task": "t", "main_metric": "accuracy", "settings": {}, "runs": runs}


def test_choice_uses_selection_scores_and_tests_the_report_gain():
    doc = _doc(
        {
            ("full", 0.0): (0.80, 0.90),
            ("winning", 0.2): (0.85, 0.70),
            ("winning", 0.5): (0.70, 0.99),
            ("random", 0.2): (0.95, 0.99),
        }
    )  # random tickets are never candidates
    chosen = select_super_ticket(doc)
    assert (chosen.kind, chosen.ratio) == ("winning", 0.2)
    assert chosen.gain == pytest.approx(-0.20 + 0.006 * 5 / 3) and chosen.p_value is not None and chosen.p_value < 0.01
    assert "paired t-test over 3 seeds" in chosen.test_note and chosen.n_paired == 3
    assert (
        chosen.ci is not None and chosen.ci[0] <= chosen.gain <= chosen.ci[1] < 0
    )  # a clear loss: the interval excludes 0
    tie = select_super_ticket(_doc({("full", 0.0): (0.8, 0.8), ("winning", 0.2): (0.8, 0.9)}))
    assert tie.kind == "full" and tie.gain is None and tie.ci is None  # a ticket must do strictly better
    one_seed = select_super_ticket(_doc({("full", 0.0): (0.8, 0.8), ("winning", 0.2): (0.9, 0.9)}, seeds=(0,)))
    assert one_seed.p_value is None and one_seed.ci is None and "at least 2 seeds" in one_seed.test_note


def test_candidates_are_best_first_and_equal_tickets_go_to_the_lower_ratio():
    chosen = select_super_ticket(
        _doc({("full", 0.0): (0.7, 0.7), ("winning", 0.5): (0.9, 0.8), ("winning", 0.2): (0.9, 0.8)})
    )
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
        r["report"]["accuracy"] = {FULL: 0.8, "winning": 0.85}[r["kind"]] + 0.01 * r[
            "seed"
        ]  # the same difference per seed
    chosen = select_super_ticket(doc)
    assert chosen.gain == pytest.approx(0.05) and chosen.p_value is None and "t-test is undefined" in chosen.test_note
    assert chosen.ci is None


A = {0: 0.80, 1: 0.84, 2: 0.79, 3: 0.86, 4: 0.83}
B = {0: 0.78, 1: 0.85, 2: 0.75, 3: 0.83, 4: 0.80, 9: 0.10}  # seed 9 has no partner: left out


def test_paired_p_value_is_the_paired_t_test_over_shared_seeds():
    result = paired(A, B)
    diffs = [0.02, -0.01, 0.04, 0.03, 0.03]  # by hand, seeds 0-4
    assert result["n"] == 5 and result["mean"] == pytest.approx(sum(diffs) / 5)
    assert result["p_value"] == pytest.approx(
        sps.ttest_rel([A[s] for s in range(5)], [B[s] for s in range(5)]).pvalue, rel=1e-12
    )
    t = 0.022 / (
        sps.tstd(diffs) / 5**0.5
    )  # the paired t statistic by hand: mean / standard error, 4 degrees of freedom
    assert result["p_value"] == pytest.approx(2 * sps.t.sf(t, 4), rel=1e-9) and 0.05 < result["p_value"] < 0.1
    assert "paired t-test over 5 seeds" in result["note"] and "bootstrap" in result["note"]


def test_paired_ci_contains_the_mean_and_is_the_same_every_call():
    result = paired(A, B)
    low, high = result["ci"]
    assert (
        low < result["mean"] < high and -0.01 <= low and high <= 0.04
    )  # a percentile interval stays within the differences
    # 12 distinct differences: enough distinct resample means that another rng, or another order of
    # the same differences, moves the interval (with 5 seeds the percentiles often land on the same values)
    a = {s: 0.8 + 0.01 * (s * 7919 % 13) / 13 + 0.001 * s for s in range(12)}
    b = {s: 0.8 for s in a}
    first = paired(a, b)
    assert first == paired(a, b) and first["ci"][0] < first["mean"] < first["ci"][1]
    assert paired(dict(reversed(list(a.items()))), b)["ci"] == first["ci"]  # seeds, not dict order, fix the resamples


def test_paired_ci_narrows_as_the_differences_agree():
    widths = []
    for spread in (0.05, 0.02, 0.005):
        a = {s: 0.8 + 0.03 + spread * d for s, d in enumerate((-1.0, 0.5, 1.0, -0.5, 0.2))}
        result = paired(a, {s: 0.8 for s in a})
        assert result["ci"][0] <= result["mean"] <= result["ci"][1]
        widths.append(result["ci"][1] - result["ci"][0])
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] == pytest.approx(10, rel=1e-6)  # the same resamples: the width scales with the spread


def test_paired_gives_no_ci_or_p_value_where_they_mean_nothing():
    one = paired({0: 0.9}, {0: 0.8, 1: 0.7})
    assert (one["n"], one["ci"], one["p_value"]) == (1, None, None) and one["mean"] == pytest.approx(0.1)
    assert "at least 2 seeds" in one["note"]
    same = paired({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.85, 1: 0.75, 2: 0.65})  # +0.05 on every seed, up to float noise
    assert (
        same["ci"] is None
        and same["p_value"] is None
        and same["mean"] == pytest.approx(0.05)
        and "undefined" in same["note"]
    )
    none = paired({0: 0.9}, {1: 0.8})
    assert (
        none == {"n": 0, "mean": None, "ci": None, "p_value": None, "note": none["note"]}
        and "nothing to compare" in none["note"]
    )
    undefined = paired({0: 0.9, 1: float("nan"), 2: 0.7}, {0: 0.8, 1: 0.8, 2: None})  # undefined metrics: no difference
    assert undefined["n"] == 1 and "2 seed(s) with an undefined score left out" in undefined["note"]


def test_paired_differences_are_formatted_with_their_interval():
    assert (
        fmt_paired(0.012, [-0.004, 0.028], 5, 0.2149)
        == "+1.20 points (95% CI -0.40 to +2.80, bootstrap over 5 seeds), p = 0.215"
    )
    assert fmt_paired(0.05, None, 3, None) == "+5.00 points"


def test_stats_is_mean_and_sample_std():
    assert stats([0.5, 0.7, 0.9]) == {
        "mean": pytest.approx(0.7),
        "std": pytest.approx(0.2),
        "n": 3,
    }  # ddof=1: not 0.163
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
