"""What a sweep is, before it runs: `SweepConfig` (the full model's run spec and the grid of tickets
around it, checked and resolved once by `SweepConfig.create`), the packaged main job's presets, and
`plan`, which turns `st sweep`'s options into a sweep. Running it is `st.sweep`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from st.errors import UserError
from st.pipeline import resolve_defaults
from st.specs import HeldOut, RunSpec, given, run_spec
from st.tickets import KINDS, Ticket

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
        if self.held_out.select_fraction is None and self.held_out.report_split is None:  # both: HeldOut refuses
            raise UserError("a sweep reports on a held-out part: give --select-fraction or --report-split")
        if self.spec.model.ticket is not None or self.spec.model.init:
            raise UserError("a sweep starts from the pre-trained model: drop --ticket / --init")
        kinds = tuple(k for k in KINDS if k in kinds)
        return replace(self, spec=resolve_defaults(spec), ratios=ratios, control_ratios=controls, kinds=kinds)

    @property
    def grid(self) -> list[tuple[str, float]]:
        """Every ticket of a seed as (kind, ratio): winning ones at `ratios`, the controls at `control_ratios`."""
        return [
            (kind, ratio)
            for kind in self.kinds
            for ratio in (self.ratios if kind == "winning" else self.control_ratios)
        ]

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
        s = {
            "job": self.spec.settings(),
            "ratios": list(self.ratios),
            "kinds": list(self.kinds),
            "seeds": self.seeds,
            "select_fraction": self.held_out.select_fraction,
            "dev_size": self.held_out.dev_size,
            "score_examples": self.score_examples,
        }
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


def plan(
    *,
    quick: bool = False,
    ratios: list[float] | None = None,
    kinds: list[str] | None = None,
    control_ratios: list[float] | None = None,
    seeds: int | None = None,
    select_fraction: float | None = None,
    dev_size: int | None = None,
    report_split: str | None = None,
    score_examples: int | None = None,
    jobs: int | None = None,
    ray: str | None = None,
    **options,
) -> tuple[SweepConfig, int]:
    """`st sweep`'s sweep and how many runs go at once. Without a task (or with `quick`) the packaged
    main job's preset fills every option not given (None); `options` are `specs.run_spec`'s."""
    if ray is not None:
        if jobs is not None:
            raise UserError(
                "--jobs sizes the local pool; with --ray, Ray runs as many runs at once as the cluster has CPUs "
                "(or GPUs): drop --jobs"
            )
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

    if select_fraction is None and not report_split:
        select_fraction = HeldOut.select_fraction  # the report split, when given, replaces dev's report part
    held_out = HeldOut(select_fraction, dev_size, report_split)
    sweep = given(
        ratios=ratios and tuple(ratios),
        kinds=kinds and tuple(kinds),
        control_ratios=control_ratios,
        seeds=seeds,
        score_examples=score_examples,
    )
    cfg = SweepConfig.create(run_spec(**options), held_out=held_out, **sweep)
    return cfg, 1 if jobs is None else jobs
