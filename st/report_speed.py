"""Speed beside accuracy in a sweep's report: the speed-up column, the note saying how it was
measured, the labels on the phase plot, and the deploy ticket's lines (no torch: the numbers were
measured by `st.speed` and stored in results.json; a file without them shows "—")."""

from __future__ import annotations

from st.layout import FULL
from st.select import Selection, fmt, fmt_paired, speedup_of, stats

NOT_MEASURED = "—"


def speedup_text(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.2f}×"


def speed_cell(doc: dict, ratio: float) -> str:
    """The winning ticket's measured speed-up at `ratio` (the full model's at 0), or "—"."""
    return speedup_text(speedup_of(doc["runs"], FULL if ratio == 0 else "winning", ratio))


def speed_note(doc: dict) -> str:
    """How the speed-up column was measured, or how to measure it."""
    speed = doc.get("speed")
    if not speed:
        return (
            "Speed-ups: not measured for this sweep (—); `st report DIR --measure-speed` measures them on this machine."
        )
    w = speed["workload"]
    return (
        f"Speed-ups: the winning ticket's inference speed-up over the full model, {speed['runtime']} on "
        f"{speed['cpu']}, batch {w['batch']} × {w['seq']} tokens, {w['threads']} thread(s), median of "
        f"{w['rounds']} round-robin rounds (`st report DIR --measure-speed` re-measures)."
    )


def annotate(ax, doc: dict, ratios: list[float], xs: list[float], ys: list[float]) -> None:
    """Each winning point's speed-up, written above it on the phase plot."""
    for ratio, x, y in zip(ratios, xs, ys):
        value = speedup_of(doc["runs"], FULL if ratio == 0 else "winning", ratio)
        if value is not None and ratio != 0:
            ax.annotate(f"{value:.2f}×", (x, y), textcoords="offset points", xytext=(0, 7), fontsize=7, ha="center")


def ticket_name(sel: Selection) -> str:
    if sel.kind == FULL:
        return "the full model"
    return f"the winning ticket at r = {sel.ratio:g}" + (
        f" ({sel.percent_remaining['model']:.1f}% of weights)" if sel.percent_remaining else ""
    )


def deploy_lines(sel: Selection) -> list[str]:
    """The deploy ticket: what was chosen under the speed target, its speed-up, and its difference
    from the full model on the report part with the interval (the super ticket's rule and numbers)."""
    head = (
        f"deploy ticket (speed-up ≥ {sel.min_speedup:g}×): {ticket_name(sel)}, {speedup_text(sel.speedup)} the "
        f"full model's speed, chosen on the selection part ({sel.metric} {fmt(stats(list(sel.selection.values())))})"
    )
    if sel.kind == FULL:
        return [head + "; it is the full model, so there is no difference to report"]
    diff = (
        fmt_paired(sel.gain, sel.ci, sel.n_paired, sel.p_value)
        if sel.gain is not None
        else "no seed to compare on (n/a)"
    )
    return [
        head,
        f"on the report part: {fmt(stats(list(sel.report.values())))} vs the full model's "
        f"{fmt(stats(list(sel.full_report.values())))}, difference {diff}",
        sel.test_note,
    ]


def deploy_fields(doc: dict, sel: Selection) -> dict:
    """What deploy_ticket.json adds to a super_ticket.json-shaped file."""
    return {
        "note": f"the most accurate ticket on the selection part whose measured speed-up is at least "
        f"{sel.min_speedup:g}x: {ticket_name(sel)}",
        "min_speedup": sel.min_speedup,
        "speedup": sel.speedup,
        "speed": doc.get("speed"),
    }
