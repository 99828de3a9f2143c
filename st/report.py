"""A sweep's results as people read them: the phase-transition table (rich and markdown), the phase
plot, and super_ticket.json. Everything here is rendered from results.json alone (plus the ticket
files and run configs it names), so `st report DIR` redoes it at any time, without loading torch:
nothing here imports a module that does.

Scores are shown ×100 (GLUE style); means ± sample standard deviations over seeds, and comparisons
as paired differences with a 95% bootstrap CI and a paired t-test's p-value (`st.select`).
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from st.errors import UserError
from st.io import atomic_path, read_json, strict_json, write_json, write_text
from st.layout import (
    CONFIG,
    DEPLOY_TICKET,
    FULL,
    PLOT,
    REPORT,
    RESULTS,
    SUPER_TICKET,
    check_results,
    full_ticket_json,
    run_dir,
    ticket_path,
)
from st.report_speed import annotate, deploy_fields, deploy_lines, speed_cell, speed_note, ticket_name
from st.select import Selection, fmt, fmt_paired, fmt_value, per_seed, select_super_ticket, stats

COLOURS = {"winning": "tab:green", "random": "tab:blue", "losing": "tab:red"}


def load_results(out: str | Path) -> dict:
    path = Path(out) / RESULTS
    try:
        doc = strict_json(path.read_text(encoding="utf-8"))  # st writes null for an undefined metric
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a folder written by `st sweep`") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); rerun the sweep to rewrite it") from None
    if not isinstance(doc, dict) or not {"runs", "main_metric", "settings"} <= set(doc):
        raise UserError(f"{path} is not an `st sweep` results file")
    check_results(doc, path)
    return doc


def render(out: str | Path, min_speedup: float | None = None) -> Selection:
    """Write report.md, phase.png and super_ticket.json from out/results.json; returns the selection."""
    return render_all(out, min_speedup)[0]


def render_all(out: str | Path, min_speedup: float | None = None) -> tuple[Selection, Selection | None]:
    """`render`, and with `min_speedup` the deploy ticket too (deploy_ticket.json, a section of report.md);
    returns both. An impossible target is one UserError after the sweep's own report is written."""
    out, deploy = Path(out), None
    doc = load_results(out)
    selection = select_super_ticket(doc)
    try:
        deploy = None if min_speedup is None else select_super_ticket(doc, min_speedup)
    finally:  # the sweep's own report renders even when no ticket is fast enough
        write_json(out / SUPER_TICKET, super_ticket(out, doc, selection))
        if deploy is not None:
            write_json(out / DEPLOY_TICKET, {**super_ticket(out, doc, deploy), **deploy_fields(doc, deploy)})
        plot_phase(doc, selection, out / PLOT)
        write_text(out / REPORT, markdown(doc, selection, deploy))
    return selection, deploy


# ---- numbers ---------------------------------------------------------------------------------------


def points(doc: dict) -> list[tuple[float, float | None]]:
    """(ratio, percent of the model's weights remaining) for r = 0 and every ratio of the grid."""
    runs, found = doc["runs"], {0.0: 100.0}
    for r in runs:
        if r["error"] is None and r["percent_remaining"]:
            found.setdefault(r["ratio"], r["percent_remaining"]["model"])
    ratios = sorted({0.0, *doc["settings"]["ratios"]})
    return [(ratio, found.get(ratio)) for ratio in ratios]


def cell(doc: dict, kind: str, ratio: float, part: str) -> dict:
    """Mean/std/n of the main metric over seeds; r = 0 is the full model whatever the kind."""
    return stats(list(per_seed(doc["runs"], FULL if ratio == 0 else kind, ratio, part, doc["main_metric"]).values()))


def _kinds(doc: dict) -> list[str]:
    return doc["settings"]["kinds"]  # SweepConfig keeps them in the canonical order: winning, random, losing


def _is_chosen(sel: Selection, kind: str, ratio: float, kinds: list[str]) -> bool:
    # r = 0 is the full model in every column: mark it once, in the first
    return (ratio == 0 and sel.kind == FULL and kind == kinds[0]) or (kind == sel.kind and ratio == sel.ratio)


