"""Our encoder against transformers.BertModel, same weights (the packaged MiniLM-L6) and inputs, one run.

  python bench/bench_encoder.py [--batch 32] [--seq 128] [--repeats 4] [--warmup 1] [--threads 2]
      [--family roberta|mpnet]

`--family roberta` runs the same workloads on a RoBERTa of MiniLM-L6's shape (random weights built by
transformers, perturbed: RobertaModel, pad id 1, positions after the pad id, one token type).
`--family modernbert` on a ModernBERT of MiniLM-L6's width and depth (random, perturbed: ModernBertModel,
GeGLU width 1024, a global layer every 3, local window 128, so local layers see part of a 128-token
input); its masked workload's reference is HF sdpa's training step, since HF ModernBERT takes no head mask.
`--family mpnet` runs them on the real all-mpnet-base-v2 (`make mpnet`) against transformers' MPNetModel,
which has no SDPA attention: there "HF sdpa" below reads HF eager.
`--family deberta-v2` on a random DeBERTa-v3-base-shaped model (DebertaV2Model: 12 layers, D 768, 256 position
buckets, shared attention keys, c2p and p2c, vocabulary 128,100), against HF eager (its only attention);
like ModernBERT's, its masked workload's reference is HF's training step: HF's DeBERTa takes no head mask.

Three workloads; the contenders of a workload are timed round-robin (one call each, repeat) after a
warm-up, so load from other processes hits all of them alike; medians are reported.
  forward     no_grad, eval                                            vs HF sdpa (eager for context)
  train step  train mode (dropout on): forward, loss = sum over real tokens, backward, Adamax step  vs HF sdpa
  masked f+b  eval, forward + backward for head-mask gradients, i.e. importance scoring:
              ours as st.importance runs it (per-example B×L×H head and B×L FFN masks, weights
              frozen, autograd.grad on the masks) vs HF eager with an L×H head mask and
              loss.backward() as HF-based scoring does (run_bertology; HF drops to eager attention
              whenever head_mask is given). A like-for-like row (ours, weights not frozen, head
              mask only) shows how much of the gain is the kernels and how much the frozen weights.
Inputs are sentence pairs padded to the longest in the batch, as `st.tokenize.collate` pads them.
Ratios are HF time / our time (> 1: we are faster), from wall-clock medians and, as a check that is
less sensitive to other processes on a shared machine, from process-CPU-time medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from st.models import load_pretrained, resolve_model_dir  # noqa: E402

TARGETS = {"forward": 1.0, "train step": 1.15, "masked f+b": 1.5}
NO_HEAD_MASK = (
    "modernbert",
    "deberta-v2",
)  # HF's model takes no head_mask: the masked workload's reference is HF training


def make_inputs(batch: int, seq: int, vocab: int, seed: int = 0, pad: int = 0):
    """Sentence pairs of lengths uniform in [seq/2, seq], padded to the longest (= seq):
    [CLS] a [SEP] b [SEP] [PAD]..."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for b in range(batch):
        n = seq if b == 0 else int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        split = n // 2
        ids[b, 0], ids[b, split], ids[b, n - 1] = 101, 102, 102
        types[b, split + 1 : n] = 1
        mask[b, :n] = 1
    return ids.masked_fill(mask == 0, pad), types * mask, mask


def roberta_like(folder: Path, out: Path) -> Path:
    """A random RobertaModel with the shape of the BERT in `folder`, saved to `out`."""
    import transformers

    bert = transformers.BertConfig.from_pretrained(str(folder))
    config = transformers.RobertaConfig(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        max_position_embeddings=bert.max_position_embeddings + 2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
    )
    model = transformers.RobertaModel(config, add_pooling_layer=False)
    with torch.no_grad():  # fresh LayerNorms (γ = 1, β = 0) make the benchmark's loss, a sum over D, constant:
        for p in model.parameters():  # its head-mask gradients would be rounding noise
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


def modernbert_like(folder: Path, out: Path) -> Path:
    """A random ModernBertModel with the width and depth of the BERT in `folder`, saved to `out`."""
    import transformers

    bert = transformers.BertConfig.from_pretrained(str(folder))
    config = transformers.ModernBertConfig(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size * 2 // 3,  # GeGLU: 3 matrices, about BERT's parameter count
        pad_token_id=0,
        reference_compile=False,  # no torch.compile on CPU (it needs triton): both run eagerly
    )
    model = transformers.ModernBertModel(config)
    with torch.no_grad():  # as roberta_like: non-trivial norms, so mask gradients are not rounding noise
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


