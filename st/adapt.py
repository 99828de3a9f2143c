"""Domain adaptation (the paper's Table 4): fine-tune several starting models on a new task with
0.1%, 1%, 10% and 100% of its training data, over seeds, and tabulate mean ± std per fraction.

A starting model is a pre-trained model name or path, a fine-tuned checkpoint, or a multi-task
folder from `st share`; each (start, fraction, seed) is an ordinary resumable `run_finetune`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from st.errors import UserError
from st.io import write_json, write_text
from st.models.weights import ST_FORMAT, read_config, resolve_model_dir
from st.multitask import is_multitask_dir
from st.pipeline import run_finetune
from st.report_mtl import adapt_markdown
from st.select import stats
from st.specs import RunSpec

FRACTIONS = (0.001, 0.01, 0.1, 1.0)


def start_spec(base: RunSpec, source: str) -> RunSpec:
    """`base` starting from `source`: a checkpoint (ours or multi-task) continues, anything else is pre-trained."""
    path = Path(source)
    if path.is_dir() and (is_multitask_dir(path) or read_config(path).get("format") == ST_FORMAT):
        return replace(base, model=replace(base.model, init=str(path)))
    resolve_model_dir(source)  # fails early, naming the problem, before any run starts
    return replace(base, model=replace(base.model, name=source, init=None))


def run_adapt(
    base: RunSpec,
    sources: dict[str, str],
    fractions=FRACTIONS,
    seeds=(0,),
    out: str | Path = "adapt",
    *,
    device: str = "cpu",
) -> dict:
    """Every (source, fraction, seed) run; returns {"rows": [...], "table": {source: {fraction: stats}}}."""
    if not sources:
        raise UserError("pass at least one --from NAME=MODEL_OR_CHECKPOINT")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"--fractions must be in (0, 1], got {list(fractions)}")
    out = Path(out)
    rows = []
    for name, source in sources.items():
        start = start_spec(base, source)
        for fraction in fractions:
            for seed in seeds:
                data = replace(start.data, train_fraction=None if fraction == 1 else fraction)
                result = run_finetune(
                    replace(start, data=data, seed=seed), out / name / f"fraction{fraction:g}-seed{seed}", device=device
                )
                rows.append(
                    {
                        "source": name,
                        "fraction": fraction,
                        "seed": seed,
                        "main_metric": result["main_metric"],
                        "score": result["dev"][result["main_metric"]],
                        "dev": result["dev"],
                        "report": result.get("report"),
                    }
                )
    table = {
        name: {
            fraction: stats([r["score"] for r in rows if r["source"] == name and r["fraction"] == fraction])
            for fraction in fractions
        }
        for name in sources
    }
    result = {"task": base.data.task, "fractions": list(fractions), "seeds": list(seeds), "rows": rows, "table": table}
    write_json(out / "results.json", result)
    write_text(out / "report.md", adapt_markdown(result))
    return result