# ---- rich ------------------------------------------------------------------------------------------


def phase_table(doc: dict, selection: Selection | None = None, part: str = "report") -> Table:
    """The phase-transition table for the terminal: one row per ratio, one column per kind."""
    seeds = doc["settings"]["seeds"]
    title = f"{doc['task']}: {doc['main_metric']} on the {part} part, mean ± std over {seeds} seed{'s' * (seeds > 1)}"
    table = Table("r", "% weights", "speed-up", *_kinds(doc), title=title)
    for ratio, percent in points(doc):
        row = []
        for kind in _kinds(doc):
            text = fmt(cell(doc, kind, ratio, part), seeds)
            chosen = selection is not None and _is_chosen(selection, kind, ratio, _kinds(doc))
            row.append(f"[bold green]{text} *[/]" if chosen else text)
        r, share = "0 (full)" if ratio == 0 else f"{ratio:g}", "—" if percent is None else f"{percent:.1f}"
        table.add_row(r, share, speed_cell(doc, ratio), *row)
    return table


def summary_lines(selection: Selection) -> list[str]:
    """What was chosen and what it gains on the report part, in a few sentences. From one seed
    nothing is claimed: the spread between seeds is larger than most gains (a smoke test)."""
    sel = selection
    if max(c["n"] for c in sel.candidates) < 2:
        return [
            f"one seed is a smoke test, not evidence: no super ticket is claimed (run --seeds 3 or more); "
            f"on the selection part the best was {ticket_name(sel)} ({sel.metric} "
            f"{fmt(stats(list(sel.selection.values())))})",
            *([f"{len(sel.failures)} run(s) failed"] if sel.failures else []),
        ]
    if sel.kind == FULL:
        lines = [
            f"super ticket: the full model ({sel.metric} {fmt(stats(list(sel.selection.values())))} on the "
            "selection part; "
            f"report part {fmt(stats(list(sel.report.values())))})"
        ]
    else:
        lines = [
            f"super ticket: {ticket_name(sel)}, chosen on the selection part "
            f"({sel.metric} {fmt(stats(list(sel.selection.values())))} vs the full model's "
            f"{fmt(stats(list(sel.full_selection.values())))})"
        ]
    if sel.kind != FULL:
        lines.append(
            f"on the report part: {fmt(stats(list(sel.report.values())))} vs the full model's "
            f"{fmt(stats(list(sel.full_report.values())))}"
            + (f", gain {fmt_paired(sel.gain, sel.ci, sel.n_paired, sel.p_value)}" if sel.gain is not None else "")
        )
    lines.append(sel.test_note)  # how the interval and p-value were computed, or why there are none
    if sel.failures:
        lines.append(
            f"{len(sel.failures)} run(s) failed: "
            + "; ".join(f"seed {r['seed']} {run_label(r)}: {r['error']}" for r in sel.failures)
        )
    return lines


def run_label(record: dict) -> str:
    return FULL if record["kind"] == FULL else f"{record['kind']} r={record['ratio']:g}"


# ---- markdown --------------------------------------------------------------------------------------


