"""Our encoder in bf16 on a GPU against transformers' BertModel / RobertaModel (sdpa) in bf16, random
weights of BERT-base and BERT-large shape, a padded mix of lengths; one run. Writes the tables, the
GPU's name and the torch version to OUT/bench_gpu.md.

  python bench/bench_gpu.py [--device cuda] [--shapes base,large] [--batch 32] [--seq 128] [--out docs/gpu]

`--device cpu --shapes tiny` runs the same code end to end on a CPU in seconds (CI runs it so).
Per family and shape:
  forward       eval: ours (bf16 copy; packed tokens, varlen attention on CUDA) vs HF sdpa in bf16
  train step    forward, backward, Adamax on fp32 weights: ours as st.train.TrainingStep (bf16 copy,
                fp32 masters) vs HF under bf16 autocast
  importance    eval, per-example head/FFN mask gradients as st.importance (bf16) vs HF eager with an
                L×H head mask under bf16 autocast (HF has no head mask on its fast paths)
  pruned        ours at r = 0.3 and 0.5 (physically pruned), forward speed-up over dense ours against the
                FLOP ideal (dense FLOPs / pruned FLOPs)
Throughput is real (non-padding) tokens per second; MFU = model FLOPs per second (6·params·tokens for
training, 2·params·tokens forward, attention included) over the GPU's dense bf16 peak, where known.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from st.importance import Scores  # noqa: E402
from st.models import load_pretrained  # noqa: E402
from st.models.bert import BertConfig  # noqa: E402
from st.precision import accumulate_grads, compute_copy, sync_weights  # noqa: E402
from st.prune import prune_encoder  # noqa: E402
from st.tickets import make_ticket  # noqa: E402

SHAPES = {  # L, D, H, F
    "tiny": (2, 64, 4, 128),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 125, "L4": 121}  # dense


def peak(name: str) -> float | None:
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def inputs(batch: int, seq: int, vocab: int, device, pad: int = 0):
    """A padded mix of lengths: uniform in [seq/4, seq], the longest = seq."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (batch, seq), generator=g).masked_fill(mask == 0, pad)
    return ids.to(device), torch.zeros_like(ids).to(device), mask.to(device)


