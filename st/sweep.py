"""The phase-transition sweep (Liang et al. 2021), resumable; its super ticket is chosen by `st.select`.

For each seed: fine-tune the full model, score its heads and FFN blocks, make the tickets, and
rewind-and-fine-tune the physically pruned subnetwork of every (kind, ratio). One seed drives the
full model, its scores, its random tickets and its rewound runs, so a sweep is reproducible. Each
seed splits (a sample of) dev into a selection part, which chooses every run's epoch, and a report
part (`st.pipeline.dev_parts`). Runs go one after another, to a local pool of processes, or to a Ray
cluster (`st.engines`), in the same order: every seed's full model first, then its ticket runs as
soon as its tickets exist.

The sweep folder's layout is `st.layout`'s; every file is written atomically and only rank 0 writes.
What a sweep is (its config, presets and `plan`) is `st.sweep_config`.

A rerun of the same sweep skips finished runs and resumes interrupted ones; a run that raises is
recorded with its error and the others go on.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from st import dist
from st.engines import Engine, check_engine, open_engine
from st.errors import UserError
from st.importance import Scores, plot_heatmap
from st.io import write_json
from st.layout import FULL, RESULTS, SWEEP_SETTINGS, WEIGHTS, run_dir, scores_path, ticket_path
from st.models.checkpoint import read_checkpoint_config
from st.pipeline import prepare_run, run_finetune, score_checkpoint
from st.runs import check_settings, guard_settings, lock_folder
from st.select import select_super_ticket
from st.specs import RunSpec
from st.speed import measure_sweep
from st.sweep_config import SweepConfig
from st.tickets import KINDS, Ticket, make_ticket
from st.tracking import Tracking, open_tracker

log = logging.getLogger("st")

# ---- the runs ------------------------------------------------------------------------------------


def _record(seed: int, kind: str, ratio: float, out: Path) -> dict:
    return {
        "seed": seed,
        "kind": kind,
        "ratio": ratio,
        "percent_remaining": None,
        "selection": None,
        "report": None,
        "best_epoch": None,
        "seconds": None,
        "run": str(run_dir(out, seed, kind, ratio).relative_to(out)),
        "error": None,
    }


def _finish(record: dict, folder: Path, spec: RunSpec, device: str, tracking: Tracking | None) -> dict:
    """Fine-tune into `folder` (or read back the finished run there) and fill in its metrics."""
    record["reused"] = (folder / "metrics.json").exists()
    if tracking is not None:  # each run its own run in the trackers, tagged with its place in the grid
        tracking = tracking.for_run(record["run"], seed=record["seed"], kind=record["kind"], ratio=record["ratio"])
    metrics = run_finetune(spec, folder, device=device, tracking=tracking)
    record.update(
        selection=metrics["dev"],
        report=metrics["report"],
        best_epoch=metrics["best_epoch"],
        seconds=round(sum(e["seconds"] for e in metrics["epochs"]), 1),
    )
    return record


def _failed(record: dict, error: BaseException) -> dict:
    log.debug("".join(traceback.format_exception(error)))
    record["error"] = f"{type(error).__name__}: {error}"
    return record


def full_stage(
    cfg: SweepConfig, out: Path, seed: int, tracking: Tracking | None = None, *, device: str = "cpu"
) -> tuple[dict, str | None]:
    """Fine-tune the full model of `seed`, score it and write every ticket of the grid. Returns the
    full model's record, and why the tickets could not be made (None when they were)."""
    out = Path(out)
    record = _record(seed, FULL, 0.0, out)
    record["percent_remaining"] = {"model": 100.0, "encoder": 100.0}
    folder = run_dir(out, seed, FULL, 0.0)
    try:
        _finish(record, folder, cfg.seed_spec(seed), device, tracking)
    except UserError:  # bad input, the same for every run: stop the sweep with its one-line message
        raise
    except Exception as e:
        return _failed(record, e), f"the full model of seed {seed} failed"
    try:
        scores_file = scores_path(out, seed)
        if scores_file.exists():
            scores = Scores.load(scores_file)
        else:
            scores = score_checkpoint(folder, num_examples=cfg.score_examples, device=device, seed=seed)
            if dist.is_main():
                plot_heatmap(scores, scores_file.with_suffix(".png"))
                scores.save(scores_file)  # last: its presence means the scores are complete
        config, num_labels = read_checkpoint_config(folder)
        for kind, ratio in cfg.grid:
            path = ticket_path(out, seed, kind, ratio)
            if not path.exists() and dist.is_main():
                make_ticket(scores, ratio, kind, seed, config=config, num_labels=num_labels).save(path)
        dist.barrier()
    except UserError:
        raise
    except Exception as e:
        log.debug("".join(traceback.format_exception(e)))
        return record, f"the tickets of seed {seed} could not be made ({type(e).__name__}: {e})"
    return record, None


