"""Summarise docs/mtl/run.sh's runs into report.md: dev accuracy mean ± std over seeds per method
(the paper's Table 3 shape; the std column is Table 5's seed sensitivity)."""

import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mtl")
TASKS, SEEDS = ("rotten_tomatoes", "bbc_news"), (0, 1, 2)


def score(path: Path, task: str) -> float:
    m = json.loads((path / "metrics.json").read_text())
    return m["dev"][task]["accuracy"] if task in m["dev"] else m["dev"]["accuracy"]


rows = {}
for method, label in (("mtdnn", "MT-DNN"), ("shared", "Ticket sharing")):
    rows[label] = {t: [score(out / f"{method}-seed{s}", t) for s in SEEDS] for t in TASKS}
    rows[label + " + ST fine-tuning"] = {t: [score(out / f"{method}-seed{s}-ft-{t}", t) for s in SEEDS] for t in TASKS}
shared = json.loads((out / "shared-seed0" / "metrics.json").read_text())

fmt = lambda xs: f"{100 * statistics.fmean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"  # noqa: E731
lines = ["# Multi-task learning with ticket sharing: rotten_tomatoes + bbc_news", "",
         "Dev accuracy ×100, mean ± std over seeds 0, 1, 2 (the std is the seed sensitivity of Table 5).",
         "256 training examples per task, 2 epochs, batch 16, lr 5e-4, max length 128; fine-tuning after: 1 epoch.",
         f"Ticket sharing keeps {shared['percent_remaining']['encoder']:.1f}% of the encoder's weights (the union of the tickets).", "",
         "| method | rotten_tomatoes | bbc_news | average |", "|---|---|---|---|"]
for label, by_task in rows.items():
    average = [statistics.fmean(v) for v in zip(*by_task.values())]
    lines.append(f"| {label} | " + " | ".join(fmt(by_task[t]) for t in TASKS) + f" | {fmt(average)} |")
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
