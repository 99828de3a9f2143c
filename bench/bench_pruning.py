"""What pruning buys, on the packaged MiniLM-L6 with a classification head, all in one run.

  python bench/bench_pruning.py [--batch 32] [--seq 128] [--repeats 5] [--threads 2]

(a) importance scoring: one scoring pass (forward + backward w.r.t. B×L×H head and B×L FFN masks,
    weights frozen, as `compute_importance` runs it) against one plain training step (forward +
    backward + Adamax step) of the same model on the same batch. Target: ≤ 1.2×.
(b) physically pruned tickets at r = 0.2, 0.4, 0.6 against the dense model: inference and
    training-step speed-ups next to the ideal from FLOP counts. Target: ≥ 0.9 of the ideal.
Timings are medians over repeats, taken round-robin so that load on the machine hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from st.importance import Scores, compute_importance  # noqa: E402
from st.models import BertClassifier, load_pretrained  # noqa: E402
from st.models.heads import per_example_loss  # noqa: E402
from st.prune import prune_classifier  # noqa: E402
from st.specs import TrainConfig  # noqa: E402
from st.tickets import make_ticket  # noqa: E402
from st.train import make_optimizer  # noqa: E402


def flops(model: BertClassifier, T: int) -> float:
    """Multiply-adds ×2 of one example's forward pass through the encoder layers (what pruning removes)."""
    c = model.encoder.config
    total = 0.0
    for i, layer in enumerate(model.encoder.layers):
        inner = layer.attention.n_heads * c.head_dim
        total += 2 * T * c.hidden_size * 3 * inner  # Q, K, V projections
        total += 2 * 2 * T * T * inner  # scores and weighted values
        total += 2 * T * inner * c.hidden_size  # output projection
        total += 2 * 2 * T * c.hidden_size * c.layer_ffn_size(i)  # FFN up and down
    return total


def batch_of(vocab: int, B: int, T: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, vocab, (B, T), generator=g),
        "token_type_ids": torch.zeros(B, T, dtype=torch.long),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "labels": torch.randint(0, 2, (B,), generator=g),
    }


def train_step(model, optimizer, batch):
    def run():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = per_example_loss(model(**inputs), batch["labels"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def forward(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def run():
        with torch.no_grad():
            model(**inputs)

    return run


def median_times(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = BertClassifier(load_pretrained("minilm-l6"), 2)
    c = dense.encoder.config
    batch = batch_of(c.vocab_size, args.batch, args.seq)

    # (a) scoring pass vs training step
    dense.train()
    optimizer = make_optimizer(dense, TrainConfig(lr=5e-5))
    t = median_times(
        {"train": train_step(dense, optimizer, batch), "score": lambda: compute_importance(dense, [batch])},
        args.repeats,
    )
    ratio = t["score"] / t["train"]
    print(
        f"(a) scoring pass {t['score'] * 1e3:.0f} ms vs training step {t['train'] * 1e3:.0f} ms: "
        f"{ratio:.2f}x  (target <= 1.2x) {'ok' if ratio <= 1.2 else 'MISSED'}"
    )

    # (b) pruned tickets vs dense
    g = torch.Generator().manual_seed(0)
    scores = Scores(
        torch.rand(c.num_layers, c.num_heads, generator=g), torch.rand(c.num_layers, generator=g), num_examples=1
    )
    models = {"dense": dense}
    for r in (0.2, 0.4, 0.6):
        ticket = make_ticket(scores, r, config=c)
        models[f"r={r}"] = prune_classifier(dense, ticket.head_mask_tensor(), ticket.ffn_mask_tensor())
    for m in models.values():
        m.train()
    optimizers = {name: make_optimizer(m, TrainConfig(lr=5e-5)) for name, m in models.items()}
    train_t = median_times({name: train_step(m, optimizers[name], batch) for name, m in models.items()}, args.repeats)
    for m in models.values():
        m.eval()
    infer_t = median_times({name: forward(m, batch) for name, m in models.items()}, args.repeats)

    print(
        f"(b) batch {args.batch} x {args.seq} tokens, {args.threads} threads; speed-up over dense (efficiency "
        "= speed-up / ideal)"
    )
    print(f"{'ticket':>8} {'params':>7} {'ideal':>6} {'infer':>6} {'eff':>5} {'train':>6} {'eff':>5}")
    dense_flops = flops(dense, args.seq)
    worst = 1.0
    for name, m in models.items():
        if name == "dense":
            continue
        ideal = dense_flops / flops(m, args.seq)
        infer, train = infer_t["dense"] / infer_t[name], train_t["dense"] / train_t[name]
        worst = min(worst, infer / ideal, train / ideal)
        share = sum(p.numel() for p in m.parameters()) / sum(p.numel() for p in dense.parameters())
        print(
            f"{name:>8} {share:7.1%} {ideal:5.2f}x {infer:5.2f}x {infer / ideal:5.2f} {train:5.2f}x "
            f"{train / ideal:5.2f}"
        )
    print(f"worst efficiency {worst:.2f} (target >= 0.9) {'ok' if worst >= 0.9 else 'MISSED'}")


if __name__ == "__main__":
    main()
