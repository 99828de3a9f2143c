"""The phase-transition sweep (Liang et al. 2021), resumable; its super ticket is chosen by `st.select`.

For each seed: fine-tune the full model, score its heads and FFN blocks, make the tickets, and
rewind-and-fine-tune the physically pruned subnetwork of every (kind, ratio). One seed drives the
full model, its scores, its random tickets and its rewound runs, so a sweep is reproducible. Each
seed splits (a sample of) dev into a selection part, which chooses every run's epoch, and a report
part (`st.pipeline.dev_parts`). Runs go one after another, to a local pool of processes, or to a Ray
cluster (`st.engines`), in the same order: every seed's full model first, then its ticket runs as
soon as its tickets exist.

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
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from st import dist
from st.engines import Engine, check_engine, open_engine
from st.errors import UserError
from st.importance import Scores, plot_heatmap
from st.io import write_json
from st.layout import FULL, RESULTS, SWEEP_SETTINGS, WEIGHTS, run_dir, scores_path, ticket_path
from st.models.checkpoint import read_checkpoint_config
from st.pipeline import prepare_run, resolve_defaults, run_finetune, score_checkpoint
from st.runs import check_settings, guard_settings, lock_folder
from st.select import select_super_ticket
from st.specs import HeldOut, RunSpec, run_spec
from st.tickets import KINDS, Ticket, make_ticket

log = logging.getLogger("st")

RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 9))  # 0.1 ... 0.8, the paper's grid


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: the full model's run (`spec`; its seed is the first seed) and the grid around it.
    A plain value: `SweepConfig.create` checks, normalises and resolves one (`plan` builds `st sweep`'s)."""

    spec: RunSpec
    ratios: tuple[float, ...] = RATIOS  # of the winning tickets
    kinds: tuple[str, ...] = KINDS
    control_ratios: tuple[float, ...] | None = None  # of the random and losing tickets (None: `ratios`)
    seeds: int = 3  # spec.seed, spec.seed + 1, ...
    held_out: HeldOut = HeldOut()  # each seed's dev sample: a part chooses epochs and the ticket, the rest reports
    score_examples: int | None = None  # importance over a seeded sample of the training set (None: all)

    @classmethod
    def create(cls, spec: RunSpec, **options) -> SweepConfig:
        """A checked sweep (`options`: the other fields; left out, the defaults above): sorted ratios,
        kinds in the canonical order, and the spec resolved once (`resolve_defaults` reads the model's
        config and hashes its weights)."""
        self = cls(spec, **options)
        kinds = tuple(self.kinds)
        ratios = check_ratios(self.ratios, "--ratios")
        controls = ratios if self.control_ratios is None else check_ratios(self.control_ratios, "--control-ratios")
        if not kinds:
            raise UserError(f"--kinds is empty; give some of {', '.join(KINDS)}")
        for k in kinds:
            if k not in KINDS:
                raise UserError(f"--kinds must be among {', '.join(KINDS)}, got {k!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        fraction = self.held_out.select_fraction
        if (fraction is None) == (self.held_out.report_split is None):
            raise UserError("--select-fraction splits dev into a choosing and a reporting part, --report-split reports "
                            "on another split: give one of them, not both")
        if fraction is not None and not 0 < fraction < 1:
            raise UserError(f"--select-fraction must be in (0, 1), got {fraction}")
        if self.spec.model.ticket is not None or self.spec.model.init:
            raise UserError("a sweep starts from the pre-trained model: drop --ticket / --init")
        kinds = tuple(k for k in KINDS if k in kinds)
        return replace(self, spec=resolve_defaults(spec), ratios=ratios, control_ratios=controls, kinds=kinds)

    @property
    def grid(self) -> list[tuple[str, float]]:
        """Every ticket of a seed as (kind, ratio): winning ones at `ratios`, the controls at `control_ratios`."""
        return [(kind, ratio) for kind in self.kinds for ratio in (self.ratios if kind == "winning" else self.control_ratios)]

    @property
    def total_runs(self) -> int:
        return self.seeds * (1 + len(self.grid))

    @property
    def run_ratios(self) -> list[float]:
        """The ratio of every run of the sweep (0 for each seed's full model)."""
        return self.seeds * [0.0, *(ratio for _, ratio in self.grid)]

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
        # Only when used: the sweep.json of a sweep made without them stays valid to resume.
        if self.control_ratios != self.ratios:
            s["control_ratios"] = list(self.control_ratios)
        if self.held_out.report_split:
            s["report_split"] = self.held_out.report_split
        return json.loads(json.dumps(s))  # tuples as lists: compares equal to what sweep.json reads back


def check_ratios(ratios, option: str) -> tuple[float, ...]:
    """Ratios as sorted floats without r = 0: the full model, which every seed trains anyway, is no ticket."""
    ratios = tuple(ratios)
    if not ratios:
        raise UserError(f"{option} is empty; give comma-separated ratios in [0, 1), e.g. 0.1,0.2,0.3")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise UserError(f"{option} must each be in [0, 1), got {r}")
    if len(set(ratios)) != len(ratios):
        raise UserError(f"{option} lists a ratio twice: {', '.join(map(str, ratios))}")
    return tuple(sorted(float(r) for r in ratios if r > 0))


# ---- the packaged main job -----------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Defaults of `st sweep` without --task (the main job) and of `st sweep --quick`. Every field is
    also an option, and an option given on the command line wins.

    The main job must learn the task: in the study's pilot (docs/study/PLAN.md) 256 examples x 2
    epochs stayed near the majority class (61% of dev), 512 x 2 reached 70%; tickets at r >= 0.6 fall
    to the majority class in these 64 steps, so it shows r <= 0.5 (the study has the whole grid).
    Budget in CPU seconds, measured on 2 cores: a full run ~55, scoring ~12, a ticket ~(1 - 0.85 r)
    of a full run: 3 seeds x (1 full + 5 winning + 6 controls) = 36 runs, ~1,550 CPU-s, ~13 minutes."""

    task: str = "rotten_tomatoes"
    model: str = "minilm-l6"
    train_size: int = 512  # a small training set: where the paper finds the phase transition sharpest
    epochs: int = 2
    batch_size: int = 16  # 64 steps at the default lr for small encoders
    lr: float = 2e-4
    max_length: int = 64  # the longest rotten_tomatoes snippet is 63 tokens: nothing is cut
    dev_size: int = 400  # 200 to choose, 200 to report, per seed
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    control_ratios: tuple[float, ...] | None = (0.1, 0.3, 0.5)  # random and losing tickets' (None: `ratios`)
    seeds: int = 3
    jobs: int = 2  # one-thread processes: on 2 cores, 2 of them beat one with 2 threads


DEMO = Preset()
# The quick look: 1 seed x (full + 2 ratios x 3 kinds) = 7 runs of 32 steps on 192 examples (fewer
# steps only ever predict the majority class, hence lr 5e-4); a full run ~21 CPU-s, tickets at r = 0.3
# and 0.6 about 0.8 and 0.5 of it: 21 + 3 x 1.3 x 21 + 8 (scores) + 6 (start-up) = ~117 CPU-s, a minute.
QUICK = Preset(train_size=192, batch_size=12, lr=5e-4, dev_size=200, ratios=(0.3, 0.6), control_ratios=None, seeds=1)


def plan(*, quick: bool = False, ratios: list[float] | None = None, kinds: list[str] | None = None,
         control_ratios: list[float] | None = None, seeds: int | None = None, select_fraction: float | None = None,
         dev_size: int | None = None, report_split: str | None = None, score_examples: int | None = None,
         jobs: int | None = None, ray: str | None = None, **options) -> tuple[SweepConfig, int]:
    """`st sweep`'s sweep and how many runs go at once. Without a task (or with `quick`) the packaged
    main job's preset fills every option not given (None); `options` are `specs.run_spec`'s."""
    if ray is not None:
        if jobs is not None:
            raise UserError("--jobs sizes the local pool; with --ray, Ray runs as many runs at once as the cluster has CPUs "
                            "(or GPUs): drop --jobs")
        jobs = 1  # unused: Ray decides
    preset = QUICK if quick else DEMO if options.get("task") is None else None
    if preset is not None:
        for name in ("task", "model", "train_size", "epochs", "batch_size", "lr", "max_length"):
            if options.get(name) is None:
                options[name] = getattr(preset, name)
        dev_size = preset.dev_size if dev_size is None else dev_size
        seeds = preset.seeds if seeds is None else seeds
        ratios = list(preset.ratios) if ratios is None else ratios
        if control_ratios is None and preset.control_ratios is not None:
            control_ratios = list(preset.control_ratios)
        jobs = min(preset.jobs, os.cpu_count() or 1) if jobs is None else jobs
    given = lambda **values: {k: v for k, v in values.items() if v is not None}  # noqa: E731
    held_out = HeldOut(**given(select_fraction=select_fraction, dev_size=dev_size, report_split=report_split))
    if report_split and select_fraction is None:  # the report split replaces dev's report part
        held_out = replace(held_out, select_fraction=None)
    sweep = given(ratios=ratios and tuple(ratios), kinds=kinds and tuple(kinds), control_ratios=control_ratios,
                  seeds=seeds, score_examples=score_examples)
    cfg = SweepConfig.create(run_spec(**options), held_out=held_out, **sweep)
    return cfg, 1 if jobs is None else jobs


# ---- the runs ------------------------------------------------------------------------------------


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


def full_stage(cfg: SweepConfig, out: Path, seed: int, *, device: str = "cpu") -> tuple[dict, str | None]:
    """Fine-tune the full model of `seed`, score it and write every ticket of the grid. Returns the
    full model's record, and why the tickets could not be made (None when they were)."""
    out = Path(out)
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


def ticket_run(cfg: SweepConfig, out: Path, seed: int, kind: str, ratio: float, *, device: str = "cpu") -> dict:
    """Rewind to the pre-trained weights and fine-tune the pruned subnetwork of one ticket."""
    out = Path(out)
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
    return [(seed, kind, ratio) for kind, ratio in cfg.grid]


def _runs(cfg: SweepConfig, out: Path, engine: Engine) -> Iterator[dict]:
    """Every seed's full model first, then its ticket runs as soon as its tickets exist; each record as
    its run finishes. Keys are (seed, position): the in-process engine runs them seed by seed."""
    runs = {}
    for seed in cfg.seed_list:
        runs[seed, 0] = (seed, FULL, 0.0)
        engine.submit((seed, 0), full_stage, cfg, out, seed)
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
                engine.submit((seed, i), ticket_run, cfg, out, *spec)
            else:
                yield _failed(_record(*spec, out), RuntimeError(why_not))


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


def run_sweep(cfg: SweepConfig, out: str | Path, *, jobs: int = 1, device: str | None = "cpu", ray: str | None = None,
              keep_weights: str = "best", on_start: Callable[[int], None] | None = None,
              on_result: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) the sweep into `out`; returns results.json's contents. `jobs` runs at once in
    local processes, or on the Ray cluster at `ray` ("local", "auto", host:port; see `st.engines`);
    `device`: resolved once by the caller (`st.dist.pick_device`); with Ray, None lets the cluster's
    GPUs decide. Each run gets the device of the engine slot it runs in. On rank 0, `on_start(runs at once)` is called once the
    input is checked, and `on_result(record)` as each run finishes (records of runs finished before
    this call carry reused=True)."""
    out = Path(out).resolve()  # absolute: a Ray worker on another node has another working directory
    check_engine(jobs, ray)  # everything is checked before anything starts or is written
    if keep_weights not in KEEP_WEIGHTS:
        raise UserError(f"--keep-weights must be one of {', '.join(KEEP_WEIGHTS)}, got {keep_weights!r}")
    check_settings(out, cfg.settings(), SWEEP_SETTINGS, "sweep")
    task = prepare_run(cfg.seed_spec(cfg.spec.seed))[2].task  # task, model, lengths, data, held-out sets: a bad one writes nothing
    lock = lock_folder(out) if dist.is_main() else None  # one sweep at a time in a folder
    guard_settings(out, cfg.settings(), SWEEP_SETTINGS, "sweep")  # how many processes or which engine is no setting: any may resume
    engine = open_engine(jobs, device, ray)
    records = []
    try:
        if on_start and dist.is_main():
            on_start(engine.slots)
        for record in _runs(cfg, out, engine):
            records.append(record)
            if dist.is_main():
                write_results(out, results_doc(cfg, records, task))
                if on_result:
                    on_result(record)
    finally:
        engine.close()  # on an interrupt too: no worker goes on running
        if lock is not None:
            lock.close()
    doc = results_doc(cfg, records, task)
    if dist.is_main():
        write_results(out, doc)
        drop_weights(out, doc, keep_weights)
    return doc


KEEP_WEIGHTS = ("all", "best", "none")


def drop_weights(out: Path, doc: dict, keep: str) -> list[Path]:
    """Once every run finished, delete the weights nobody needs: "best" keeps the full model's and the
    super ticket's runs (every seed), "none" keeps none, "all" all (75 copies, ~5 GB for the main
    job). Metrics, tickets and configs stay, so the sweep still resumes and reports. Returns what went."""
    if keep == "all" or any(r["error"] for r in doc["runs"]):  # a rerun may still change the choice
        return []
    kept = set()
    if keep == "best":
        chosen = select_super_ticket(doc)
        kept = {(FULL, 0.0), (chosen.kind, chosen.ratio)}
    dropped = [out / r["run"] / WEIGHTS for r in doc["runs"] if (r["kind"], r["ratio"]) not in kept]
    for path in dropped:
        path.unlink(missing_ok=True)
    return dropped
