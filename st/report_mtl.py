"""Reports of multi-task runs (`st share`) and of domain adaptation (`st adapt`): markdown for
report.md and a rich table for the terminal, from a run's metrics alone (torch-free, like `st.report`).
"""

from __future__ import annotations

from rich.table import Table

from st.select import fmt, fmt_value, stats


def multitask_markdown(result: dict) -> str:
    """report.md of a multi-task run: per-task dev metrics, the average, weights remaining."""
    mode = (
        "ticket sharing (Algorithm 1)" if result["tickets"] == "shared" else "MT-DNN, no tickets (every weight shared)"
    )
    n, pct = result["parameters"], result["percent_remaining"]
    lines = [
        f"# Multi-task model: {', '.join(result['tasks'])}",
        "",
        f"Mode: {mode}. Best epoch {result['best_epoch']} of {len(result['epochs'])} by the average main dev "
        "metric; scores ×100.",
        "",
        "| task | main metric | dev | all dev metrics | ticket heads | ticket FFN | ticket % of encoder |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in result["tasks"]:
        metrics, main, t = result["dev"][name], result["main_metric"][name], result["task_tickets"][name]
        shown = ", ".join(f"{k} {fmt_value(v)}" for k, v in metrics.items())
        lines.append(
            f"| {name} | {main} | {fmt_value(metrics[main])} | {shown} | {t['heads']} | {t['ffn']} | "
            f"{t['percent_encoder']:.1f} |"
        )
    lines += [f"| **average** | | **{fmt_value(result['average'])}** | | | | |", ""]
    undefined = [n for n in result["tasks"] if fmt_value(result["dev"][n][result["main_metric"][n]]) == "n/a"]
    if undefined:
        lines += [
            f"n/a: undefined (e.g. a correlation of constant predictions), counted as 0 in the average: "
            f"{', '.join(undefined)}.",
            "",
        ]
    extra = result.get("extra_dev") or {}
    if extra:
        first = result.get("dev_split") or {}
        lines += [
            "Other held-out splits (further dev sets, --report-split), scored with the same weights (epochs "
            "are chosen on each task's first dev set"
            + (", " + ", ".join(f"{n}: {first[n]}" for n in extra if n in first) if first else "")
            + "):",
            "",
            "| task | split | main metric | score | all metrics |",
            "|---|---|---|---|---|",
        ]
        for name, splits in extra.items():
            main = result["main_metric"][name]
            for split, metrics in splits.items():
                shown = ", ".join(f"{k} {fmt_value(v)}" for k, v in metrics.items())
                lines.append(f"| {name} | {split} | {main} | {fmt_value(metrics.get(main))} | {shown} |")
        lines.append("")
    lines += [
        (
            f"Weights remaining (the union of the tickets, counted from the parameter tensors): encoder "
            f"{n['encoder']:,} of {n['dense_encoder']:,} ({pct['encoder']:.1f}%), whole model with pooler and "
            f"{len(result['tasks'])} task heads {n['model']:,} of {n['dense_model']:,} ({pct['model']:.1f}%)."
        ),
        "",
    ]
    return "\n".join(lines)


def multitask_table(result: dict) -> Table:
    """A rich table of the same."""
    pct = result["percent_remaining"]
    table = Table(
        "task",
        "main metric",
        "dev",
        "ticket % encoder",
        title=f"multi-task dev ({'ticket sharing' if result['tickets'] == 'shared' else 'MT-DNN'}), "
        f"{pct['encoder']:.1f}% of encoder weights remain",
    )
    for name in result["tasks"]:
        main = result["main_metric"][name]
        table.add_row(
            name, main, fmt_value(result["dev"][name][main]), f"{result['task_tickets'][name]['percent_encoder']:.1f}"
        )
        for split, metrics in (result.get("extra_dev") or {}).get(name, {}).items():
            table.add_row(f"  {name} {split}", main, fmt_value(metrics.get(main)), "")
    table.add_row("average", "", fmt_value(result["average"]), "")
    return table


def adapt_markdown(result: dict) -> str:
    """report.md of `st adapt`: the main dev metric per starting model and training fraction."""
    metric = result["rows"][0]["main_metric"]
    header = [
        "| start | " + " | ".join(f"{f:.1%}" for f in result["fractions"]) + " |",
        "|" + "---|" * (len(result["fractions"]) + 1),
    ]
    lines = [
        f"# Domain adaptation on {result['task']}",
        "",
        f"Dev {metric} ×100 (mean ± std over seeds {result['seeds']}) with a fraction of the training data.",
        "",
        *header,
    ]
    for name, by_fraction in result["table"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(s) for s in by_fraction.values()) + " |")
    if all(r.get("report") for r in result["rows"]):  # --report-split: the same runs on that split
        lines += ["", f"The same runs' {metric} on the --report-split split, with the weights dev chose:", "", *header]
        for name in result["table"]:
            lines.append(
                f"| {name} | "
                + " | ".join(
                    fmt(
                        stats(
                            [r["report"][metric] for r in result["rows"] if (r["source"], r["fraction"]) == (name, f)]
                        )
                    )
                    for f in result["fractions"]
                )
                + " |"
            )
    return "\n".join(lines) + "\n"
