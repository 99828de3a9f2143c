"""Folder names and file formats: the one place that knows them. Torch-free, so that `st report`
renders without loading torch; every module that reads or writes these files imports them from here.

A model folder (ours or Hugging Face's):  config.json, model.safetensors (or pytorch_model.bin)
A run folder (`st.runs`):                run.json, metrics.json (written last), .lock, and .progress/
                                         (state.pt, best/, best.sha256.json) while it trains
A sweep folder (`st.sweep`):
  sweep.json                          the settings that made it: a rerun with others is refused
  seed{s}/full/                       the full model's run (r = 0), an `st finetune` folder
  seed{s}/scores.json, scores.png     its importance scores
  seed{s}/{kind}-r{ratio:.2f}/        ticket.json and run/, the rewound subnetwork's run
  results.json                        every run, rewritten as each one finishes
  report.md, phase.png, super_ticket.json   rendered from results.json by `st.report`
  deploy_ticket.json                  the same, for the ticket chosen under --min-speedup
A ticket file: `ticket_json` below.
"""

from __future__ import annotations

from pathlib import Path

from st.errors import UserError

# ---- model and run folders ----
WEIGHTS, TORCH_WEIGHTS, CONFIG = "model.safetensors", "pytorch_model.bin", "config.json"
RUN_SETTINGS, METRICS, PROGRESS, STATE, BEST, LOCK = (
    "run.json",
    "metrics.json",
    ".progress",
    "state.pt",
    "best",
    ".lock",
)
BEST_MANIFEST = "best.sha256.json"  # in .progress: the digests of best/'s files

# ---- sweep folders ----
SWEEP_SETTINGS, RESULTS = "sweep.json", "results.json"
REPORT, PLOT, SUPER_TICKET = "report.md", "phase.png", "super_ticket.json"
DEPLOY_TICKET = "deploy_ticket.json"  # written by `st sweep` / `st report` with --min-speedup
SCORES, TICKET = "scores.json", "ticket.json"
FULL = "full"  # the kind of the unpruned model's runs: r = 0 of every sweep


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed{seed}"


def run_name(kind: str, ratio: float) -> str:
    return FULL if kind == FULL else f"{kind}-r{ratio:.2f}"


def run_dir(out: str | Path, seed: int, kind: str, ratio: float) -> Path:
    """The `st finetune` folder of one run of a sweep."""
    folder = seed_dir(out, seed) / run_name(kind, ratio)
    return folder if kind == FULL else folder / "run"


def ticket_path(out: str | Path, seed: int, kind: str, ratio: float) -> Path:
    return seed_dir(out, seed) / run_name(kind, ratio) / TICKET


def scores_path(out: str | Path, seed: int) -> Path:
    return seed_dir(out, seed) / SCORES


def first_seed_scores(out: str | Path) -> Path | None:
    """The scores of a sweep folder's first seed (seed2 before seed10), or None when it has none."""
    found = sorted(Path(out).glob(f"seed*/{SCORES}"), key=lambda p: (len(p.parent.name), p.parent.name))
    return found[0] if found else None


# ---- ticket files ----
# What a ticket file remembers of its model, to refuse it on another one.
FINGERPRINT_KEYS = ("num_layers", "num_heads", "hidden_size", "intermediate_size", "vocab_size")


def ticket_json(
    head_mask,
    ffn_mask,
    ratio: float,
    kind: str,
    seed: int,
    percent_remaining: dict | None,
    model_fingerprint: dict | None,
) -> dict:
    """A ticket file's contents; heads_pruned / ffn_pruned are written for readers (loading derives them)."""
    return {
        "kind": kind,
        "ratio": ratio,
        "seed": seed,
        "heads_pruned": sum(list(r).count(0) for r in head_mask),
        "ffn_pruned": list(ffn_mask).count(0),
        "percent_remaining": percent_remaining,
        "model_fingerprint": model_fingerprint,
        "head_mask": [list(r) for r in head_mask],
        "ffn_mask": list(ffn_mask),
    }


def full_ticket_json(encoder: dict, seed: int) -> dict:
    """The all-ones ticket of the model whose encoder config (a checkpoint's "encoder") is `encoder`."""
    L, H0 = encoder["num_layers"], encoder["num_heads"]
    return ticket_json(
        [[1] * H0 for _ in range(L)],
        [1] * L,
        0.0,
        FULL,
        seed,
        {"model": 100.0, "encoder": 100.0},
        {k: encoder[k] for k in FINGERPRINT_KEYS},
    )


# ---- results.json ----
# What rendering reads of results.json: a hand-edited file that lacks a key, or holds the wrong kind
# of value, is one line naming it (e.g. `runs[3].report`), never a traceback.
RUN_SHAPE = {
    "seed": int,
    "kind": str,
    "ratio": (int, float),
    "percent_remaining": (dict, type(None)),
    "selection": (dict, type(None)),
    "report": (dict, type(None)),
    "error": (str, type(None)),
    "run": str,
}
# Written by later releases (`st.speed`): a file without them still renders, one that holds them is checked.
OPTIONAL_RUN_SHAPE = {"speedup": (int, float, type(None))}
SPEED_SHAPE = {"runtime": str, "cpu": str, "workload": {"batch": int, "seq": int, "rounds": int, "threads": int}}
RESULTS_SHAPE = {
    "task": str,
    "main_metric": str,
    "runs": [RUN_SHAPE],
    "settings": {
        "ratios": list,
        "kinds": list,
        "seeds": int,
        "job": {
            "model": str,
            "train_size": (int, type(None)),
            "max_length": int,
            "train": {"seed": int, "epochs": int, "batch_size": int, "lr": (int, float)},
        },
    },
}


def check_shape(value, shape, path: Path, where: str = "") -> None:
    """Raise one UserError naming the first key of `shape` that `value` lacks or holds wrongly."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise UserError(f"{path}: {where or 'the file'} must be an object; rerun the sweep to rewrite it")
        for key, inner in shape.items():
            name = f"{where}.{key}" if where else key
            if key not in value:
                raise UserError(f"{path} lacks the key {name}; rerun the same `st sweep` command to rewrite it")
            check_shape(value[key], inner, path, name)
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise UserError(f"{path}: {where} must be a list; rerun the same `st sweep` command to rewrite it")
        for i, item in enumerate(value):
            check_shape(item, shape[0], path, f"{where}[{i}]")
    elif isinstance(value, bool) or not isinstance(value, shape):
        raise UserError(
            f"{path}: {where} holds {value!r}, not the kind of value st writes there; "
            "rerun the same `st sweep` command to rewrite it"
        )


def check_results(doc: dict, path: Path) -> None:
    """results.json as `st sweep` writes it, down to each run's main metric, or one UserError naming
    the first key that is missing or holds the wrong kind of value."""
    check_shape(doc, RESULTS_SHAPE, path)
    if "speed" in doc:
        check_shape(doc["speed"], SPEED_SHAPE, path, "speed")
    for i, run in enumerate(doc["runs"]):
        for key, kind in OPTIONAL_RUN_SHAPE.items():
            if key in run:
                check_shape(run[key], kind, path, f"runs[{i}].{key}")
        for part in ("selection", "report"):
            if run[part] is not None and doc["main_metric"] not in run[part]:
                raise UserError(
                    f"{path} lacks the key runs[{i}].{part}.{doc['main_metric']}; rerun the same "
                    "`st sweep` command to rewrite it"
                )