def ticket_run(
    cfg: SweepConfig,
    out: Path,
    seed: int,
    kind: str,
    ratio: float,
    tracking: Tracking | None = None,
    *,
    device: str = "cpu",
) -> dict:
    """Rewind to the pre-trained weights and fine-tune the pruned subnetwork of one ticket."""
    out = Path(out)
    record = _record(seed, kind, ratio, out)
    try:
        ticket = Ticket.load(ticket_path(out, seed, kind, ratio))
        record["percent_remaining"] = ticket.percent_remaining
        _finish(record, run_dir(out, seed, kind, ratio), cfg.seed_spec(seed, ticket), device, tracking)
    except UserError:
        raise
    except Exception as e:
        _failed(record, e)
    return record


def _ticket_specs(cfg: SweepConfig, seed: int) -> list[tuple[int, str, float]]:
    return [(seed, kind, ratio) for kind, ratio in cfg.grid]


def _runs(cfg: SweepConfig, out: Path, engine: Engine, tracking: Tracking | None = None) -> Iterator[dict]:
    """Every seed's full model first, then its ticket runs as soon as its tickets exist; each record as
    its run finishes. Keys are (seed, position): the in-process engine runs them seed by seed."""
    runs = {}
    for seed in cfg.seed_list:
        runs[seed, 0] = (seed, FULL, 0.0)
        engine.submit((seed, 0), full_stage, cfg, out, seed, tracking)
    while runs:
        key, result, error = engine.next()
        seed, kind, ratio = runs.pop(key)
        if isinstance(error, UserError):  # bad input, the same for every run: stop with its one-line message
            raise error
        if error is not None:  # the worker itself died (killed, out of memory)
            yield _failed(_record(seed, kind, ratio, out), error)
            continue
        if kind != FULL:
            yield result
            continue
        record, why_not = result
        yield record
        for i, spec in enumerate(_ticket_specs(cfg, seed), 1):
            if why_not is None:
                runs[seed, i] = spec
                engine.submit((seed, i), ticket_run, cfg, out, *spec, tracking)
            else:
                yield _failed(_record(*spec, out), RuntimeError(why_not))


def _order(record: dict) -> tuple:
    return record["seed"], [FULL, *KINDS].index(record["kind"]), record["ratio"]


def results_doc(cfg: SweepConfig, records: list[dict], task) -> dict:
    return {
        "task": task.name,
        "main_metric": task.main_metric,
        "settings": cfg.settings(),
        "runs": [{k: v for k, v in r.items() if k != "reused"} for r in sorted(records, key=_order)],
    }


def write_results(out: Path, doc: dict) -> None:
    """Atomically: a crash or a full disk leaves the previous results.json (or none), never a truncated one."""
    try:
        write_json(out / RESULTS, doc)
    except OSError as e:
        raise UserError(
            f"could not write {out / RESULTS} ({e}); the finished runs are kept: free some space and "
            "rerun the same command to resume"
        ) from None


def run_sweep(
    cfg: SweepConfig,
    out: str | Path,
    *,
    jobs: int = 1,
    device: str | None = "cpu",
    ray: str | None = None,
    keep_weights: str = "best",
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[dict], None] | None = None,
    measure_speed: bool = False,
    min_speedup: float | None = None,
    tracking: Tracking | None = None,
) -> dict:
    """Run (or resume) the sweep into `out`; returns results.json's contents. `jobs` runs at once in
    local processes, or on the Ray cluster at `ray` ("local", "auto", host:port; see `st.engines`);
    `device`: resolved once by the caller (`st.dist.pick_device`); with Ray, None lets the cluster's
    GPUs decide. Each run gets the device of the engine slot it runs in. On rank 0,
    `on_start(runs at once)` is called once the input is checked, and `on_result(record)` as each run
    finishes (records of runs finished before this call carry reused=True). `measure_speed`: once
    every run finished, each winning ticket's inference speed-up on this machine (`st.speed`);
    `min_speedup`: keep the weights of the deploy ticket under that target too. `tracking`: every run
    logged as its own run of the sweep's group (`st.tracking`), and the sweep's summary."""
    out = Path(out).resolve()  # absolute: a Ray worker on another node has another working directory
    check_engine(jobs, ray)  # everything is checked before anything starts or is written
    if keep_weights not in KEEP_WEIGHTS:
        raise UserError(f"--keep-weights must be one of {', '.join(KEEP_WEIGHTS)}, got {keep_weights!r}")
    check_settings(out, cfg.settings(), SWEEP_SETTINGS, "sweep")
    task = prepare_run(cfg.seed_spec(cfg.spec.seed))[
        2
    ].task  # task, model, lengths, data, held-out sets: a bad one writes nothing
    lock = lock_folder(out) if dist.is_main() else None  # one sweep at a time in a folder
    # how many processes or which engine is no setting: any may resume
    guard_settings(out, cfg.settings(), SWEEP_SETTINGS, "sweep")
    records, engine, summary = [], None, SweepTracker(tracking, out, cfg.settings(), cfg.total_runs)
    try:
        engine = open_engine(jobs, device, ray)  # inside: a cluster that cannot be joined releases the lock
        if on_start and dist.is_main():
            on_start(engine.slots)
        for record in _runs(cfg, out, engine, summary.runs):
            records.append(record)
            if dist.is_main():
                write_results(out, results_doc(cfg, records, task))
                if on_result:
                    on_result(record)
    finally:
        if engine is not None:
            engine.close()  # on an interrupt too: no worker goes on running
        if lock is not None:
            lock.close()
        doc = results_doc(cfg, records, task)
        summary.finish(doc)
    if dist.is_main():
        write_results(out, doc)
        if measure_speed and not any(r["error"] for r in doc["runs"]):
            doc = measure_sweep(out)  # results.json is complete before: a failure here loses no run
        drop_weights(out, doc, keep_weights, min_speedup)
    return doc


