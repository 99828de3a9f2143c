"""The phase-transition sweep (Liang et al. 2021), resumable; its super ticket is chosen by `st.select`.

For each seed: fine-tune the full model, score its heads and FFN blocks, make the tickets, and
rewind-and-fine-tune the physically pruned subnetwork of every (kind, ratio). One seed drives the
full model, its scores, its random tickets and its rewound runs, so a sweep is reproducible. Each
seed splits (a sample of) dev into a selection part, which chooses every run's epoch, and a report
part (`st.pipeline.dev_parts`). Runs go one after another, or to a local pool of processes.

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
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from st import dist
from st.errors import UserError
from st.importance import Scores, plot_heatmap
from st.io import read_json, write_json
from st.models.bert import BertConfig
from st.pipeline import build_task, build_tokenizer, resolve_defaults, run_finetune, score_checkpoint
from st.runs import guard_settings
from st.select import FULL, RESULTS
from st.specs import HeldOut, RunSpec, run_spec
from st.tickets import KINDS, Ticket, make_ticket

log = logging.getLogger("st")

RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 9))  # 0.1 ... 0.8, the paper's grid
SETTINGS = "sweep.json"


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: the full model's run (`spec`; its seed is the first seed) and the grid around it."""

    spec: RunSpec
    ratios: tuple[float, ...] = RATIOS
    kinds: tuple[str, ...] = KINDS
    seeds: int = 3  # spec.seed, spec.seed + 1, ...
    held_out: HeldOut = HeldOut()  # each seed's dev sample: a part chooses epochs and the ticket, the rest reports
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
        if not 0 < self.held_out.select_fraction < 1:
            raise UserError(f"--select-fraction must be in (0, 1), got {self.held_out.select_fraction}")
        if self.spec.model.ticket is not None or self.spec.model.init:
            raise UserError("a sweep starts from the pre-trained model: drop --ticket / --init")
        # r = 0 is the full model, which every seed trains anyway: it is not a ticket run.
        object.__setattr__(self, "ratios", tuple(sorted(float(r) for r in ratios if r > 0)))
        object.__setattr__(self, "kinds", tuple(k for k in KINDS if k in kinds))
        object.__setattr__(self, "spec", resolve_defaults(self.spec))

    @property
    def seed_list(self) -> list[int]:
        return [self.spec.seed + i for i in range(self.seeds)]

    def seed_spec(self, seed: int, ticket: Ticket | None = None) -> RunSpec:
        """The run of `seed`: the full model, or the subnetwork of `ticket`, with the seed's dev split."""
        return replace(self.spec, model=replace(self.spec.model, ticket=ticket), seed=seed, held_out=self.held_out)

    def settings(self) -> dict:
        """What identifies the sweep's results (not the device, nor how many processes ran it)."""
        s = {"job": self.spec.settings(), "ratios": list(self.ratios), "kinds": list(self.kinds), "seeds": self.seeds,
             "select_fraction": self.held_out.select_fraction, "dev_size": self.held_out.dev_size,
             "score_examples": self.score_examples}
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


def plan(*, quick: bool = False, ratios: list[float] | None = None, kinds: list[str] | None = None, seeds: int | None = None,
         select_fraction: float | None = None, dev_size: int | None = None, score_examples: int | None = None,
         jobs: int | None = None, **options) -> tuple[SweepConfig, int]:
    """`st sweep`'s sweep and how many runs go at once. Without a task (or with `quick`) the packaged
    main job's preset fills every option not given (None); `options` are `specs.run_spec`'s."""
    preset = QUICK if quick else DEMO if options.get("task") is None else None
    if preset is not None:
        for name in ("task", "model", "train_size", "epochs", "batch_size", "lr", "max_length"):
            if options.get(name) is None:
                options[name] = getattr(preset, name)
        dev_size = preset.dev_size if dev_size is None else dev_size
        seeds = preset.seeds if seeds is None else seeds
        ratios = list(preset.ratios) if ratios is None else ratios
        jobs = min(preset.jobs, os.cpu_count() or 1) if jobs is None else jobs
    held_out = HeldOut(*(() if select_fraction is None else (select_fraction,)), dev_size=dev_size)
    cfg = SweepConfig(run_spec(**options), ratios=tuple(RATIOS if ratios is None else ratios),
                      kinds=tuple(KINDS if kinds is None else kinds), seeds=3 if seeds is None else seeds,
                      held_out=held_out, score_examples=score_examples)
    return cfg, 1 if jobs is None else jobs


# ---- folders -------------------------------------------------------------------------------------


def run_name(kind: str, ratio: float) -> str:
    return FULL if kind == FULL else f"{kind}-r{ratio:.2f}"


def run_dir(out: Path, seed: int, kind: str, ratio: float) -> Path:
    """The `st finetune` folder of one run."""
    folder = Path(out) / f"seed{seed}" / run_name(kind, ratio)
    return folder if kind == FULL else folder / "run"


def ticket_path(out: Path, seed: int, kind: str, ratio: float) -> Path:
    return Path(out) / f"seed{seed}" / run_name(kind, ratio) / "ticket.json"


# ---- the runs ------------------------------------------------------------------------------------


_WORKER_DEVICE: str | None = None  # set in pool workers that own one GPU


def _device(device: str) -> str:
    """A pool worker's own GPU, where it has one; else the sweep's device."""
    return _WORKER_DEVICE or device


def _record(seed: int, kind: str, ratio: float, out: Path) -> dict:
    return {"seed": seed, "kind": kind, "ratio": ratio, "percent_remaining": None, "selection": None, "report": None,
            "best_epoch": None, "seconds": None, "run": str(run_dir(out, seed, kind, ratio).relative_to(out)), "error": None}