def _md_table(doc: dict, selection: Selection, part: str) -> list[str]:
    kinds, seeds = _kinds(doc), doc["settings"]["seeds"]
    lines = ["| r | % weights | speed-up | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
    for ratio, percent in points(doc):
        cells = []
        for kind in kinds:
            text = fmt(cell(doc, kind, ratio, part), seeds)
            cells.append(f"**{text}**" if _is_chosen(selection, kind, ratio, kinds) and text != "—" else text)
        lines.append(
            f"| {'0 (full)' if ratio == 0 else f'{ratio:g}'} | {'—' if percent is None else f'{percent:.1f}'} | "
            + f"{speed_cell(doc, ratio)} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def markdown(doc: dict, selection: Selection, deploy: Selection | None = None) -> str:
    s, job, sel = doc["settings"], doc["settings"]["job"], selection
    seeds = [job["train"]["seed"] + i for i in range(s["seeds"])]
    dev = f"a sample of {s['dev_size']} dev examples" if s["dev_size"] else "the dev set"
    controls = s.get("control_ratios", s["ratios"])
    if s.get("report_split"):
        held_out = (
            f"For each seed, {dev} chooses every run's epoch and the super ticket (the selection part); the "
            f"{s['report_split']} split, evaluated once per run on the chosen weights, is the report part. "
        )
    else:
        held_out = (
            f"For each seed, {dev} is split with the seed into a selection part ({s['select_fraction']:g} of "
            "it), which "
            "chooses every run's epoch and the super ticket, and a report part, used only for the numbers "
            "reported here. "
        )
    lines = [
        f"# Super tickets: {doc['task']} on {job['model']}",
        "",
        f"Seeds {', '.join(map(str, seeds))}; ratios {', '.join(f'{r:g}' for r in s['ratios'])}"
        + (
            f" (random and losing tickets at {', '.join(f'{r:g}' for r in controls)})"
            if controls != s["ratios"]
            else ""
        )
        + f"; tickets {', '.join(s['kinds'])}; "
        f"{job['train_size'] or 'all'} training examples, {job['train']['epochs']} epoch(s), batch "
        f"{job['train']['batch_size']}, "
        f"lr {job['train']['lr']:g}, max length {job['max_length']}.",
        held_out
        + f"Scores are {doc['main_metric']} ×100, mean ± standard deviation over seeds; r = 0 is the full model; "
        "the super ticket is in bold. Its gain is the mean paired difference from the full model over seeds, "
        "with a 95% bootstrap confidence interval and a paired t-test's p-value. " + speed_note(doc),
        "",
        "## Phase transition: report part",
        "",
        *_md_table(doc, sel, "report"),
        "",
        "## Phase transition: selection part",
        "",
        *_md_table(doc, sel, "selection"),
        "",
        "## Super ticket",
        "",
        *summary_lines(sel)[:3],
        "",
    ]
    if sel.kind != FULL:
        lines += [
            "| seed | super ticket (selection) | full model (selection) | super ticket (report) | full model "
            "(report) | difference (report) |",
            "|---|---|---|---|---|---|",
        ]

        def num(d, k):
            return fmt_value(d[k]) if k in d else "—"

        for seed in seeds:
            diff = (
                fmt_value(sel.report[seed] - sel.full_report[seed], sign=True)
                if seed in sel.report and seed in sel.full_report
                else "—"
            )
            lines.append(
                f"| {seed} | {num(sel.selection, seed)} | {num(sel.full_selection, seed)} | "
                f"{num(sel.report, seed)} | {num(sel.full_report, seed)} | {diff} |"
            )
        lines.append("")

    def name(c):
        return "full" if c["kind"] == FULL else f"r={c['ratio']:g}"

    lines += [
        "Candidates by mean selection score: " + ", ".join(f"{name(c)} {fmt_value(c['mean'])}" for c in sel.candidates),
        "",
    ]
    if deploy is not None:
        lines += ["## Deploy ticket", "", *deploy_lines(deploy), ""]
    if sel.failures:
        lines += [
            "## Failed runs",
            "",
            *(f"- seed {r['seed']}, {run_label(r)}: `{r['error']}`" for r in sel.failures),
            "",
            "Rerun the same `st sweep` command to retry them; finished runs are kept.",
            "",
        ]
    return "\n".join(lines)


# ---- plot ------------------------------------------------------------------------------------------


def plot_phase(doc: dict, selection: Selection, path: str | Path) -> None:
    """Mean ± std against percent of weights remaining, per kind, on both dev parts; the full model
    as a line, the super ticket as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    where = dict(points(doc))
    for ax, part in zip(axes, ("selection", "report")):
        full = cell(doc, FULL, 0.0, part)
        if full["mean"] is not None:
            ax.axhline(100 * full["mean"], color="black", linestyle="--", linewidth=1, label="full model")
            if full["std"] is not None:
                ax.axhspan(
                    100 * (full["mean"] - full["std"]), 100 * (full["mean"] + full["std"]), color="black", alpha=0.06
                )
        for kind in _kinds(doc):
            xs, ys, es, rs = [], [], [], []
            for ratio, percent in points(doc):
                c = cell(doc, kind, ratio, part)
                if c["mean"] is not None and percent is not None:
                    xs.append(percent), ys.append(100 * c["mean"]), es.append(100 * (c["std"] or 0.0)), rs.append(ratio)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=4, color=COLOURS[kind], label=kind)
                if kind == "winning":  # speed beside accuracy: each winning ticket's measured speed-up
                    annotate(ax, doc, rs, xs, ys)
                ax.fill_between(
                    xs,
                    [y - e for y, e in zip(ys, es)],
                    [y + e for y, e in zip(ys, es)],
                    color=COLOURS[kind],
                    alpha=0.15,
                )
        chosen = cell(doc, selection.kind, selection.ratio, part)
        if chosen["mean"] is not None and where.get(selection.ratio) is not None:
            ax.plot(
                [where[selection.ratio]],
                [100 * chosen["mean"]],
                marker="*",
                markersize=16,
                color="gold",
                markeredgecolor="black",
                linestyle="none",
                label="super ticket",
                zorder=5,
            )
        split = doc["settings"].get("report_split")  # --report-split: all of dev chooses, that split reports
        names = {
            "selection": "dev" if split else "selection part",
            "report": f"{split} split" if split else "report part",
        }
        ax.set(
            title=names[part] + (" (chooses the ticket)" if part == "selection" else " (held out)"),
            xlabel="% of weights remaining",
        )
        ax.invert_xaxis()  # left to right: more and more pruned
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{doc['main_metric']} ×100")
    axes[1].legend(loc="best", fontsize="small")
    seeds = doc["settings"]["seeds"]
    fig.suptitle(f"{doc['task']}: phase transition over {seeds} seed{'s' * (seeds > 1)}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


# ---- super_ticket.json ---------------------------------------------------------------------------


def super_ticket(out: Path, doc: dict, selection: Selection) -> dict:
    """The chosen ticket (a representative seed's: the first seed whose run finished) as a loadable
    ticket file, plus how it was chosen and what it scored. For the full model: the all-ones ticket."""
    sel = selection
    seed = min(sel.selection)
    if sel.kind == FULL:
        config = _read(run_dir(out, seed, FULL, 0.0) / CONFIG, "run config")["encoder"]
        ticket = full_ticket_json(config, seed)
        note = "the full model: no pruned ticket beat it on the selection part"
        files = {}
    else:
        ticket = _read(ticket_path(out, seed, sel.kind, sel.ratio), "ticket")
        note = (
            f"the winning ticket at r = {sel.ratio:g}; ticket of seed {seed} (each seed's scores give its own ticket)"
        )
        files = {str(s): str(ticket_path(".", s, sel.kind, sel.ratio)) for s in sorted(sel.selection)}

    def part(d):
        return {"per_seed": {str(k): v for k, v in sorted(d.items())}, **stats(list(d.values()))}

    return {
        **ticket,
        "task": doc["task"],
        "note": note,
        "metric": sel.metric,
        "chosen_on": "the selection part of dev; numbers under report are from the held-out "
        + (f"{doc['settings']['report_split']} split" if doc["settings"].get("report_split") else "report part"),
        "ticket_files": files,
        "selection": part(sel.selection),
        "report": part(sel.report),
        "full_model": {"selection": part(sel.full_selection), "report": part(sel.full_report)},
        "gain": sel.gain,
        "ci": sel.ci,
        "p_value": sel.p_value,
        "test": sel.test_note,
        "candidates": sel.candidates,
    }


def _read(path: Path, what: str) -> dict:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise UserError(
            f"{what} {path}, named in results.json, is missing; rerun the same `st sweep` command to complete "
            "the folder"
        ) from None
    except ValueError as e:
        raise UserError(
            f"{what} {path} is not valid JSON ({e}); delete it and rerun the same `st sweep` command"
        ) from None
