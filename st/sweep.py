"""The phase-transition sweep and the automatic, held-out choice of the super ticket (Liang et al. 2021).

For each seed: fine-tune the full model, score its heads and FFN blocks, make the tickets, and
rewind-and-fine-tune the physically pruned subnetwork of every (kind, ratio). One seed drives the
full model, its scores, its random tickets and its rewound runs, so a sweep is reproducible.

Honest selection: each seed splits (a seeded sample of) dev into a selection part and a report part
(`st.pipeline.dev_parts`). Every run chooses its epoch on the selection part; the super ticket is the
winning ticket, or the full model, with the best mean selection score; only the report part's
numbers are reported for it, with a paired t-test over seeds against the full model.

Layout of a sweep folder (every file written atomically; only rank 0 writes):
  sweep.json                          the settings that made it: a rerun with others is refused
  seed{s}/full/                       the full model's run (r = 0), an `st finetune` folder
  seed{s}/scores.json, scores.png     its importance scores
  seed{s}/{kind}-r{ratio:.2f}/        ticket.json and run/, the rewound subnetwork's run
  results.json                        every run, rewritten as each one finishes
  report.md, phase.png, super_ticket.json   rendered from results.json by `st.report`

A rerun of the same sweep skips finished runs and resumes interrupted ones; a run that raises is
recorded with its error and the others go on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from st import dist
from st.errors import UserError
from st.importance import Scores, plot_heatmap
from st.io import read_json, write_json
from st.models.bert import BertConfig
from st.pipeline import Job, build_task, build_tokenizer, run_finetune, score_checkpoint
from st.tickets import KINDS, Ticket, make_ticket
from st.train import _flatten

log = logging.getLogger("st")

RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 9))  # 0.1 ... 0.8, the paper's grid
FULL = "full"
RESULTS, SETTINGS = "results.json", "sweep.json"


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: the full model's run (`job`; its seed is the first seed) and the grid around it."""

    job: Job
    ratios: tuple[float, ...] = RATIOS
    kinds: tuple[str, ...] = KINDS
    seeds: int = 3  # job.train.seed, job.train.seed + 1, ...
    select_fraction: float = 0.5  # of the dev sample: chooses epochs and the ticket; the rest reports
    dev_size: int | None = None  # a seeded sample of dev (None: all of it)
    score_examples: int | None = None  # importance over a seeded sample of the training set (None: all)

    def __post_init__(self):
        ratios, kinds = tuple(self.ratios), tuple(self.kinds)
        if not ratios:
            raise UserError("--ratios is empty; give comma-separated ratios in [0, 1), e.g. 0.1,0.2,0.3")
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise UserError(f"--ratios must each be in [0, 1), got {r}")
        if len(set(ratios)) != len(ratios):
            raise UserError(f"--ratios lists a ratio twice: {', '.join(map(str, ratios))}")
        if not kinds:
            raise UserError(f"--kinds is empty; give some of {', '.join(KINDS)}")
        for k in kinds:
            if k not in KINDS:
                raise UserError(f"--kinds must be among {', '.join(KINDS)}, got {k!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        if not 0 < self.select_fraction < 1:
            raise UserError(f"--select-fraction must be in (0, 1), got {self.select_fraction}")
        if self.job.ticket or self.job.init:
            raise UserError("a sweep starts from the pre-trained model: drop --ticket / --init")
        # r = 0 is the full model, which every seed trains anyway: it is not a ticket run.
        object.__setattr__(self, "ratios", tuple(sorted(float(r) for r in ratios if r > 0)))
        object.__setattr__(self, "kinds", tuple(k for k in KINDS if k in kinds))

    @property
    def seed_list(self) -> list[int]:
        return [self.job.train.seed + i for i in range(self.seeds)]

    def seed_job(self, seed: int, ticket: str | None = None) -> Job:
        """The run of `seed`: the full model, or the subnetwork of `ticket`, with the seed's dev split."""
        return replace(self.job, ticket=ticket, dev_size=self.dev_size, select_fraction=self.select_fraction,
                       train=replace(self.job.train, seed=seed))

    def settings(self) -> dict:
        """What identifies the sweep's results (not the device, nor how many processes ran it)."""
        s = {"job": self.job.settings(), "ratios": list(self.ratios), "kinds": list(self.kinds), "seeds": self.seeds,
             "select_fraction": self.select_fraction, "dev_size": self.dev_size, "score_examples": self.score_examples}
        return json.loads(json.dumps(s))  # tuples as lists: compares equal to what sweep.json reads back


# ---- the packaged main job -----------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Defaults of `st sweep` without --task (the main job) and of `st sweep --quick`. Every field is
    also an option, and an option given on the command line wins.

    Budget of the main job (3 seeds x (1 full + 8 ratios x 3 kinds) = 75 runs) on a 2-core CPU,
    measured in CPU seconds (user + sys, so other load on the machine does not distort it) with
    these settings on 1 seed x (full + 3 kinds at r = 0.1, 0.4, 0.8): 204 CPU-s in all, of which
    the full run ~27 (2 epochs x 256 examples at ~25 examples/CPU-s, 2 x 200 + 200 dev
    examples at ~120/CPU-s, ~1.5 s of loading and saving), scoring ~8, two worker start-ups ~6,
    and ~18 per ticket run: a pruned run is physically smaller, costing about (1 - r) of the full
    model's compute plus fixed costs, and those ratios average 1 - r = 0.57 as the full grid's 0.55.
    The main job: 3 x (27 + 8 + 24 x 18) + 6 = ~1,410 CPU-s; two one-thread processes on 2 cores
    take ~710 s, about 12 minutes, leaving ~20% of the 15-minute budget for a busier machine.
    Epochs are the cost driver (each adds ~40% to a run); one epoch does not get past predicting
    the majority class, hence a larger lr over 2 epochs.
    """

    task: str = "rotten_tomatoes"
    model: str = "minilm-l6"
    train_size: int = 256  # a small training set: where the paper finds the phase transition sharpest
    epochs: int = 2
    batch_size: int = 16  # and lr 5e-4 (the paper: 32 and 5e-5): 32 steps are enough to learn the task
    lr: float = 5e-4
    max_length: int = 64  # the longest rotten_tomatoes snippet is 63 tokens: nothing is cut
    dev_size: int = 400  # 200 to choose, 200 to report, per seed
    ratios: tuple[float, ...] = RATIOS
    seeds: int = 3
    jobs: int = 2  # one-thread processes: on 2 cores, 2 of them beat one with 2 threads


DEMO = Preset()
# The quick look: 1 seed x (full + 2 ratios x 3 kinds) = 7 runs of 32 steps on 192 examples (fewer
# steps only ever predict the majority class); a full run ~21 CPU-s, tickets at r = 0.3 and 0.6 about
# 0.8 and 0.5 of it: 21 + 3 x 1.3 x 21 + 8 (scores) + 6 (start-up) = ~117 CPU-s, a minute on 2 cores.
QUICK = Preset(train_size=192, batch_size=12, dev_size=200, ratios=(0.3, 0.6), seeds=1)


# ---- folders -------------------------------------------------------------------------------------


def run_name(kind: str, ratio: float) -> str:
    return FULL if kind == FULL else f"{kind}-r{ratio:.2f}"


def run_dir(out: Path, seed: int, kind: str, ratio: float) -> Path:
    """The `st finetune` folder of one run."""
    folder = Path(out) / f"seed{seed}" / run_name(kind, ratio)
    return folder if kind == FULL else folder / "run"


def ticket_path(out: Path, seed: int, kind: str, ratio: float) -> Path:
    return Path(out) / f"seed{seed}" / run_name(kind, ratio) / "ticket.json"


def check_sweep_settings(out: Path, settings: dict) -> None:
    """Refuse a folder holding a sweep made with other settings, naming the first that differs;
    record the settings in a new (or empty) folder."""
    path = out / SETTINGS
    if path.exists():
        previous, current = _flatten(read_json(path)), _flatten(settings)
        for key in sorted(set(previous) | set(current)):
            if previous.get(key) != current.get(key):
                raise UserError(f"{out} holds a sweep made with {key}={previous.get(key)!r}, not {current.get(key)!r}; "
                                f"use another --out, or delete {out} to start over")
    elif dist.is_main():
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty and holds no st sweep; choose an empty or new --out folder")
        write_json(path, settings)
    dist.barrier()


# ---- the runs ------------------------------------------------------------------------------------


_WORKER_DEVICE: str | None = None  # set in pool workers that own one GPU


def _device(cfg: SweepConfig) -> SweepConfig:
    if _WORKER_DEVICE is None:
        return cfg
    return replace(cfg, job=replace(cfg.job, train=replace(cfg.job.train, device=_WORKER_DEVICE)))


def _record(seed: int, kind: str, ratio: float, out: Path) -> dict:
    return {"seed": seed, "kind": kind, "ratio": ratio, "percent_remaining": None, "selection": None, "report": None,
            "best_epoch": None, "seconds": None, "run": str(run_dir(out, seed, kind, ratio).relative_to(out)), "error": None}


def _finish(record: dict, folder: Path, job: Job) -> dict:
    """Fine-tune into `folder` (or read back the finished run there) and fill in its metrics."""
    record["reused"] = (folder / "metrics.json").exists()
    metrics = run_finetune(job, folder)
    record.update(selection=metrics["dev"], report=metrics["report"], best_epoch=metrics["best_epoch"],
                  seconds=round(sum(e["seconds"] for e in metrics["epochs"]), 1))
    return record


def _failed(record: dict, error: BaseException) -> dict:
    log.debug("".join(traceback.format_exception(error)))
    record["error"] = f"{type(error).__name__}: {error}"
    return record


def full_stage(cfg: SweepConfig, out: Path, seed: int) -> tuple[dict, str | None]:
    """Fine-tune the full model of `seed`, score it and write every ticket of the grid. Returns the
    full model's record, and why the tickets could not be made (None when they were)."""
    cfg, out = _device(cfg), Path(out)
    record = _record(seed, FULL, 0.0, out)
    record["percent_remaining"] = {"model": 100.0, "encoder": 100.0}
    folder = run_dir(out, seed, FULL, 0.0)
    try:
        _finish(record, folder, cfg.seed_job(seed))
    except UserError:  # bad input, the same for every run: stop the sweep with its one-line message
        raise
    except Exception as e:
        return _failed(record, e), f"the full model of seed {seed} failed"
    try:
        scores_file = out / f"seed{seed}" / "scores.json"
        if scores_file.exists():
            scores = Scores.load(scores_file)
        else:
            scores = score_checkpoint(folder, num_examples=cfg.score_examples, device=cfg.job.train.device, seed=seed)
            if dist.is_main():
                plot_heatmap(scores, scores_file.with_suffix(".png"))
                scores.save(scores_file)  # last: its presence means the scores are complete
        checkpoint = read_json(folder / "config.json")
        config, num_labels = BertConfig.from_dict(checkpoint["encoder"]), checkpoint["head"]["num_labels"]
        for kind in cfg.kinds:
            for ratio in cfg.ratios:
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


def ticket_run(cfg: SweepConfig, out: Path, seed: int, kind: str, ratio: float) -> dict:
    """Rewind to the pre-trained weights and fine-tune the pruned subnetwork of one ticket."""
    cfg, out = _device(cfg), Path(out)
    record = _record(seed, kind, ratio, out)
    try:
        path = ticket_path(out, seed, kind, ratio)
        record["percent_remaining"] = Ticket.load(path).percent_remaining
        _finish(record, run_dir(out, seed, kind, ratio), cfg.seed_job(seed, ticket=str(path)))
    except UserError:
        raise
    except Exception as e:
        _failed(record, e)
    return record


def _ticket_specs(cfg: SweepConfig, seed: int) -> list[tuple[int, str, float]]:
    return [(seed, kind, ratio) for kind in cfg.kinds for ratio in cfg.ratios]


def _sequential(cfg: SweepConfig, out: Path) -> Iterator[dict]:
    """Seed by seed: the full model, then its tickets (every rank takes part under torchrun)."""
    for seed in cfg.seed_list:
        record, why_not = full_stage(cfg, out, seed)
        yield record
        for spec in _ticket_specs(cfg, seed):
            yield ticket_run(cfg, out, *spec) if why_not is None else _failed(_record(*spec, out), RuntimeError(why_not))


def _init_worker(threads: int, gpus, user_modules: list[str]) -> None:
    global _WORKER_DEVICE
    torch.set_num_threads(threads)
    if gpus is not None:
        _WORKER_DEVICE = f"cuda:{gpus.get()}"
        torch.cuda.set_device(_WORKER_DEVICE)
    if user_modules:  # tasks registered by `st --user-dir` live in the parent only; a spawned worker re-imports them
        from st.tasks import import_user_dir

        for path in user_modules:
            import_user_dir(path)


def _user_modules() -> list[str]:
    found = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith("st_user_") and "." not in name and path:
            found.append(str(Path(path).parent) if Path(path).name == "__init__.py" else path)
    return found


def _parallel(cfg: SweepConfig, out: Path, jobs: int) -> Iterator[dict]:
    """`jobs` spawned processes: every seed's full model first, then its tickets as soon as they exist."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    gpus = None
    if cfg.job.train.device.startswith("cuda"):
        gpus = ctx.SimpleQueue()
        for i in range(jobs):
            gpus.put(i)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(max(1, cpus // jobs), gpus, _user_modules()))
    pending: dict = {}
    try:
        for seed in cfg.seed_list:
            pending[pool.submit(full_stage, cfg, out, seed)] = (seed, FULL, 0.0)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                seed, kind, ratio = pending.pop(future)
                try:
                    result = future.result()
                except UserError:
                    raise
                except Exception as e:  # the worker itself died (e.g. killed for memory)
                    yield _failed(_record(seed, kind, ratio, out), e)
                    continue
                if kind != FULL:
                    yield result
                    continue
                record, why_not = result
                yield record
                for spec in _ticket_specs(cfg, seed):
                    if why_not is None:
                        pending[pool.submit(ticket_run, cfg, out, *spec)] = spec
                    else:
                        yield _failed(_record(*spec, out), RuntimeError(why_not))
    finally:
        # Normally everything is done; on an interrupt, queued runs are dropped (a rerun does them).
        pool.shutdown(wait=not pending, cancel_futures=True)


def workers(cfg: SweepConfig, jobs: int) -> int:
    """How many processes run at once: `jobs` on CPU, at most one per visible GPU, one under torchrun."""
    if dist.is_distributed():
        if jobs > 1:
            log.info("under torchrun every run uses all ranks; --jobs %d is ignored", jobs)
        return 1
    if cfg.job.train.device.startswith("cuda"):
        if cfg.job.train.device != "cuda":  # a named GPU: the user chose it
            return 1
        return max(1, min(jobs, torch.cuda.device_count()))
    return jobs


def _order(record: dict) -> tuple:
    return record["seed"], [FULL, *KINDS].index(record["kind"]), record["ratio"]


def results_doc(cfg: SweepConfig, records: list[dict], task) -> dict:
    return {"task": task.name, "main_metric": task.main_metric, "settings": cfg.settings(),
            "runs": [{k: v for k, v in r.items() if k != "reused"} for r in sorted(records, key=_order)]}


def write_results(out: Path, doc: dict) -> None:
    """Atomically: a crash or a full disk leaves the previous results.json (or none), never a truncated one."""
    try:
        write_json(out / RESULTS, doc)
    except OSError as e:
        raise UserError(f"could not write {out / RESULTS} ({e}); the finished runs are kept: free some space and "
                        "rerun the same command to resume") from None


def run_sweep(cfg: SweepConfig, out: str | Path, *, jobs: int = 1, on_start: Callable[[int], None] | None = None,
              on_result: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) the sweep into `out`; returns results.json's contents. On rank 0,
    `on_start(processes)` is called once the input is checked, and `on_result(record)` as each run
    finishes (records of runs finished before this call carry reused=True)."""
    out = Path(out).resolve()  # tickets are named by absolute path in their runs' settings
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    task = build_task(cfg.job)  # fail fast, before any process starts: unknown task, missing data or model
    build_tokenizer(cfg.job)
    check_sweep_settings(out, cfg.settings())
    n = workers(cfg, jobs)
    if on_start and dist.is_main():
        on_start(n)
    records = []
    for record in (_sequential(cfg, out) if n == 1 else _parallel(cfg, out, n)):
        records.append(record)
        if dist.is_main():
            write_results(out, results_doc(cfg, records, task))
            if on_result:
                on_result(record)
    doc = results_doc(cfg, records, task)
    if dist.is_main():
        write_results(out, doc)
    return doc


# ---- the super ticket ----------------------------------------------------------------------------


def stats(values: list[float]) -> dict:
    """Mean and sample standard deviation (None with fewer than two values)."""
    return {"mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None, "n": len(values)}


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
    test_note: str  # why there is no p-value, or how it was computed
    failures: list[dict] = field(default_factory=list)


def per_seed(records: list[dict], kind: str, ratio: float, part: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r[part][metric] for r in records
            if r["kind"] == kind and r["ratio"] == ratio and r["error"] is None and r[part] is not None}


def select_super_ticket(doc: dict) -> Selection:
    """Choose the super ticket from results.json's contents using the selection part only; ties go to
    the full model, then to the lower ratio (a ticket must do strictly better to be chosen)."""
    runs, metric = doc["runs"], doc["main_metric"]
    ratios = sorted({r["ratio"] for r in runs if r["kind"] == "winning"})
    candidates = []
    for kind, ratio in [(FULL, 0.0), *(("winning", r) for r in ratios)]:
        scores = per_seed(runs, kind, ratio, "selection", metric)
        if scores:
            percent = next(r["percent_remaining"] for r in runs
                           if r["kind"] == kind and r["ratio"] == ratio and r["error"] is None)
            candidates.append({"kind": kind, "ratio": ratio, "percent_remaining": percent, **stats(list(scores.values()))})
    failures = [r for r in runs if r["error"] is not None]
    if not candidates:
        raise UserError("no run of the full model or of a winning ticket finished: nothing to choose from; "
                        "see the errors in results.json and rerun to retry")
    best = max(candidates, key=lambda c: c["mean"])  # max() keeps the first of equals: the full model, then low ratios
    candidates = sorted(candidates, key=lambda c: -c["mean"])
    kind, ratio = best["kind"], best["ratio"]
    chosen_sel, chosen_rep = per_seed(runs, kind, ratio, "selection", metric), per_seed(runs, kind, ratio, "report", metric)
    full_sel, full_rep = per_seed(runs, FULL, 0.0, "selection", metric), per_seed(runs, FULL, 0.0, "report", metric)
    paired = sorted(set(chosen_rep) & set(full_rep))
    gain = p = None
    if kind == FULL:
        note = "the full model scored best on the selection part: no pruned ticket beat it"
    elif not paired:
        note = "no seed has both this ticket and the full model: nothing to compare"
    else:
        diffs = [chosen_rep[s] - full_rep[s] for s in paired]
        gain = float(np.mean(diffs))
        if len(paired) < 2:
            note = "the paired t-test needs at least 2 seeds (--seeds 2 or more)"
        elif np.ptp(diffs) <= 1e-12:  # float noise around one value: the t statistic would be meaningless
            note = "every seed gave the same difference: the t-test is undefined"
        else:
            from scipy.stats import ttest_rel

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = float(ttest_rel([chosen_rep[s] for s in paired], [full_rep[s] for s in paired]).pvalue)
            note = f"paired t-test over {len(paired)} seeds (scipy.stats.ttest_rel, two-sided)"
    return Selection(metric, kind, ratio, best["percent_remaining"], candidates, chosen_sel, chosen_rep,
                     full_sel, full_rep, gain, p, note, failures)