def check_finished(doc: dict) -> None:
    """A sweep with failed runs is no success: one line saying how many, and how to retry them."""
    failed = [r for r in doc["runs"] if r["error"]]
    if failed:
        raise UserError(
            f"{len(failed)} of {len(doc['runs'])} runs failed (listed above); rerun the same command to retry them"
        )


KEEP_WEIGHTS = ("all", "best", "none")


def drop_weights(out: Path, doc: dict, keep: str, min_speedup: float | None = None) -> list[Path]:
    """Once every run finished, delete the weights nobody needs: "best" keeps the full model's and the
    super ticket's runs (every seed, and the deploy ticket's under `min_speedup`), "none" keeps none,
    "all" all (75 copies, ~5 GB for the main job). Metrics, tickets and configs stay, so the sweep
    still resumes and reports. Returns what went."""
    if keep == "all" or any(r["error"] for r in doc["runs"]):  # a rerun may still change the choice
        return []
    kept = set()
    if keep == "best":
        chosen = select_super_ticket(doc)
        kept = {(FULL, 0.0), (chosen.kind, chosen.ratio)}
        if min_speedup is not None and any(r.get("speedup") for r in doc["runs"]):
            try:
                deploy = select_super_ticket(doc, min_speedup)
                kept.add((deploy.kind, deploy.ratio))
            except UserError:
                pass  # no ticket is fast enough: `st sweep` says so in one line once the report is written
    dropped = [out / r["run"] / WEIGHTS for r in doc["runs"] if (r["kind"], r["ratio"]) not in kept]
    for path in dropped:
        path.unlink(missing_ok=True)
    return dropped


class SweepTracker:
    """The sweep's own log (`--log-to`): its settings, and once every run finished its summary, the
    super ticket and its difference from the full model; `runs` is what each run logs with (the W&B
    group, the MLflow parent run)."""

    def __init__(self, tracking: Tracking | None, out: Path, settings: dict, total_runs: int):
        self.runs, self.tracker, self.total = tracking, None, total_runs
        if tracking is not None and tracking.to:
            group = tracking.group or out.name
            self.tracker = open_tracker(replace(tracking, group=group, name=f"{group} summary"), out, 0, settings)
            parent = next((b.id for b in self.tracker.backends if b.name == "mlflow"), None)
            self.runs = replace(tracking, group=group, parent=parent)

    def finish(self, doc: dict) -> None:
        if self.tracker is None:
            return
        with self.tracker:
            if len(doc["runs"]) < self.total or any(r["error"] for r in doc["runs"]):
                return  # an interrupted or failed sweep has no super ticket yet: the rerun logs it
            chosen = select_super_ticket(doc)
            ci = chosen.ci or [None, None]
            self.tracker.summary(
                {
                    "super_ticket": {
                        "ratio": chosen.ratio,
                        "is_full_model": float(chosen.kind == FULL),
                        "percent_remaining": (chosen.percent_remaining or {}).get("model"),
                        "difference": 0.0 if chosen.kind == FULL else chosen.gain,  # the full model is itself
                        "difference_ci_low": ci[0],
                        "difference_ci_high": ci[1],
                        "p_value": chosen.p_value,
                    }
                }
            )
