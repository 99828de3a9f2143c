"""bf16 on CPU: our encoder in bf16 against our own fp32 and against transformers' BertModel under
CPU bf16 autocast, same weights (the packaged MiniLM-L6) and inputs, one run.

  python bench/bench_precision.py [--batch 32] [--seq 128] [--repeats 4] [--warmup 1] [--threads 2]

Three workloads, timed round-robin after a warm-up (medians; see bench_encoder.py):
  forward     eval, no_grad
  train step  train mode (dropout on): forward, loss = sum over real tokens, backward, Adamax step on
              fp32 weights. Ours in bf16 is what st.train.TrainingStep does: the bf16 compute copy
              (st.precision) runs forward and backward, its gradients go into the fp32 masters, the
              step updates them and they are cast back into the copy. HF: autocast over fp32 weights.
  importance  eval, forward + backward for head-mask gradients: ours as st.importance runs it
              (per-example B×L×H head and B×L FFN masks in fp32, frozen weights); HF eager with an
              L×H head mask under autocast (HF drops to eager attention whenever head_mask is given).
Targets (issue "Mixed precision that is real"): bf16 over our fp32 >= 2.0 / 1.6 / 1.6, bf16 over HF
under bf16 autocast >= 1.3 on each workload.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_encoder import make_inputs, parser, race  # noqa: E402

from st.models import load_pretrained, resolve_model_dir  # noqa: E402
from st.precision import accumulate_grads, compute_copy, has_amx, sync_weights  # noqa: E402

TARGETS = {"forward": (2.0, 1.3), "train step": (1.6, 1.3), "importance": (1.6, 1.3)}  # (vs our fp32, vs HF)


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = resolve_model_dir(args.model)
    fp32 = load_pretrained(folder)
    c = fp32.config
    L, H, B = c.num_layers, c.num_heads, args.batch
    ids, types, mask = make_inputs(B, args.seq, c.vocab_size, pad=c.pad_token_id)
    weight = mask[..., None].float()

    def loss(out):  # B,T,D -> scalar, fp32
        return (out.float() * weight).sum()

    def hf(attn: str):
        return transformers.AutoModel.from_pretrained(str(folder), attn_implementation=attn)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    cpu = "AMX-BF16: yes" if has_amx() else "AMX-BF16: no (bf16 GEMMs are emulated: expect no gain)"
    print(f"{args.model}: L={L} D={c.hidden_size} H={H} | batch {B} x seq {args.seq} | threads {args.threads} | {cpu}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; load {os.getloadavg()[0]:.1f}")
    results = {}

    # ---- forward ----
    bf16 = compute_copy(fp32.eval(), "bf16")
    hf_sdpa = hf("sdpa").eval()
    with torch.no_grad(), autocast():
        ref = hf_sdpa(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        diff = (bf16(ids, types, mask).float() - ref.float())[mask.bool()].abs().max().item()
    print(f"parity: max |ours bf16 - HF bf16 autocast| on real tokens = {diff:.1e} (bf16 rounding)")

    def no_grad(fn):
        def f():
            with torch.no_grad():
                fn()

        return f

    def hf_forward():
        with autocast():
            hf_sdpa(input_ids=ids, token_type_ids=types, attention_mask=mask)

    results["forward"] = race(
        {
            "fp32": no_grad(lambda: fp32(ids, types, mask)),
            "bf16": no_grad(lambda: bf16(ids, types, mask)),
            "HF": no_grad(hf_forward),
        },
        args.warmup,
        args.repeats,
    )

    # ---- training step ----
    fp32.train(), hf_sdpa.train()
    master = load_pretrained(folder).train()
    bf16 = compute_copy(master, "bf16")
    opt = {
        name: torch.optim.Adamax(m.parameters(), lr=5e-5)
        for name, m in (("fp32", fp32), ("bf16", master), ("HF", hf_sdpa))
    }

    def step_fp32():
        loss(fp32(ids, types, mask)).backward()
        opt["fp32"].step(), opt["fp32"].zero_grad(set_to_none=True)

    def step_bf16():  # st.train.TrainingStep's precision path
        loss(bf16(ids, types, mask)).backward()
        accumulate_grads(master, bf16)
        opt["bf16"].step(), opt["bf16"].zero_grad(set_to_none=True)
        sync_weights(master, bf16)

    def step_hf():
        with autocast():
            out = hf_sdpa(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        loss(out).backward()
        opt["HF"].step(), opt["HF"].zero_grad(set_to_none=True)

    results["train step"] = race({"fp32": step_fp32, "bf16": step_bf16, "HF": step_hf}, args.warmup, args.repeats)

    # ---- importance pass ----
    frozen32 = load_pretrained(folder).eval().requires_grad_(False)
    frozen16 = compute_copy(frozen32, "bf16")
    hf_eager = hf("eager").eval()

    def importance(model):
        def f():
            head_mask = torch.ones(B, L, H, requires_grad=True)
            ffn_mask = torch.ones(B, L, requires_grad=True)
            torch.autograd.grad(loss(model(ids, types, mask, head_mask=head_mask, ffn_mask=ffn_mask)), [head_mask])

        return f

    def importance_hf():
        head_mask = torch.ones(L, H, requires_grad=True)
        hf_eager.zero_grad(set_to_none=True)
        with autocast():
            out = hf_eager(input_ids=ids, token_type_ids=types, attention_mask=mask, head_mask=head_mask)
        loss(out.last_hidden_state).backward()

    results["importance"] = race(
        {"fp32": importance(frozen32), "bf16": importance(frozen16), "HF": importance_hf}, args.warmup, args.repeats
    )

    print()
    print(f"{'workload':<11} {'fp32 ms':>8} {'bf16 ms':>8} {'HF ms':>8} {'fp32/bf16':>10} {'HF/bf16':>8}  targets")
    missed = []
    for name, t in results.items():
        vs_fp32, vs_hf = t["fp32"][0] / t["bf16"][0], t["HF"][0] / t["bf16"][0]
        want = TARGETS[name]
        ok = vs_fp32 >= want[0] and vs_hf >= want[1]
        missed += [] if ok else [name]
        print(
            f"{name:<11} {t['fp32'][0] * 1e3:8.0f} {t['bf16'][0] * 1e3:8.0f} {t['HF'][0] * 1e3:8.0f} "
            f"{vs_fp32:9.2f}x {vs_hf:7.2f}x  >= {want[0]}x, >= {want[1]}x {'ok' if ok else 'MISSED'}"
        )
    print(
        f"load at end {os.getloadavg()[0]:.1f}; "
        + ("all targets met" if not missed else f"missed: {', '.join(missed)}")
    )


if __name__ == "__main__":
    main()
