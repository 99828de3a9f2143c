"""The super ticket's choice and the statistics behind every number shown (Liang et al. 2021).

Pure: it reads results.json's contents (a dict) and imports no torch, so `st report` re-renders a
sweep without loading a deep-learning stack. scipy is imported only when a comparison runs.

Honest selection: each run was scored on two parts of dev. The super ticket is the winning ticket,
or the full model, with the best mean score on the selection part; its report-part scores are then
compared with the full model's seed by seed (`paired`).

One rule for comparisons everywhere (`paired`, rendered by `fmt_paired`): the mean paired difference
over the seeds both sides share, its 95% bootstrap confidence interval, and the paired t-test's p-value.

One rule for spread everywhere (`stats`): mean and sample standard deviation over seeds (ddof=1),
no standard deviation from a single value. One formatter for scores (`fmt`, `fmt_value`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from st.errors import UserError
from st.layout import FULL


def stats(values: list[float]) -> dict:
    """Mean and sample standard deviation (None with fewer than two values)."""
    return {
        "mean": float(np.mean(values)) if values else None,
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "n": len(values),
    }


def fmt_value(x: float | None, sign: bool = False) -> str:
    """One score as people read it: ×100 with 2 decimals (GLUE style, 0.8512 -> "85.12"), "+" in front
    of gains with `sign`; "n/a" where there is no number (None, or NaN from a degenerate metric)."""
    if x is None or math.isnan(x):
        return "n/a"
    return f"{100 * x:{'+' if sign else ''}.2f}"


def fmt(s: dict, seeds: int | None = None) -> str:
    """A `stats` dict as "mean ± std" ×100 (see fmt_value); "—" when nothing finished; " (n=k)" when
    fewer than the `seeds` expected went into it."""
    if s["mean"] is None:
        return "—"
    text = fmt_value(s["mean"]) + (f" ± {fmt_value(s['std'])}" if s["std"] is not None else "")
    return text + (f" (n={s['n']})" if seeds is not None and s["n"] < seeds else "")


CONFIDENCE, RESAMPLES = 0.95, 10_000


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b, seed by seed, over the seeds where both have a number: {"n", "mean" (mean difference),
    "ci" ([low, high], 95% percentile bootstrap of the mean, or None), "p_value" (paired t-test,
    two-sided, or None), "note" (how they were computed, or why they are missing)}."""
    # a None or NaN score (an undefined metric) has no difference: that seed is left out, and said so
    seeds = sorted(s for s in set(a) & set(b) if all(v is not None and math.isfinite(v) for v in (a[s], b[s])))
    dropped = len(set(a) & set(b)) - len(seeds)
    diffs = [a[s] - b[s] for s in seeds]  # sorted seeds: the bootstrap resamples the same list every call
    result = {"n": len(seeds), "mean": float(np.mean(diffs)) if diffs else None, "ci": None, "p_value": None}
    if not diffs:
        note = "no seed has a score on both sides: nothing to compare"
    elif len(diffs) < 2:
        note = "a paired comparison needs at least 2 seeds (--seeds 2 or more): no confidence interval, no p-value"
    elif np.ptp(diffs) <= 1e-12:  # float noise around one value: the t statistic would be meaningless
        note = "every seed gave the same difference: the t-test is undefined and a bootstrap interval would be a point"
    else:
        from scipy.stats import (  # lazily: scipy costs a second to import and most callers never compare
            bootstrap,
            ttest_rel,
        )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result["p_value"] = float(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
            # percentile, not BCa: with the 2-5 seeds a sweep has, BCa's jackknife acceleration is noise
            # and it warns or returns NaN on degenerate resamples; the percentile interval is always
            # defined and lies within the observed differences. A fixed rng: the same results give
            # the same interval, so re-rendering a report changes no byte.
            ci = bootstrap(
                (diffs,),
                np.mean,
                confidence_level=CONFIDENCE,
                n_resamples=RESAMPLES,
                method="percentile",
                rng=np.random.default_rng(0),
            ).confidence_interval
        result["ci"] = [float(ci.low), float(ci.high)]
        note = (
            f"paired t-test over {len(diffs)} seeds (scipy.stats.ttest_rel, two-sided); {CONFIDENCE:.0%} CI: "
            f"percentile bootstrap of the mean difference ({RESAMPLES} resamples)"
        )
        if len(diffs) < 10:  # resampling a handful of values cannot reach past them: the interval is too narrow
            note += f"; from {len(diffs)} seeds it is optimistic, read it with the p-value"
    if dropped:
        note += f"; {dropped} seed(s) with an undefined score left out"
    return {**result, "note": note}


def fmt_paired(mean: float | None, ci: list[float] | None, n: int, p_value: float | None) -> str:
    """A `paired` difference as people read it: "+1.20 points (95% CI -0.40 to +2.80, bootstrap over
    5 seeds), p = 0.21" (×100, see fmt_value); only the mean where there is no interval or p-value."""
    text = f"{fmt_value(mean, sign=True)} points"
    if ci is not None:
        low, high = fmt_value(ci[0], sign=True), fmt_value(ci[1], sign=True)
        text += f" ({CONFIDENCE:.0%} CI {low} to {high}, bootstrap over {n} seeds)"
    return text + (f", p = {p_value:.3g}" if p_value is not None else "")


@dataclass(frozen=True)
class Selection:
    """The super ticket of a sweep: the candidate (full model or winning ticket) with the best mean
    selection score, and its report-part numbers against the full model's."""

    metric: str
    kind: str  # winning | full
    ratio: float
    percent_remaining: dict | None
    candidates: list[dict]  # every candidate's mean selection score, best first
    selection: dict[int, float]  # seed -> the chosen candidate's selection score
    report: dict[int, float]  # seed -> its report score
    full_selection: dict[int, float]
    full_report: dict[int, float]
    gain: float | None  # mean over paired seeds of (chosen - full) on the report part
    p_value: float | None  # paired t-test over those seeds (scipy.stats.ttest_rel), two-sided
    ci: list[float] | None  # 95% percentile-bootstrap interval of gain
    n_paired: int  # the seeds gain, p_value and ci are computed over
    test_note: str  # why there is no p-value or interval, or how they were computed
    failures: list[dict] = field(default_factory=list)
    speedup: float | None = None  # measured inference speed-up over the full model (`st.speed`), if any
    min_speedup: float | None = None  # the target it was chosen under (a deploy ticket), or None


def per_seed(records: list[dict], kind: str, ratio: float, part: str, metric: str) -> dict[int, float]:
    return {
        r["seed"]: r[part][metric]
        for r in records
        if r["kind"] == kind and r["ratio"] == ratio and r["error"] is None and r[part] is not None
    }


def speedup_of(runs: list[dict], kind: str, ratio: float) -> float | None:
    """The measured speed-up of a candidate (the same for every seed: one ticket per ratio is timed)."""
    found = [r["speedup"] for r in runs if r["kind"] == kind and r["ratio"] == ratio and r.get("speedup") is not None]
    return float(np.median(found)) if found else None


def _fast_enough(candidates: list[dict], min_speedup: float) -> list[dict]:
    measured = [c for c in candidates if c["speedup"] is not None]
    if not measured:
        raise UserError(
            "--min-speedup needs measured speed-ups and this sweep's results.json has none; "
            "run `st report DIR --measure-speed --min-speedup S`"
        )
    fast = [c for c in measured if c["speedup"] >= min_speedup]
    if not fast:
        top = max(measured, key=lambda c: c["speedup"])
        name = "the full model" if top["kind"] == FULL else f"the winning ticket at r = {top['ratio']:g}"
        raise UserError(
            f"no ticket of this sweep reaches a {min_speedup:g}x speed-up: the fastest, {name}, measured "
            f"{top['speedup']:.2f}x; lower --min-speedup or sweep higher --ratios"
        )
    return fast


def select_super_ticket(doc: dict, min_speedup: float | None = None) -> Selection:
    """Choose the super ticket from results.json's contents using the selection part only; ties go to
    the full model, then to the lower ratio (a ticket must do strictly better to be chosen).

    With `min_speedup`, the deploy ticket: the same rule among the candidates whose measured speed-up
    is at least that (the full model's is 1); one UserError line when none is fast enough."""
    runs, metric = doc["runs"], doc["main_metric"]
    ratios = sorted({r["ratio"] for r in runs if r["kind"] == "winning"})
    candidates = []
    for kind, ratio in [(FULL, 0.0), *(("winning", r) for r in ratios)]:
        scores = per_seed(runs, kind, ratio, "selection", metric)
        if scores:
            percent = next(
                r["percent_remaining"] for r in runs if r["kind"] == kind and r["ratio"] == ratio and r["error"] is None
            )
            candidates.append(
                {
                    "kind": kind,
                    "ratio": ratio,
                    "percent_remaining": percent,
                    **stats(list(scores.values())),
                    "speedup": speedup_of(runs, kind, ratio),  # the full model: 1.0 once measured
                }
            )
    failures = [r for r in runs if r["error"] is not None]
    if not candidates:
        raise UserError(
            "no run of the full model or of a winning ticket finished: nothing to choose from; "
            "see the errors in results.json and rerun to retry"
        )
    if min_speedup is not None:
        candidates = _fast_enough(candidates, min_speedup)
    best = max(candidates, key=lambda c: c["mean"])  # max() keeps the first of equals: the full model, then low ratios
    candidates = sorted(candidates, key=lambda c: -c["mean"])
    kind, ratio = best["kind"], best["ratio"]
    chosen_sel, chosen_rep = (
        per_seed(runs, kind, ratio, "selection", metric),
        per_seed(runs, kind, ratio, "report", metric),
    )
    full_sel, full_rep = per_seed(runs, FULL, 0.0, "selection", metric), per_seed(runs, FULL, 0.0, "report", metric)
    if kind == FULL:  # nothing to compare: the full model against itself
        compared = {
            "n": 0,
            "mean": None,
            "ci": None,
            "p_value": None,
            "note": "the full model scored best on the selection part: no pruned ticket beat it",
        }
    else:
        compared = paired(chosen_rep, full_rep)
    return Selection(
        metric,
        kind,
        ratio,
        best["percent_remaining"],
        candidates,
        chosen_sel,
        chosen_rep,
        full_sel,
        full_rep,
        compared["mean"],
        compared["p_value"],
        compared["ci"],
        compared["n"],
        compared["note"],
        failures,
        best["speedup"],
        min_speedup,
    )
