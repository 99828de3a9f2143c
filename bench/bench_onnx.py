"""Pruned and int8 ONNX exports in ONNX Runtime against the dense fp32 export, in one run.

  python bench/bench_onnx.py [--checkpoint DIR] [--threads 1] [--repeats 30] [--repeats-batch 8]
                             [--fuse-skip-layer-norm]

MiniLM-L6 with a classification head; tickets at r = 0.2, 0.4, 0.6, each pruned physically and written
by `st.onnx_export.export_onnx` (which checks it in ONNX Runtime first), and the unpruned model written
the same way; each also quantized to int8 by `st.onnx_export.quantize_int8` (what `st export --quantize
int8` writes). All opened with `st.onnx_export.inference_session` (--fuse-skip-layer-norm: ORT's
defaults). Two workloads, sentence pairs of 128 real tokens:
  latency     batch 1 × 128: milliseconds per call
  throughput  batch 32 × 128: examples per second
Speed-up = dense time / pruned time in the same precision (and, last column, against the dense fp32
export); efficiency = speed-up / ideal, where the ideal is the ratio of the encoder layers' FLOPs (what
pruning removes). Targets: efficiency >= 0.9; r = 0.4 int8 >= 3x the dense fp32 export at batch 32.

--checkpoint: a fine-tuned `st finetune` folder (e.g. --task rotten_tomatoes --train-size 2000); its
tickets come from its own importance scores (256 training examples) and every export's dev accuracy is
measured in ONNX Runtime (target: int8 within 1 point of fp32 at r = 0.4). The pruned models are the
fine-tuned model cut to the ticket without rewinding and fine-tuning again, so their accuracy is lower
than a sweep's tickets; the int8-against-fp32 difference is what the column is for. Without it: the
pre-trained model, tickets from fixed random scores, no accuracy.
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
from st.models import BertClassifier, load_checkpoint, load_pretrained  # noqa: E402
from st.onnx_export import export_onnx, inference_session, quantize_int8, require_onnx  # noqa: E402
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


def models_and_accuracy(checkpoint: str | None):
    """(dense model, importance scores, dev accuracy of an ONNX file or None)."""
    if checkpoint is None:
        torch.manual_seed(0)
        dense = BertClassifier(load_pretrained("minilm-l6"), 2).eval()
        c = dense.encoder.config
        g = torch.Generator().manual_seed(0)
        scores = Scores(
            torch.rand(c.num_layers, c.num_heads, generator=g), torch.rand(c.num_layers, generator=g), num_examples=1
        )
        return dense, scores, None
    from st.onnx_accuracy import AccuracyCheck, onnx_metric
    from st.pipeline import score_checkpoint

    dense = load_checkpoint(checkpoint)[0].eval()
    check = AccuracyCheck.from_checkpoint(checkpoint)
    scores = score_checkpoint(checkpoint, num_examples=256)
    return dense, scores, lambda path: onnx_metric(path, check.dev, check.task, check.pad_id)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="A fine-tuned st checkpoint: real tickets and dev accuracy.")
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

    dense, scores, accuracy = models_and_accuracy(args.checkpoint)
    c = dense.encoder.config
    models = {"dense": dense}
    for r in RATIOS:
        ticket = make_ticket(scores, r, config=c)
        models[f"r={r}"] = prune_classifier(dense, ticket.head_mask_tensor(), ticket.ffn_mask_tensor()).eval()

    sessions, errors, sizes, acc = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            for precision in ("fp32", "int8"):
                path = Path(tmp) / f"{name}-{precision}.onnx"
                if precision == "fp32":
                    errors[name] = export_onnx(model, path)
                else:
                    quantize_int8(Path(tmp) / f"{name}-fp32.onnx", path)
                key = (name, precision)
                sizes[key] = path.stat().st_size / 1e6
                acc[key] = accuracy(path) if accuracy else None
                sessions[key] = inference_session(path, args.threads, fuse_skip_layer_norm=args.fuse_skip_layer_norm)
    latency, latency_cpu = race(sessions, pairs(1, args.seq, c.vocab_size), warmup=3, repeats=args.repeats)
    batch_t, batch_cpu = race(sessions, pairs(args.batch, args.seq, c.vocab_size), warmup=1, repeats=args.repeats_batch)

    fusion = "on (ORT default)" if args.fuse_skip_layer_norm else "off (st.onnx_export.inference_session)"
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} threads, "
        f"SkipLayerNormFusion {fusion}; MiniLM-L6, sequence {args.seq}; "
        f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'pre-trained weights, random-score tickets'}"
    )
    print(f"largest |logit - st| of the fp32 exports {max(errors.values()):.1e}")
    print(
        "speed-up = dense time / pruned time in the same precision, eff = speed-up / ideal; vs fp32 = the dense fp32 "
        "export's time / this one's; (cpu: efficiency from process-CPU time, less sensitive to other processes)"
    )
    print(
        f"{'model':>12} {'MB':>5} {'dev acc':>7} {'ideal':>6} | "
        f"{'latency':>9} {'speed-up':>8} {'eff':>5} {'(cpu)':>5} | "
        f"{'ex/s':>7} {'speed-up':>8} {'eff':>5} {'(cpu)':>5} {'vs fp32':>7}"
    )
    dense_flops, worst = flops(dense, args.seq), float("inf")
    base = ("dense", "fp32")
    for precision in ("fp32", "int8"):
        ref = ("dense", precision)
        for name, m in models.items():
            key = (name, precision)
            ideal = dense_flops / flops(m, args.seq)
            up1, upb = latency[ref] / latency[key], batch_t[ref] / batch_t[key]
            cpu1, cpub = latency_cpu[ref] / latency_cpu[key] / ideal, batch_cpu[ref] / batch_cpu[key] / ideal
            if name != "dense":
                worst = min(worst, up1 / ideal, upb / ideal)
            shown = "   —" if acc[key] is None else f"{100 * acc[key]:7.2f}"
            print(
                f"{name + ' ' + precision:>12} {sizes[key]:5.1f} {shown:>7} {ideal:5.2f}x | "
                f"{latency[key] * 1e3:6.1f} ms {up1:7.2f}x {up1 / ideal:5.2f} {cpu1:5.2f} | "
                f"{args.batch / batch_t[key]:7.1f} {upb:7.2f}x {upb / ideal:5.2f} {cpub:5.2f} "
                f"{batch_t[base] / batch_t[key]:6.2f}x"
            )
    print(f"worst pruning efficiency {worst:.2f} (target >= 0.9) {'ok' if worst >= 0.9 else 'MISSED'}")
    target = batch_t[base] / batch_t[("r=0.4", "int8")]
    print(
        f"r=0.4 int8 vs dense fp32 at batch {args.batch}: {target:.2f}x (target >= 3) "
        f"{'ok' if target >= 3 else 'MISSED'}"
    )
    if accuracy:
        drop = 100 * (acc[("r=0.4", "fp32")] - acc[("r=0.4", "int8")])
        print(
            f"r=0.4 int8 dev accuracy {-drop:+.2f} points against r=0.4 fp32 (target: no more than 1 point lower) "
            f"{'ok' if drop <= 1 else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
