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
from st.pipeline import prepare_run, resolve_defaults, run_finetune
from st.report_mtl import adapt_markdown
from st.runs import RunFolder
from st.select import stats
from st.specs import RunSpec
from st.tasks.sampling import check_nonempty, subsample
from st.tracking import Tracking

FRACTIONS = (0.001, 0.01, 0.1, 1.0)


def start_spec(base: RunSpec, source: str) -> RunSpec:
    """`base` starting from `source`: a checkpoint (ours or multi-task) continues, anything else is pre-trained."""
    path = Path(source)
    if path.is_dir() and (is_multitask_dir(path) or read_config(path).get("format") == ST_FORMAT):
        return replace(base, model=replace(base.model, init=str(path)))
    resolve_model_dir(source)  # fails early, naming the problem, before any run starts
    return replace(base, model=replace(base.model, name=source, init=None))


def run_spec_for(start: RunSpec, fraction: float, seed: int) -> RunSpec:
    return replace(start, data=replace(start.data, train_fraction=None if fraction == 1 else fraction), seed=seed)


def check_runs(runs: list[tuple[str, float, int, RunSpec]], out: Path) -> None:
    """Refuse before the first run what a later one would refuse (its model, its data, its sample, a
    folder made with other settings): finished runs left behind would refuse the corrected command."""
    examples = {}
    for name, fraction, seed, spec in runs:
        spec = resolve_defaults(spec)
        if name not in examples:  # the model, tokenizer, data and held-out sets, once per source
            task = prepare_run(spec)[2].task
            examples[name] = check_nonempty(task.load("train"), task, "train")
        subsample(examples[name], train_fraction=spec.data.train_fraction, seed=seed)
        RunFolder(out / name / f"fraction{fraction:g}-seed{seed}").check(spec.settings())


def run_adapt(
    base: RunSpec,
    sources: dict[str, str],
    fractions=FRACTIONS,
    seeds=(0,),
    out: str | Path = "adapt",
    *,
    device: str = "cpu",
    tracking: Tracking | None = None,
) -> dict:
    """Every (source, fraction, seed) run; returns {"rows": [...], "table": {source: {fraction: stats}}}.
    `tracking`: each run logged as its own run, tagged with its source, fraction and seed."""
    if not sources:
        raise UserError("pass at least one --from NAME=MODEL_OR_CHECKPOINT")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"--fractions must be in (0, 1], got {list(fractions)}")
    for option, value in (("--train-size", base.data.train_size), ("--train-fraction", base.data.train_fraction)):
        if value is not None:
            raise UserError(f"st adapt samples the training set by --fractions; drop {option} {value}")
    out = Path(out)
    runs = [
        (name, fraction, seed, run_spec_for(start_spec(base, source), fraction, seed))
        for name, source in sources.items()
        for fraction in fractions
        for seed in seeds
    ]
    check_runs(runs, out)  # every run's input and folder, before the first starts
    rows = []
    for name, fraction, seed, spec in runs:
        folder = f"{name}/fraction{fraction:g}-seed{seed}"
        each = tracking and tracking.for_run(folder, source=name, fraction=fraction, seed=seed)
        result = run_finetune(spec, out / folder, device=device, tracking=each)
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