def deberta_v3_base_like(out: Path) -> Path:
    """A random DebertaV2Model of microsoft/deberta-v3-base's shape and options, saved to `out`."""
    import transformers

    config = transformers.DebertaV2Config(
        vocab_size=128100,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type="p2c|c2p",
        layer_norm_eps=1e-7,
        position_biased_input=False,
        type_vocab_size=0,
    )
    model = transformers.DebertaV2Model(config)
    with torch.no_grad():  # as roberta_like: non-trivial norms, so mask gradients are not rounding noise
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


def race(contenders: dict, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(median wall seconds, median process-CPU seconds) per call of each contender, round-robin."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in contenders}


def parser(description: str) -> argparse.ArgumentParser:
    """The options every CPU benchmark of the encoder takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="folder, alias or cached hub id of a checkpoint (default minilm-l6)")
    return p


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", choices=["forward", "train", "masked"], action="append", help="run only these workloads")
    p.add_argument(
        "--family",
        choices=["bert", "roberta", "mpnet", "modernbert", "deberta-v2"],
        default="bert",
        help="roberta: a random RoBERTa of the model's shape; mpnet: all-mpnet-base-v2 (default model mpnet-base)",
    )
    args = p.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.model = args.model or ("mpnet-base" if args.family == "mpnet" else "minilm-l6")
    folder = resolve_model_dir(args.model)
    if args.family == "roberta":
        import tempfile

        folder = roberta_like(folder, Path(tempfile.mkdtemp(prefix="st-bench-roberta-")))
    if args.family == "modernbert":
        import tempfile

        folder = modernbert_like(folder, Path(tempfile.mkdtemp(prefix="st-bench-modernbert-")))
    if args.family == "deberta-v2":
        import tempfile

        folder = deberta_v3_base_like(Path(tempfile.mkdtemp(prefix="st-bench-deberta-")))
        args.model = "random, deberta-v3-base's shape"

    def hf_model(attn: str):
        return transformers.AutoModel.from_pretrained(str(folder), attn_implementation=attn)

    ours = load_pretrained(folder)
    fast = "eager" if args.family in ("mpnet", "deberta-v2") else "sdpa"  # HF's fastest attention for the family
    hf = {attn: hf_model(attn) for attn in dict.fromkeys((fast, "eager"))}
    c = ours.config
    L, H, B = c.num_layers, c.num_heads, args.batch
    ids, types, mask = make_inputs(B, args.seq, c.vocab_size, pad=c.pad_token_id)
    # HF's RoBERTa tokenizers pass no token types (ours ignores them for a one-type model)
    hf_types = types if c.type_vocab_size > 1 else None
    hf_in = {"input_ids": ids, "attention_mask": mask}  # ModernBertModel takes no token_type_ids at all
    hf_in.update({} if args.family == "modernbert" else {"token_type_ids": hf_types})
    real = mask.bool()
    weight = mask[..., None].float()  # the loss sees real tokens only: HF's outputs at padding are not zero

    def loss(out):  # B,T,D -> scalar
        return (out * weight).sum()

    print(
        f"{args.model} ({c.model_type}): L={L} D={c.hidden_size} H={H} | batch {B} x seq {args.seq}, "
        f"{real.float().mean():.0%} real tokens "
        f"| threads {torch.get_num_threads()} | torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

    # Same weights, same numbers: a benchmark of different computations would mean nothing.
    ours.eval(), hf[fast].eval()
    with torch.no_grad():
        diff = (ours(ids, types, mask) - hf[fast](**hf_in).last_hidden_state)[real]
    print(f"parity: max |ours - HF {fast}| on real tokens = {diff.abs().max():.1e}")

    rows = []  # (workload, contender, (wall, cpu), reference (wall, cpu) or None)
    workloads = args.only or ["forward", "train", "masked"]

    if "forward" in workloads:
        for m in (ours, *hf.values()):
            m.eval()

        def fwd(run):
            def f():
                with torch.no_grad():
                    run()

            return f

        contenders = {"ours": fwd(lambda: ours(ids, types, mask))}
        for attn in hf:  # eager for context, unless it is the reference
            contenders[f"HF {attn}"] = fwd(lambda m=hf[attn]: m(**hf_in))
        t = race(contenders, args.warmup, args.repeats)
        rows += [("forward", "ours", t["ours"], t[f"HF {fast}"])]
        rows += [("forward", name, t[name], None) for name in contenders if name != "ours"]

    if "train" in workloads:
        # Each model trains its own copy of the weights (a step moves them; parity was checked above).
        opt = {
            "ours": torch.optim.Adamax(ours.parameters(), lr=5e-5),
            f"HF {fast}": torch.optim.Adamax(hf[fast].parameters(), lr=5e-5),
        }
        ours.train(), hf[fast].train()

        def step(name, run):
            def f():
                opt[name].zero_grad(set_to_none=True)
                loss(run()).backward()
                opt[name].step()

            return f

        t = race(
            {
                "ours": step("ours", lambda: ours(ids, types, mask)),
                f"HF {fast}": step(
                    f"HF {fast}",
                    lambda: hf[fast](**hf_in).last_hidden_state,
                ),
            },
            args.warmup,
            args.repeats,
        )
        rows += [
            ("train step", "ours", t["ours"], t[f"HF {fast}"]),
            ("train step", f"HF {fast}", t[f"HF {fast}"], None),
        ]

    if "masked" in workloads:
        ours = load_pretrained(folder).eval()  # fresh weights: the training workload moved them
        frozen = load_pretrained(folder).eval().requires_grad_(False)
        hf_eager = hf_model("eager").eval()
        if args.family in NO_HEAD_MASK:  # the reference: HF's training step (HF's model takes no head mask)
            hf_train = hf_model(fast).train()
            hf_opt = torch.optim.Adamax(hf_train.parameters(), lr=5e-5)

        def ours_importance():  # what st.importance does per batch
            head_mask = torch.ones(B, L, H, requires_grad=True)
            ffn_mask = torch.ones(B, L, requires_grad=True)
            out = frozen(ids, types, mask, head_mask=head_mask, ffn_mask=ffn_mask)
            return torch.autograd.grad(loss(out), [head_mask, ffn_mask])[0]

        def ours_like_hf():
            head_mask = torch.ones(B, L, H, requires_grad=True)
            ours.zero_grad(set_to_none=True)
            loss(ours(ids, types, mask, head_mask=head_mask)).backward()
            return head_mask.grad

        def hf_masked():  # HF-based scoring: one L×H gradient for the batch, weights' gradients too
            head_mask = torch.ones(L, H, requires_grad=True)
            hf_eager.zero_grad(set_to_none=True)
            loss(
                hf_eager(
                    input_ids=ids, token_type_ids=hf_types, attention_mask=mask, head_mask=head_mask
                ).last_hidden_state
            ).backward()
            return head_mask.grad

        def hf_step():
            hf_opt.zero_grad(set_to_none=True)
            loss(hf_train(**hf_in).last_hidden_state).backward()
            hf_opt.step()

        if args.family in NO_HEAD_MASK:
            hf_masked, g_hf = hf_step, None
        else:
            g_hf = hf_masked()
        for name, g in (("frozen", ours_importance()), ("not frozen", ours_like_hf())) if g_hf is not None else ():
            rel = ((g.sum(0) - g_hf).abs().max() / g_hf.abs().max()).item()
            print(
                f"parity: head-mask gradient (ours {name}, summed over the batch) vs HF eager: max rel diff {rel:.1e}"
            )
        names = {"imp": "ours, as st.importance", "like": "ours, weights' grads too", "hf": "HF eager (L×H mask)"}
        if args.family in NO_HEAD_MASK:
            names["hf"] = f"HF {fast} train step"
        t = race(
            {names["imp"]: ours_importance, names["like"]: ours_like_hf, names["hf"]: hf_masked},
            args.warmup,
            args.repeats,
        )
        rows += [
            ("masked f+b", names["imp"], t[names["imp"]], t[names["hf"]]),
            ("masked f+b", names["like"], t[names["like"]], t[names["hf"]]),
            ("masked f+b", names["hf"], t[names["hf"]], None),
        ]

    print(f"load average at end:   {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print()
    print(
        f"{'workload':<11} {'model':<26} {'wall ms':>8} {'ex/s':>6} {'cpu ms':>8} {'HF/ours wall':>13} "
        f"{'cpu':>6} {'target':>7}"
    )
    missed = []
    for i, (workload, name, (wall, cpu), ref) in enumerate(rows):
        line = f"{workload:<11} {name:<26} {wall * 1e3:8.0f} {B / wall:6.1f} {cpu * 1e3:8.0f}"
        if ref is not None:
            ratio, cpu_ratio = ref[0] / wall, ref[1] / cpu
            line += f" {ratio:12.2f}x {cpu_ratio:5.2f}x"
            if i == next(j for j, r in enumerate(rows) if r[0] == workload):  # the first row carries the target
                ok = ratio >= TARGETS[workload]
                line += f" {TARGETS[workload]:6.2f}x {'ok' if ok else 'MISSED'}"
                if not ok:
                    missed.append(workload)
        print(line)
    print()
    print("all targets met (wall-clock medians)" if not missed else f"missed (wall-clock medians): {', '.join(missed)}")


if __name__ == "__main__":
    main()
