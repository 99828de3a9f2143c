"""Pruned ONNX exports in ONNX Runtime against the dense export, in one run.

  python bench/bench_onnx.py [--threads 1] [--repeats 30] [--repeats-batch 8] [--fuse-skip-layer-norm]

MiniLM-L6 with a 2-label head; tickets at r = 0.2, 0.4, 0.6 (from fixed random scores, as in
bench_pruning.py), each pruned physically and written by `st.onnx_export.export_onnx` (which checks
it in ONNX Runtime first), and the unpruned model written the same way, each opened with
`st.onnx_export.inference_session` (--fuse-skip-layer-norm: ORT's defaults). Two workloads, sentence
pairs of 128 real tokens:
  latency     batch 1 × 128: milliseconds per call
  throughput  batch 32 × 128: examples per second
Speed-up = dense time / pruned time; efficiency = speed-up / ideal, where the ideal is the ratio
of the encoder layers' FLOPs (what pruning removes). Target: efficiency >= 0.9.
Sessions are timed round-robin (one call each, repeat) after a warm-up, so load from other
processes hits all of them alike; medians are reported. One intra-op thread by default: on a shared
2-core machine, ORT's two threads wait on each other whenever another process holds a core (batch-1
latency 2-4x worse than one thread, and erratic).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_pruning import flops  # noqa: E402  (the same FLOP count as the PyTorch benchmark)

from st.importance import Scores  # noqa: E402
from st.models import BertClassifier, load_pretrained  # noqa: E402
from st.onnx_export import export_onnx, inference_session, require_onnx  # noqa: E402
from st.prune import prune_classifier  # noqa: E402
from st.tickets import make_ticket  # noqa: E402

RATIOS = (0.2, 0.4, 0.6)


def pairs(batch: int, seq: int, vocab: int) -> dict:
    """[CLS] a [SEP] b [SEP], seq real tokens each, no padding (so FLOP counts are exact)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    ids[:, 0], ids[:, seq // 2], ids[:, -1] = 101, 102, 102
    types = torch.zeros_like(ids)
    types[:, seq // 2 + 1 :] = 1
    return {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy(), "token_type_ids": types.numpy()}


def race(sessions: dict, feed: dict, warmup: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall seconds and median process-CPU seconds per call of each session, round-robin."""
    for session in sessions.values():
        for _ in range(warmup):
            session.run(["logits"], feed)
    wall, cpu = {name: [] for name in sessions}, {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            session.run(["logits"], feed)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return (
        {name: statistics.median(t) for name, t in wall.items()},
        {name: statistics.median(t) for name, t in cpu.items()},
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=30, help="Round-robin rounds at batch 1.")
    p.add_argument("--repeats-batch", type=int, default=8, help="Round-robin rounds at the large batch.")
    p.add_argument(
        "--fuse-skip-layer-norm", action="store_true", help="ORT's default fusion, which st's sessions turn off."
    )
    args = p.parse_args()
    require_onnx()
    import onnxruntime as ort

    torch.manual_seed(0)
    dense = BertClassifier(load_pretrained("minilm-l6"), 2).eval()
    c = dense.encoder.config
    g = torch.Generator().manual_seed(0)
    scores = Scores(
        torch.rand(c.num_layers, c.num_heads, generator=g), torch.rand(c.num_layers, generator=g), num_examples=1
    )
    models = {"dense": dense}
    for r in RATIOS:
        ticket = make_ticket(scores, r, config=c)
        models[f"r={r}"] = prune_classifier(dense, ticket.head_mask_tensor(), ticket.ffn_mask_tensor()).eval()

    sessions, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            errors[name] = export_onnx(model, path)
            sessions[name] = inference_session(path, args.threads, fuse_skip_layer_norm=args.fuse_skip_layer_norm)
    latency, latency_cpu = race(sessions, pairs(1, args.seq, c.vocab_size), warmup=3, repeats=args.repeats)
    batch_t, batch_cpu = race(sessions, pairs(args.batch, args.seq, c.vocab_size), warmup=1, repeats=args.repeats_batch)

    fusion = "on (ORT default)" if args.fuse_skip_layer_norm else "off (st.onnx_export.inference_session)"
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} threads, "
        f"SkipLayerNormFusion {fusion}; "
        f"MiniLM-L6, sequence {args.seq}"
    )
    print(
        f"dense: latency {latency['dense'] * 1e3:.1f} ms (batch 1), throughput "
        f"{args.batch / batch_t['dense']:.1f} ex/s "
        f"(batch {args.batch}); largest |logit - st| of the exports {max(errors.values()):.1e}"
    )
    print(
        "speed-up = dense time / pruned time, eff = speed-up / ideal; (cpu: the same from process-CPU time, less "
        "sensitive to other processes)"
    )
    print(
        f"{'ticket':>7} {'params':>7} {'ideal':>6} | {'latency':>9} {'speed-up':>8} {'eff':>5} {'(cpu)':>5} | "
        f"{'ex/s':>7} {'speed-up':>8} {'eff':>5} {'(cpu)':>5}"
    )
    dense_flops, worst = flops(dense, args.seq), float("inf")
    for name, m in models.items():
        if name == "dense":
            continue
        ideal = dense_flops / flops(m, args.seq)
        share = sum(p.numel() for p in m.parameters()) / sum(p.numel() for p in dense.parameters())
        up1, upb = latency["dense"] / latency[name], batch_t["dense"] / batch_t[name]
        cpu1, cpub = latency_cpu["dense"] / latency_cpu[name] / ideal, batch_cpu["dense"] / batch_cpu[name] / ideal
        worst = min(worst, up1 / ideal, upb / ideal)
        print(
            f"{name:>7} {share:7.1%} {ideal:5.2f}x | {latency[name] * 1e3:6.1f} ms {up1:7.2f}x "
            f"{up1 / ideal:5.2f} {cpu1:5.2f} | "
            f"{args.batch / batch_t[name]:7.1f} {upb:7.2f}x {upb / ideal:5.2f} {cpub:5.2f}"
        )
    print(f"worst efficiency {worst:.2f} (target >= 0.9) {'ok' if worst >= 0.9 else 'MISSED'}")


if __name__ == "__main__":
    main()
