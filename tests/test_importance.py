"""Importance scores: equal to per-example gradients computed independently, normalised, all-reduced."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from st.errors import UserError
from st.importance import Scores, compute_importance, fingerprint, per_example_loss, plot_heatmap
from st.models.bert import Bert, BertConfig
from st.models.heads import BertClassifier
from st.tickets import make_ticket
from tests.conftest import free_port

L, H0, D, F0, V = 3, 4, 16, 32, 50


def tiny_config(**overrides) -> BertConfig:
    # A larger init scale than BERT's 0.02 so every head and FFN gets a clearly non-zero gradient.
    fields = dict(
        vocab_size=V,
        hidden_size=D,
        num_layers=L,
        num_heads=H0,
        intermediate_size=F0,
        max_position_embeddings=32,
        initializer_range=0.2,
        hidden_dropout=0.1,
        attention_dropout=0.1,
    )
    return BertConfig(**{**fields, **overrides})


def tiny_model(num_labels: int = 3, seed: int = 0, **overrides) -> BertClassifier:
    torch.manual_seed(seed)
    return BertClassifier(Bert(tiny_config(**overrides)), num_labels, head_dropout=0.1)


def make_batches(n_batches: int = 4, B: int = 4, T: int = 9, num_labels: int = 3, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, V, (B, T), generator=g)
        lengths = torch.randint(3, T + 1, (B,), generator=g)
        attn = (torch.arange(T)[None, :] < lengths[:, None]).long()  # some rows padded
        ids = ids * attn
        types = torch.randint(0, 2, (B, T), generator=g) * attn
        if num_labels == 1:
            labels = torch.randn(B, generator=g)
        else:
            labels = torch.randint(0, num_labels, (B,), generator=g)
        out.append({"input_ids": ids, "token_type_ids": types, "attention_mask": attn, "labels": labels})
    return out


def reference_scores(model: BertClassifier, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """One example at a time, an unbatched (L, H0) mask, |grad| averaged: the definition, slowly."""
    model.eval()
    head, ffn, n = torch.zeros(L, H0, dtype=torch.float64), torch.zeros(L, dtype=torch.float64), 0
    for batch in batches:
        for b in range(batch["input_ids"].shape[0]):
            one = {k: v[b : b + 1] for k, v in batch.items()}
            hm = torch.ones(L, H0, requires_grad=True)
            fm = torch.ones(L, requires_grad=True)
            logits = model(one["input_ids"], one["token_type_ids"], one["attention_mask"], hm, fm)
            gh, gf = torch.autograd.grad(per_example_loss(logits, one["labels"]).sum(), [hm, fm])
            head += gh.abs().double()
            ffn += gf.abs().double()
            n += 1
    return head / n, ffn / n


def as_tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("num_labels", [3, 1])
def test_scores_equal_per_example_reference(num_labels):
    model = tiny_model(num_labels)
    batches = make_batches(num_labels=num_labels)
    scores = compute_importance(model, batches, per_example_loss)
    ref_head, ref_ffn = reference_scores(model, batches)
    assert scores.num_examples == 16
    assert torch.allclose(as_tensor(scores.head_raw), ref_head, rtol=1e-4, atol=1e-7)
    assert torch.allclose(as_tensor(scores.ffn_raw), ref_ffn, rtol=1e-4, atol=1e-7)
    assert (ref_head > 0).all() and (ref_ffn > 0).all()  # the check has teeth


def test_batched_mask_gradient_sums_to_unbatched_gradient():
    model = tiny_model().eval()
    batch = make_batches(1, B=5)[0]
    args = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    hm_b = torch.ones(5, L, H0, requires_grad=True)
    fm_b = torch.ones(5, L, requires_grad=True)
    gb_h, gb_f = torch.autograd.grad(per_example_loss(model(*args, hm_b, fm_b), batch["labels"]).sum(), [hm_b, fm_b])
    hm = torch.ones(L, H0, requires_grad=True)
    fm = torch.ones(L, requires_grad=True)
    g_h, g_f = torch.autograd.grad(per_example_loss(model(*args, hm, fm), batch["labels"]).sum(), [hm, fm])
    assert torch.allclose(gb_h.sum(0), g_h, rtol=1e-4, atol=1e-6)
    assert torch.allclose(gb_f.sum(0), g_f, rtol=1e-4, atol=1e-6)
    # ... while the per-example absolute values differ from the absolute batch gradient: why the batch dim exists
    assert not torch.allclose(gb_h.abs().sum(0), g_h.abs())


def test_finite_difference_one_head_and_one_ffn():
    model = tiny_model().double()
    batch = make_batches(1, B=1)[0]
    scores = compute_importance(model, [batch])
    args = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    model.eval()  # compute_importance restored train mode; the finite difference needs dropout off too

    def loss(hm, fm):
        with torch.no_grad():
            return per_example_loss(model(*args, hm, fm), batch["labels"]).item()

    eps = 1e-6
    ones_h, ones_f = torch.ones(L, H0, dtype=torch.float64), torch.ones(L, dtype=torch.float64)
    l, h = 1, 2
    up, down = ones_h.clone(), ones_h.clone()
    up[l, h], down[l, h] = 1 + eps, 1 - eps
    fd_head = abs(loss(up, ones_f) - loss(down, ones_f)) / (2 * eps)
    up_f, down_f = ones_f.clone(), ones_f.clone()
    up_f[l], down_f[l] = 1 + eps, 1 - eps
    fd_ffn = abs(loss(ones_h, up_f) - loss(ones_h, down_f)) / (2 * eps)
    assert scores.head_raw[l][h] == pytest.approx(fd_head, rel=1e-5)
    assert scores.ffn_raw[l] == pytest.approx(fd_ffn, rel=1e-5)


def test_eval_mode_used_and_model_state_restored():
    model = tiny_model()  # dropout 0.1 everywhere: train mode would make two runs differ
    model.train()
    model.pooler.dense.weight.requires_grad_(False)
    batches = make_batches(2)
    a = compute_importance(model, batches)
    b = compute_importance(model, batches)
    assert a == b
    assert model.training and all(m.training for m in model.modules())
    assert not model.pooler.dense.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "pooler.dense.weight")
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients accumulated


def test_max_examples_caps_the_count():
    model = tiny_model()
    batches = make_batches(3, B=4)
    capped = compute_importance(model, batches, max_examples=6)
    ref_head, _ = reference_scores(model, [batches[0], {k: v[:2] for k, v in batches[1].items()}])
    assert capped.num_examples == 6
    assert torch.allclose(as_tensor(capped.head_raw), ref_head, rtol=1e-4, atol=1e-7)


def test_pruned_model_refused_and_empty_data_refused():
    torch.manual_seed(0)
    pruned = BertClassifier(Bert(tiny_config(kept_heads=((0, 1), (0, 1, 2, 3), (3,)))), 3)
    with pytest.raises(UserError, match="score the full fine-tuned model"):
        compute_importance(pruned, make_batches(1))
    with pytest.raises(UserError, match="no examples"):
        compute_importance(tiny_model(), [])


def test_normalisation_per_layer():
    s = Scores([[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], [0.5, 0.2, 0.0], 7)
    assert s.head[0] == pytest.approx((0.6, 0.8, 0.0, 0.0))
    assert s.head[1] == pytest.approx((0.5, 0.5, 0.5, 0.5))
    assert s.head[2] == (0.0, 0.0, 0.0, 0.0)  # a zero row stays zero, not NaN
    assert s.ffn == s.ffn_raw == (0.5, 0.2, 0.0)
    real = compute_importance(tiny_model(), make_batches(2))
    for row in real.head:
        assert math.sqrt(sum(x * x for x in row)) == pytest.approx(1.0, abs=1e-12)


def test_scores_save_load_round_trip(tmp_path):
    scores = compute_importance(tiny_model(), make_batches(2))
    assert scores.model_fingerprint == fingerprint(tiny_config())
    path = tmp_path / "scores.json"
    scores.save(path)
    assert Scores.load(path) == scores
    d = json.loads(path.read_text())
    assert set(d) == {"num_examples", "model_fingerprint", "precision", "head", "ffn", "head_raw", "ffn_raw"}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("head_raw"),
        lambda d: d.__setitem__("ffn_raw", [1.0]),
        lambda d: d.__setitem__("head_raw", [[1.0, 2.0], [1.0], [1.0, 2.0]]),
        lambda d: d.__setitem__("head_raw", "nope"),
        lambda d: d["head_raw"][0].__setitem__(0, -1.0),
        lambda d: d.__setitem__("num_examples", 0),
        lambda d: d["model_fingerprint"].__setitem__("num_heads", 7),
    ],
)
def test_malformed_scores_file(tmp_path, mutate):
    d = Scores([[1.0, 2.0]] * 3, [1.0, 2.0, 3.0], 4, {"num_layers": 3, "num_heads": 2}).to_json()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(UserError, match="bad.json"):
        Scores.load(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        Scores.load(path)


def test_scores_refused_for_another_model():
    scores = Scores([[1.0] * H0] * L, [1.0] * L, 1, fingerprint(tiny_config()))
    scores.check_matches(tiny_config())
    with pytest.raises(UserError, match="hidden_size"):
        scores.check_matches(tiny_config(hidden_size=32, intermediate_size=F0))
    with pytest.raises(UserError, match="3×4"):
        scores.check_matches(tiny_config(num_layers=2))


def test_plot_heatmap_writes_png(tmp_path):
    scores = compute_importance(tiny_model(), make_batches(1))
    path = tmp_path / "plots" / "heads.png"
    plot_heatmap(scores, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["heads.png"]  # no temporary file left behind


# ---- two processes (gloo): every rank derives the same ticket as one process over all the data ----


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as td

    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model()
        mine = make_batches(6)[rank::world]  # each rank a different half of the data
        scores = compute_importance(model, mine)
        scores.save(f"{out}/scores{rank}.json")
        make_ticket(scores, 0.4).save(f"{out}/ticket{rank}.json")
    finally:
        td.destroy_process_group()


def test_two_process_gloo_gives_identical_tickets(tmp_path):
    from st.tickets import Ticket

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = compute_importance(tiny_model(), make_batches(6))
    s0, s1 = Scores.load(tmp_path / "scores0.json"), Scores.load(tmp_path / "scores1.json")
    assert s0 == s1  # bit-identical on both ranks
    assert s0.num_examples == single.num_examples == 24
    assert torch.allclose(as_tensor(s0.head_raw), as_tensor(single.head_raw), rtol=1e-5)
    assert torch.allclose(as_tensor(s0.ffn_raw), as_tensor(single.ffn_raw), rtol=1e-5)
    t0, t1 = Ticket.load(tmp_path / "ticket0.json"), Ticket.load(tmp_path / "ticket1.json")
    assert t0 == t1 == make_ticket(single, 0.4)


@pytest.mark.parametrize("scale", [1e-170, 1e-300, 1e170])
def test_the_ticket_does_not_depend_on_the_scores_scale(scale):
    """Per-layer normalisation is scale-free: squares of 1e-170 underflow, of 1e170 overflow, yet the
    normalised scores and the ticket are those of the unscaled scores."""
    g = torch.Generator().manual_seed(5)
    head, ffn = torch.rand(6, 4, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    fp = {"num_layers": 6, "num_heads": 4}
    plain, scaled = Scores(head, ffn, 10, fp), Scores(head * scale, ffn * scale, 10, fp)
    for a, b in zip(plain.head, scaled.head):
        assert a == pytest.approx(b, rel=1e-12)
    for ratio in (0.2, 0.5):
        assert make_ticket(plain, ratio, "winning").head_mask == make_ticket(scaled, ratio, "winning").head_mask