def timer(device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return run


def flops_per_token(c: BertConfig, seq: int) -> float:
    """Forward FLOPs per token: 2 per weight of the encoder's matmuls plus attention's QKᵀ and AV."""
    per_layer = []
    for i in range(c.num_layers):
        inner = len(c.layer_heads(i)) * c.head_dim
        per_layer.append(2 * (4 * c.hidden_size * inner + 2 * c.hidden_size * c.layer_ffn_size(i)) + 4 * seq * inner)
    return float(sum(per_layer))


def hf_model(family: str, shape: tuple, seq: int, attn: str, device, folder: Path | None = None):
    """A random HF model of `shape` (the same weights every call), saved to `folder` when given."""
    import transformers

    L, D, H, F = shape
    kind = {
        "bert": (transformers.BertConfig, transformers.BertModel, 0),
        "roberta": (transformers.RobertaConfig, transformers.RobertaModel, 2),
    }[family]
    config = kind[0](
        vocab_size=30522,
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=H,
        intermediate_size=F,
        max_position_embeddings=seq + kind[2],
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = kind[1](config, add_pooling_layer=False)
    if folder is not None:
        model.save_pretrained(str(folder))
    return model.to(device)


def bench_one(family: str, shape: str, args, device: torch.device, run, top: float | None) -> tuple[list, list]:
    """The table rows of one family and shape: the workloads, and the pruned speed-ups."""
    lines, pruned_lines = [], []
    L, D, H, F = SHAPES[shape]
    with tempfile.TemporaryDirectory() as folder:  # ours loads HF's weights the way users load theirs
        hf = hf_model(family, SHAPES[shape], args.seq, "sdpa", device, Path(folder))
        ours = load_pretrained(folder).to(device)
    c = ours.config
    ids, types, mask = inputs(args.batch, args.seq, c.vocab_size, device, c.pad_token_id)
    tokens = int(mask.sum())
    fwd_flops = flops_per_token(c, args.seq) * tokens
    rows = {}

    # forward
    ours16 = compute_copy(ours.eval(), "bf16")
    hf16 = hf_model(family, SHAPES[shape], args.seq, "sdpa", device).to(torch.bfloat16).eval()
    with torch.no_grad():
        rows["forward"] = (
            run(lambda: ours16(ids, types, mask), args.warmup, args.repeats),
            run(lambda: hf16(input_ids=ids, attention_mask=mask), args.warmup, args.repeats),
            fwd_flops,
        )
    # training step
    weight = mask[..., None].float()
    ours.train(), hf.train()
    master, copy16 = ours, compute_copy(ours, "bf16")
    opt_ours = torch.optim.Adamax(master.parameters(), lr=1e-5)
    opt_hf = torch.optim.Adamax(hf.parameters(), lr=1e-5)

    def step_ours():
        (copy16(ids, types, mask).float() * weight).sum().backward()
        accumulate_grads(master, copy16)
        opt_ours.step(), opt_ours.zero_grad(set_to_none=True)
        sync_weights(master, copy16)

    def step_hf():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        (out.float() * weight).sum().backward()
        opt_hf.step(), opt_hf.zero_grad(set_to_none=True)

    rows["train step"] = (run(step_ours, 1, args.repeats), run(step_hf, 1, args.repeats), 3 * fwd_flops)
    # importance
    frozen = compute_copy(ours.eval().requires_grad_(False), "bf16")
    eager = hf_model(family, SHAPES[shape], args.seq, "eager", device).eval()

    def importance_ours():
        head = torch.ones(args.batch, L, H, device=device, requires_grad=True)
        ffn = torch.ones(args.batch, L, device=device, requires_grad=True)
        out = frozen(ids, types, mask, head_mask=head, ffn_mask=ffn)
        torch.autograd.grad((out.float() * weight).sum(), [head, ffn])

    def importance_hf():
        head = torch.ones(L, H, device=device, requires_grad=True)
        eager.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = eager(input_ids=ids, attention_mask=mask, head_mask=head).last_hidden_state
        (out.float() * weight).sum().backward()

    rows["importance"] = (
        run(importance_ours, 1, args.repeats),
        run(importance_hf, 1, args.repeats),
        2 * fwd_flops,
    )
    for workload, (t_ours, t_hf, flops) in rows.items():
        mfu = f"{flops / t_ours / top:.1%}" if top else "n/a"
        lines.append(
            f"| {family} | {shape} | {workload} | {t_ours * 1e3:.1f} | {t_hf * 1e3:.1f} | "
            f"{t_hf / t_ours:.2f}x | {tokens / t_ours:,.0f} | {mfu} |"
        )
    # pruned speed-ups against the FLOP ideal
    dense = rows["forward"][0]
    g = torch.Generator().manual_seed(1)
    scores = Scores(torch.rand(L, H, generator=g), torch.rand(L, generator=g), 1, {})
    for r in (0.3, 0.5):
        ticket = make_ticket(scores, r, "winning", 0, config=c)
        pruned = compute_copy(prune_encoder(ours, ticket.head_mask_tensor(), ticket.ffn_mask_tensor()).eval(), "bf16")
        with torch.no_grad():
            t = run(lambda pruned=pruned: pruned(ids, types, mask), args.warmup, args.repeats)
        ideal = flops_per_token(c, args.seq) / flops_per_token(pruned.config, args.seq)
        pruned_lines.append(f"| {family} | {shape} | {r} | {ideal:.2f}x | {dense / t:.2f}x | {dense / t / ideal:.2f} |")
    return lines, pruned_lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="base,large")
    p.add_argument("--families", default="bert,roberta")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "gpu")
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    top = peak(name) if device.type == "cuda" else None
    run = timer(device)
    lines = [
        f"# GPU benchmark: {name}",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}; batch {args.batch}, lengths "
        f"uniform in [{args.seq // 4}, {args.seq}] (padded to {args.seq}); bf16; medians of {args.repeats}.",
        "",
        "| family | shape | workload | ours ms | HF ms | HF/ours | tokens/s (ours) | MFU (ours) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pruned_lines = [
        "",
        "| family | shape | r | FLOP ideal | measured speed-up | efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for family in args.families.split(","):
        for shape in args.shapes.split(","):
            rows, pruned = bench_one(family, shape, args, device, run, top)
            lines += rows
            pruned_lines += pruned
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = "\n".join(lines + pruned_lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
