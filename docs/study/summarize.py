"""The study's report (docs/study/PLAN.md): every number in REPORT.md from the JSON in results/.

    python docs/study/summarize.py                      # results/*.json -> REPORT.md and the plots
    python docs/study/summarize.py --collect runs/study # first gather the runs' JSON into results/

Statistics are st.select's: mean ± std over seeds (`stats`), and for a comparison the paired
difference with its 95% bootstrap interval and paired t-test (`paired`). Scores are on the test
split; epochs and super tickets were chosen on dev.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from st.report import plot_phase
from st.select import FULL, fmt, fmt_paired, paired, select_super_ticket, stats

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SWEEPS = {"rt": "rotten_tomatoes", "bbc": "bbc_news", "mpnet": "rotten_tomatoes", "mpnet-bbc": "bbc_news"}
MODELS = {
    "rt": "all-MiniLM-L6-v2",
    "bbc": "all-MiniLM-L6-v2",
    "mpnet": "all-mpnet-base-v2",
    "mpnet-bbc": "all-mpnet-base-v2",
}
SIZES = (("rt", "mpnet"), ("bbc", "mpnet-bbc"))  # H6: each task's sweep on MiniLM (22M) and on MPNet (110M)
MTL_TASKS = ("rotten_tomatoes", "bbc_news")


# ---- collecting: run folders -> results/*.json ----------------------------------------------------


def collect(runs: Path) -> None:
    RESULTS.mkdir(exist_ok=True)
    # Merged into what is there: a later part's pilot (run in a fresh checkout) keeps the earlier ones.
    pilot = json.loads((RESULTS / "pilot.json").read_text()) if (RESULTS / "pilot.json").exists() else {}
    for log in sorted((runs / "pilot").glob("*.log")):  # the logs hold every epoch, also of a stopped run
        epochs = [float(x) for x in re.findall(r"epoch \d+: dev accuracy ([0-9.]+)", log.read_text())]
        settings = json.loads((runs / "pilot" / log.stem / "run.json").read_text())
        pilot[log.stem] = {
            "task": settings["task"],
            "model": settings.get("model", "minilm-l6"),
            "train_size": settings["train_size"],
            "batch_size": settings["train"]["batch_size"],
            "dev_accuracy_by_epoch": epochs,
        }
    write(RESULTS / "pilot.json", pilot)
    for part in SWEEPS:
        if (runs / part / "results.json").exists():
            write(RESULTS / f"{part}.json", json.loads((runs / part / "results.json").read_text()))
    rows = []
    for folder in sorted((runs / "mtl").glob("*-seed*")):
        if not (folder / "metrics.json").exists():
            continue
        method, seed, tuned = re.fullmatch(r"(mtdnn|shared)-seed(\d+)(?:-ft-(\w+))?", folder.name).groups()
        m = json.loads((folder / "metrics.json").read_text())
        for task in [tuned] if tuned else MTL_TASKS:
            dev = m["dev"] if tuned else m["dev"][task]
            # st share writes the report split under "report" (runs before that, under "extra_dev")
            test = m["report"] if tuned else m.get("report", {}).get(task) or m["extra_dev"][task]["test"]
            rows.append(
                {
                    "method": method,
                    "fine_tuned": bool(tuned),
                    "seed": int(seed),
                    "task": task,
                    "dev": dev,
                    "test": test,
                    **({} if tuned else {"percent_remaining": m["percent_remaining"]}),
                }
            )
    if rows:
        write(RESULTS / "mtl.json", {"rows": rows})
    adapt = []
    for result in sorted((runs / "adapt").glob("seed*/results.json")):
        adapt += [
            {k: r[k] for k in ("source", "fraction", "seed", "dev", "report")}
            for r in json.loads(result.read_text())["rows"]
        ]
    if adapt:
        write(RESULTS / "adapt.json", {"task": "presidential_debates", "rows": adapt})


def compare(a: dict[int, float], b: dict[int, float]) -> str:
    d = paired(a, b)
    return fmt_paired(d["mean"], d["ci"], d["n"], d["p_value"]) if d["n"] else "no seed has both"


def write(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")


# ---- rendering: results/*.json -> REPORT.md ----------------------------------------------------------


def sweep_section(part: str, doc: dict) -> list[str]:
    runs, metric = doc["runs"], doc["main_metric"]
    s = doc["settings"]
    seeds = sorted({r["seed"] for r in runs if r["kind"] == FULL and r["error"] is None})

    def test(kind, ratio):
        return {
            r["seed"]: r["report"][metric]
            for r in runs
            if (r["kind"], r["ratio"]) == (kind, ratio) and r["error"] is None
        }

    sel = select_super_ticket(doc)
    plot_phase(doc, sel, HERE / f"{part}_phase.png")
    job = s["job"]
    lines = [
        f"## {doc['task']}, {MODELS[part]}: the phase transition",
        "",
        f"{job['train_size']} training examples, {job['train']['epochs']} epochs, batch {job['train']['batch_size']}, "
        f"lr {job['train']['lr']:g}, max length {job['max_length']}, "
        f"{job['train'].get('precision', 'fp32')}; seeds {', '.join(map(str, seeds))} "
        f"({len(seeds)} of {s['seeds']} finished). Test {metric} ×100, mean ± std over seeds; "
        "epochs and the super ticket chosen on all of dev.",
        "",
        "| r | % encoder weights | winning | random | losing | winning − full (paired) |",
        "|---|---|---|---|---|---|",
    ]
    full = test(FULL, 0.0)
    lines.append(f"| 0 (full) | 100.0 | {fmt(stats(list(full.values())), s['seeds'])} | | | |")
    for ratio in s["ratios"]:
        kept = next(
            (
                r["percent_remaining"]["encoder"]
                for r in runs
                if (r["kind"], r["ratio"]) == ("winning", ratio) and r["percent_remaining"]
            ),
            None,
        )
        if kept is None:  # not run yet
            continue
        cells = [
            fmt(stats(list(test(kind, ratio).values())), s["seeds"]) if test(kind, ratio) else ""
            for kind in ("winning", "random", "losing")
        ]
        bold = "**" if (sel.kind, sel.ratio) == ("winning", ratio) else ""
        lines.append(
            f"| {bold}{ratio:g}{bold} | {kept:.1f} | "
            + " | ".join(cells)
            + f" | {compare(test('winning', ratio), full)} |"
        )
    lines += ["", f"![phase transition]({part}_phase.png)", ""]
    if sel.kind == FULL:
        best = next(c for c in sel.candidates if c["kind"] != FULL)
        lines.append(
            "**H1, super ticket.** No winning ticket beat the full model on dev "
            f"({fmt(stats(list(sel.selection.values())))}; "
            f"the best, r = {best['ratio']:g}, scored {fmt(best)}): the super ticket is the full model itself."
        )
    else:
        lines.append(
            f"**H1, super ticket.** Chosen on dev: the winning ticket at r = {sel.ratio:g} (dev "
            f"{fmt(stats(list(sel.selection.values())))} vs the full model's "
            f"{fmt(stats(list(sel.full_selection.values())))})."
        )
    if sel.kind != FULL:
        lines.append(
            f"On test it scores {fmt(stats(list(sel.report.values())))} vs "
            f"{fmt(stats(list(sel.full_report.values())))}: "
            f"{fmt_paired(sel.gain, sel.ci, sel.n_paired, sel.p_value)}."
        )
    lines += ["", "**H3, importance matters** (test, paired over seeds):", ""]
    for ratio in s.get("control_ratios", s["ratios"]):
        for control in ("random", "losing"):
            lines.append(
                f"- r = {ratio:g}, winning − {control}: {compare(test('winning', ratio), test(control, ratio))}"
            )
    return lines + [""]


def size_section(load) -> list[str]:
    """H6: the super ticket's test gain on the 110M MPNet next to the 22M MiniLM's, task by task."""
    lines = ["## H6, model size: the super ticket's gain (test, paired over seeds)", ""]
    for small, large in SIZES:
        if not (load(small) and load(large)):
            lines.append(f"- {SWEEPS[small]}: not run on both models")
            continue
        for part in (small, large):
            sel = select_super_ticket(load(part))
            gain = (
                fmt_paired(sel.gain, sel.ci, sel.n_paired, sel.p_value)
                if sel.kind != FULL
                else "none: the full model is its own super ticket (gain 0 by construction)"
            )
            where = f"r = {sel.ratio:g}" if sel.kind != FULL else "full model"
            lines.append(f"- {SWEEPS[part]}, {MODELS[part]} ({where}): {gain}")
    lines += ["", "Descriptive, as planned: the intervals side by side; 3 seeds against 5 cannot test H6.", ""]
    return lines


def mtl_section(doc: dict) -> list[str]:
    rows = doc["rows"]

    def score(method, tuned, task):
        return {
            r["seed"]: r["test"]["accuracy"]
            for r in rows
            if (r["method"], r["fine_tuned"], r["task"]) == (method, tuned, task)
        }

    def average(method, tuned):
        return {
            s: sum(score(method, tuned, t)[s] for t in MTL_TASKS) / len(MTL_TASKS)
            for s in set.intersection(*(set(score(method, tuned, t)) for t in MTL_TASKS))
        }

    lines = [
        "## Multi-task learning: MT-DNN vs ticket sharing",
        "",
        "Test accuracy ×100, mean ± std over seeds; each task's ticket is its sweep's super ticket (the full "
        "model's all-ones ticket where no pruned ticket won). Ticket sharing keeps "
        + ", ".join(
            sorted(
                {
                    f"{r['percent_remaining']['encoder']:.1f}%"
                    for r in rows
                    if r["method"] == "shared" and not r["fine_tuned"]
                }
            )
        )
        + " of the encoder's weights (the union of the tickets).",
        "",
        "| method | " + " | ".join(MTL_TASKS) + " | average |",
        "|---|---|---|---|",
    ]
    for method, label in (("mtdnn", "MT-DNN"), ("shared", "Ticket sharing")):
        for tuned in (False, True):
            cells = [fmt(stats(list(score(method, tuned, t).values()))) for t in MTL_TASKS]
            lines.append(
                f"| {label}{' + fine-tuning' if tuned else ''} | "
                + " | ".join(cells)
                + f" | {fmt(stats(list(average(method, tuned).values())))} |"
            )
    lines += ["", "**H4** (ticket sharing − MT-DNN, test, paired over seeds):", ""]
    for tuned in (False, True):
        for task in (*MTL_TASKS, "average"):
            a, b = (
                (average("shared", tuned), average("mtdnn", tuned))
                if task == "average"
                else (score("shared", tuned, task), score("mtdnn", tuned, task))
            )
            lines.append(f"- {task}{' after fine-tuning' if tuned else ''}: {compare(a, b)}")
    return lines + [""]


def adapt_section(doc: dict) -> list[str]:
    rows = doc["rows"]
    fractions = sorted({r["fraction"] for r in rows})

    def score(source, f):
        return {r["seed"]: r["report"]["accuracy"] for r in rows if (r["source"], r["fraction"]) == (source, f)}

    lines = [
        f"## Domain adaptation to {doc['task']}",
        "",
        "Test accuracy ×100, mean ± std over seeds, starting from each seed's multi-task model.",
        "",
        "| start | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for source, label in (("mtdnn", "MT-DNN"), ("shared", "Ticket sharing")):
        lines.append(
            f"| {label} | " + " | ".join(fmt(stats(list(score(source, f).values()))) for f in fractions) + " |"
        )
    lines += ["", "**H5** (ticket sharing − MT-DNN, test, paired over seeds):", ""]
    for f in fractions:
        lines.append(f"- {f:.0%} of the training data: {compare(score('shared', f), score('mtdnn', f))}")
    return lines + [""]


def pilot_section(doc: dict) -> list[str]:
    lines = [
        "## Pilot (dev accuracy ×100 by epoch, seed 100)",
        "",
        "| run | model | task | train | batch | by epoch |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in doc.items():
        lines.append(
            f"| {name} | {p.get('model', 'minilm-l6')} | {p['task']} | {p['train_size'] or 'all'} | "
            f"{p['batch_size']} | " + ", ".join(f"{100 * a:.1f}" for a in p["dev_accuracy_by_epoch"]) + " |"
        )
    return lines + [""]


def render() -> str:
    def load(name):
        return json.loads((RESULTS / f"{name}.json").read_text()) if (RESULTS / f"{name}.json").exists() else None

    lines = [
        "# Study report: super tickets on real data",
        "",
        "Plan: [PLAN.md](PLAN.md). Rendered by `python docs/study/summarize.py` from `results/*.json`; "
        "comparisons: paired difference A − B over seeds with a 95% percentile-bootstrap interval and the "
        "two-sided paired t-test (`st.select.paired`).",
        "",
    ]
    for part, section in (
        *((p, sweep_section) for p in SWEEPS),
        ("mtl", mtl_section),
        ("adapt", adapt_section),
        ("pilot", pilot_section),
    ):
        doc = load(part)
        lines += (
            [*(section(part, doc) if section is sweep_section else section(doc))]
            if doc
            else [f"## {part}: not run", ""]
        )
        if part == list(SWEEPS)[-1]:
            lines += size_section(load)
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--collect", type=Path, metavar="RUNS", help="gather the JSON of the study's runs (runs/study) first"
    )
    args = parser.parse_args()
    if args.collect:
        collect(args.collect)
    (HERE / "REPORT.md").write_text(render())
    print((HERE / "REPORT.md").read_text())
