"""Domain adaptation (the paper's Table 4): fine-tune several starting models on a new task with
0.1%, 1%, 10% and 100% of its training data, over seeds, and tabulate mean ± std per fraction.

A starting model is a pre-trained model name or path, a fine-tuned checkpoint, or a multi-task
folder from `st share`; each (start, fraction, seed) is an ordinary resumable `run_finetune`.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from st.errors import UserError
from st.io import write_json, write_text
from st.models.weights import ST_FORMAT, read_config, resolve_model_dir
from st.pipeline import Job, run_finetune
from st.share import is_multitask_dir

FRACTIONS = (0.001, 0.01, 0.1, 1.0)


def start_job(base: Job, source: str) -> Job:
    """`base` starting from `source`: a checkpoint (ours or multi-task) continues, anything else is pre-trained."""
    path = Path(source)
    if path.is_dir() and (is_multitask_dir(path) or read_config(path).get("format") == ST_FORMAT):
        return replace(base, init=str(path))
    resolve_model_dir(source)  # fails early, naming the problem, before any run starts
    return replace(base, model=source, init=None)


def run_adapt(base: Job, sources: dict[str, str], fractions=FRACTIONS, seeds=(0,), out: str | Path = "adapt") -> dict:
    """Every (source, fraction, seed) run; returns {"rows": [...], "table": {source: {fraction: stats}}}."""
    if not sources:
        raise UserError("pass at least one --from NAME=MODEL_OR_CHECKPOINT")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"--fractions must be in (0, 1], got {list(fractions)}")
    out = Path(out)
    rows = []
    for name, source in sources.items():
        start = start_job(base, source)
        for fraction in fractions:
            for seed in seeds:
                job = replace(start, train_fraction=None if fraction == 1 else fraction, train=replace(start.train, seed=seed))
                result = run_finetune(job, out / name / f"fraction{fraction:g}-seed{seed}")
                rows.append({"source": name, "fraction": fraction, "seed": seed,
                             "main_metric": result["main_metric"], "score": result["dev"][result["main_metric"]], "dev": result["dev"]})
    table = {name: {} for name in sources}
    for name in sources:
        for fraction in fractions:
            scores = [r["score"] for r in rows if r["source"] == name and r["fraction"] == fraction]
            table[name][fraction] = {"mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "n": len(scores)}
    result = {"task": base.task, "fractions": list(fractions), "seeds": list(seeds), "rows": rows, "table": table}
    write_json(out / "results.json", result)
    write_text(out / "report.md", report_markdown(result))
    return result


def report_markdown(result: dict) -> str:
    metric = result["rows"][0]["main_metric"]
    header = "| start | " + " | ".join(f"{f:.1%}" for f in result["fractions"]) + " |"
    lines = [f"# Domain adaptation on {result['task']}", "",
             f"Dev {metric} (mean ± std over seeds {result['seeds']}) with a fraction of the training data.", "",
             header, "|" + "---|" * (len(result["fractions"]) + 1)]
    for name, by_fraction in result["table"].items():
        cells = [f"{s['mean']:.4f} ± {s['std']:.4f}" for s in by_fraction.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