def _finish(record: dict, folder: Path, spec: RunSpec, device: str) -> dict:
    """Fine-tune into `folder` (or read back the finished run there) and fill in its metrics."""
    record["reused"] = (folder / "metrics.json").exists()
    metrics = run_finetune(spec, folder, device=device)
    record.update(selection=metrics["dev"], report=metrics["report"], best_epoch=metrics["best_epoch"],
                  seconds=round(sum(e["seconds"] for e in metrics["epochs"]), 1))
    return record


def _failed(record: dict, error: BaseException) -> dict:
    log.debug("".join(traceback.format_exception(error)))
    record["error"] = f"{type(error).__name__}: {error}"
    return record


def full_stage(cfg: SweepConfig, out: Path, seed: int, device: str = "cpu") -> tuple[dict, str | None]:
    """Fine-tune the full model of `seed`, score it and write every ticket of the grid. Returns the
    full model's record, and why the tickets could not be made (None when they were)."""
    device, out = _device(device), Path(out)
    record = _record(seed, FULL, 0.0, out)
    record["percent_remaining"] = {"model": 100.0, "encoder": 100.0}
    folder = run_dir(out, seed, FULL, 0.0)
    try:
        _finish(record, folder, cfg.seed_spec(seed), device)
    except UserError:  # bad input, the same for every run: stop the sweep with its one-line message
        raise
    except Exception as e:
        return _failed(record, e), f"the full model of seed {seed} failed"
    try:
        scores_file = out / f"seed{seed}" / "scores.json"
        if scores_file.exists():
            scores = Scores.load(scores_file)
        else:
            scores = score_checkpoint(folder, num_examples=cfg.score_examples, device=device, seed=seed)
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


def ticket_run(cfg: SweepConfig, out: Path, seed: int, kind: str, ratio: float, device: str = "cpu") -> dict:
    """Rewind to the pre-trained weights and fine-tune the pruned subnetwork of one ticket."""
    device, out = _device(device), Path(out)
    record = _record(seed, kind, ratio, out)
    try:
        ticket = Ticket.load(ticket_path(out, seed, kind, ratio))
        record["percent_remaining"] = ticket.percent_remaining
        _finish(record, run_dir(out, seed, kind, ratio), cfg.seed_spec(seed, ticket), device)
    except UserError:
        raise
    except Exception as e:
        _failed(record, e)
    return record


def _ticket_specs(cfg: SweepConfig, seed: int) -> list[tuple[int, str, float]]:
    return [(seed, kind, ratio) for kind in cfg.kinds for ratio in cfg.ratios]


def _sequential(cfg: SweepConfig, out: Path, device: str) -> Iterator[dict]:
    """Seed by seed: the full model, then its tickets (every rank takes part under torchrun)."""
    for seed in cfg.seed_list:
        record, why_not = full_stage(cfg, out, seed, device)
        yield record
        for spec in _ticket_specs(cfg, seed):
            yield ticket_run(cfg, out, *spec, device) if why_not is None else _failed(_record(*spec, out), RuntimeError(why_not))


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


def _parallel(cfg: SweepConfig, out: Path, jobs: int, device: str) -> Iterator[dict]:
    """`jobs` spawned processes: every seed's full model first, then its tickets as soon as they exist."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    gpus = None
    if device.startswith("cuda"):
        gpus = ctx.SimpleQueue()
        for i in range(jobs):
            gpus.put(i)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(max(1, cpus // jobs), gpus, _user_modules()))
    pending: dict = {}
    try:
        for seed in cfg.seed_list:
            pending[pool.submit(full_stage, cfg, out, seed, device)] = (seed, FULL, 0.0)
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
                        pending[pool.submit(ticket_run, cfg, out, *spec, device)] = spec
                    else:
                        yield _failed(_record(*spec, out), RuntimeError(why_not))
    finally:
        # Normally everything is done; on an interrupt, queued runs are dropped (a rerun does them).
        pool.shutdown(wait=not pending, cancel_futures=True)


def workers(jobs: int, device: str) -> int:
    """How many processes run at once: `jobs` on CPU, at most one per visible GPU, one under torchrun."""
    if dist.is_distributed():
        if jobs > 1:
            log.info("under torchrun every run uses all ranks; --jobs %d is ignored", jobs)
        return 1
    if device.startswith("cuda"):
        if device != "cuda":  # a named GPU: the user chose it
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


def run_sweep(cfg: SweepConfig, out: str | Path, *, jobs: int = 1, device: str = "cpu", on_start: Callable[[int], None] | None = None,
              on_result: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) the sweep into `out`; returns results.json's contents. On rank 0,
    `on_start(processes)` is called once the input is checked, and `on_result(record)` as each run
    finishes (records of runs finished before this call carry reused=True)."""
    out = Path(out)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    task = build_task(cfg.spec.data)  # fail fast, before any process starts: unknown task, missing data or model
    build_tokenizer(cfg.spec)
    guard_settings(out, cfg.settings(), SETTINGS, "sweep")
    n = workers(jobs, device)
    if on_start and dist.is_main():
        on_start(n)
    records = []
    for record in (_sequential(cfg, out, device) if n == 1 else _parallel(cfg, out, n, device)):
        records.append(record)
        if dist.is_main():
            write_results(out, results_doc(cfg, records, task))
            if on_result:
                on_result(record)
    doc = results_doc(cfg, records, task)
    if dist.is_main():
        write_results(out, doc)
    return doc
