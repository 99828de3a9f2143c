"""What each winning ticket of a sweep gains in inference speed, measured on the machine that runs this.

A ticket's speed-up is the full model's time over its physically pruned model's, on one workload
(sentence pairs of `seq` real tokens, `batch` at a time, one intra-op thread: on a shared machine a
second thread waits on whoever holds the other core), timed round-robin, median of a few rounds, so
load from other processes hits every model alike. The runtime is the exported graph in ONNX Runtime
(`st.onnx_export`, the same file `st export --onnx` writes) where the onnx extra is installed, else
`st`'s own model in PyTorch; results.json names which, with the CPU.

Weights do not change the time, only shapes do: models are built from the full run's config with
random weights and each ticket's masks, so a sweep whose weights were dropped (--keep-weights none)
is measured as well. Tickets at one ratio prune the same number of heads and FFN blocks in every seed
(same FLOPs), so the first seed's ticket stands for its ratio.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from st.errors import UserError
from st.io import read_json, write_json
from st.layout import FULL, RESULTS, check_results, run_dir, ticket_path
from st.models.checkpoint import read_checkpoint_config
from st.models.families import build_encoder
from st.models.heads import BertClassifier
from st.onnx_export import export_onnx, inference_session
from st.prune import prune_classifier
from st.tickets import Ticket


@dataclass(frozen=True)
class Workload:
    batch: int = 32
    seq: int = 128
    rounds: int = 3  # timed round-robin rounds after one warm-up call each; the median is kept
    threads: int = 1


def _onnx_installed() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _feed(config, workload: Workload) -> dict[str, torch.Tensor]:
    """[CLS] a [SEP] b [SEP], `seq` real tokens per row, no padding (every model does the same work)."""
    g = torch.Generator().manual_seed(0)
    seq = min(workload.seq, config.max_tokens)
    ids = torch.randint(min(1000, config.vocab_size - 1), config.vocab_size, (workload.batch, seq), generator=g)
    types = torch.zeros_like(ids)
    if config.type_vocab_size > 1:
        types[:, seq // 2 :] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}


def _onnx_runners(models: dict, workload: Workload, folder: Path) -> dict:
    feed = {k: v.numpy() for k, v in _feed(next(iter(models.values())).encoder.config, workload).items()}
    runners = {}
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        export_onnx(model, path)
        session = inference_session(path, workload.threads)
        runners[name] = lambda session=session: session.run(["logits"], feed)
    return runners


def _torch_runners(models: dict, workload: Workload) -> dict:
    feed = _feed(next(iter(models.values())).encoder.config, workload)

    def run(model):
        with torch.no_grad():
            model(feed["input_ids"], feed["token_type_ids"], feed["attention_mask"])

    return {name: (lambda model=model: run(model)) for name, model in models.items()}


def measure_speedups(
    model: BertClassifier, tickets: dict[float, Ticket], workload: Workload = Workload(), runtime: str = "auto"
) -> tuple[dict[float, float], dict]:
    """Speed-up of each ticket's pruned `model` over `model` itself, and how it was measured.
    `runtime`: "onnxruntime", "torch", or "auto" (ONNX Runtime where the extra is installed)."""
    if runtime == "auto":
        runtime = "onnxruntime" if _onnx_installed() else "torch"
    model = model.eval()
    models = {"full": model}
    for ratio, ticket in tickets.items():
        models[ratio] = prune_classifier(model, ticket.head_mask_tensor(), ticket.ffn_mask_tensor()).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(workload.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="st-speed-") as tmp:
            if runtime == "onnxruntime":
                import onnxruntime

                runners, name = _onnx_runners(models, workload, Path(tmp)), f"onnxruntime {onnxruntime.__version__}"
            else:
                runners, name = _torch_runners(models, workload), f"torch {torch.__version__} (st's model)"
            seconds = _race(runners, workload.rounds)
    finally:
        torch.set_num_threads(threads)
    speedups = {ratio: seconds["full"] / seconds[ratio] for ratio in tickets}
    info = {"runtime": name, "cpu": cpu_name(), "workload": asdict(workload), "full_seconds": seconds["full"]}
    return speedups, info


def _race(runners: dict, rounds: int) -> dict:
    """Median wall seconds per call of each runner, one call each per round after a warm-up call each."""
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_sweep(out: str | Path, workload: Workload = Workload(), runtime: str = "auto") -> dict:
    """Measure every winning ticket of the sweep in `out` against its full model, write each run's
    "speedup" (the full model's: 1.0) and how it was measured ("speed") into results.json; returns it."""
    out = Path(out)
    path = out / RESULTS
    try:
        doc = read_json(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}); pass a folder written by `st sweep`") from None
    check_results(doc, path)
    finished = [r for r in doc["runs"] if r["error"] is None and r["selection"] is not None]
    full = next((r for r in finished if r["kind"] == FULL), None)
    if full is None:
        raise UserError(f"{out}: no full-model run finished, so there is nothing to measure against; rerun the sweep")
    config, num_labels = read_checkpoint_config(run_dir(out, full["seed"], FULL, 0.0))
    tickets = {}
    for r in sorted(finished, key=lambda r: r["seed"]):
        if r["kind"] == "winning" and r["ratio"] not in tickets:
            tickets[r["ratio"]] = Ticket.load(ticket_path(out, r["seed"], "winning", r["ratio"]))
    torch.manual_seed(0)
    model = BertClassifier(build_encoder(config), num_labels)
    speedups, info = measure_speedups(model, tickets, workload, runtime)
    for r in doc["runs"]:
        r["speedup"] = 1.0 if r["kind"] == FULL else speedups.get(r["ratio"]) if r["kind"] == "winning" else None
    doc["speed"] = info
    write_json(path, doc)
    return doc
