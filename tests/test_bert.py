"""Behaviour of the encoder and its masks on tiny random configs (no files, no transformers)."""

from __future__ import annotations

import pytest
import torch

from st.models.bert import Bert, BertConfig

L, H0, DH, D, F0, V = 3, 4, 8, 32, 48, 60


def tiny_config(**overrides) -> BertConfig:
    fields = dict(
        vocab_size=V,
        hidden_size=D,
        num_layers=L,
        num_heads=H0,
        intermediate_size=F0,
        max_position_embeddings=64,
        # Random weights at BERT's 0.02 give near-constant outputs; a larger scale makes every
        # head and FFN block matter, so "changes nothing" checks have teeth.
        initializer_range=0.2,
    )
    return BertConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Bert:
    torch.manual_seed(seed)
    return Bert(tiny_config(**overrides)).eval()


def random_batch(B: int = 3, T: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    types = torch.randint(0, 2, (B, T), generator=g)
    return ids, types


def assert_close(a, b, tol=1e-5):
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"


# ---- masks that change nothing ----------------------------------------------------------------


def test_all_ones_masks_change_nothing():
    model = tiny_model()
    ids, types = random_batch()
    with torch.no_grad():
        plain = model(ids, types)
        masked = model(ids, types, head_mask=torch.ones(L, H0), ffn_mask=torch.ones(L))
        batched = model(ids, types, head_mask=torch.ones(3, L, H0), ffn_mask=torch.ones(3, L))
    assert_close(masked, plain, 1e-6)
    assert_close(batched, plain, 1e-6)


def test_masks_matter():
    """Guards the tests below: with these weights a zero mask does change the output."""
    model = tiny_model()
    ids, types = random_batch()
    head_mask = torch.ones(L, H0)
    head_mask[1, 2] = 0
    ffn_mask = torch.ones(L)
    ffn_mask[0] = 0
    with torch.no_grad():
        plain = model(ids, types)
        assert (model(ids, types, head_mask=head_mask) - plain).abs().max() > 1e-2
        assert (model(ids, types, ffn_mask=ffn_mask) - plain).abs().max() > 1e-2


# ---- a zeroed mask equals deleting the weights ------------------------------------------------


def prune_heads_by_hand(full: Bert, kept: tuple[tuple[int, ...], ...]) -> Bert:
    """A model with only `kept` heads per layer, its weights copied row by row from `full`."""
    pruned = Bert(tiny_config(kept_heads=kept)).eval()
    state = dict(full.state_dict())
    for layer, heads in enumerate(kept):
        p = f"layers.{layer}.attention."
        # qkv rows: three blocks [Q heads | K heads | V heads], DH rows per head within each block.
        rows = [block * H0 * DH + h * DH + r for block in range(3) for h in heads for r in range(DH)]
        state[p + "qkv.weight"] = state[p + "qkv.weight"][rows]
        state[p + "qkv.bias"] = state[p + "qkv.bias"][rows]
        # out columns: DH columns per head, in head order.
        cols = [h * DH + r for h in heads for r in range(DH)]
        state[p + "out.weight"] = state[p + "out.weight"][:, cols]
    pruned.load_state_dict(state)
    return pruned


def test_zeroed_heads_equal_deleted_heads():
    full = tiny_model()
    kept = ((0, 2, 3), (1,), (0, 1, 2, 3))
    pruned = prune_heads_by_hand(full, kept)
    assert pruned.layers[0].attention.qkv.weight.shape == (3 * 3 * DH, D)
    assert pruned.layers[1].attention.out.weight.shape == (D, DH)
    zero_mask = torch.zeros(L, H0)
    for layer, heads in enumerate(kept):
        zero_mask[layer, list(heads)] = 1
    ids, types = random_batch()
    with torch.no_grad():
        assert_close(pruned(ids, types), full(ids, types, head_mask=zero_mask))
        # A full-size (L, H0) mask applies to the pruned model through the original head indices.
        soft = torch.rand(L, H0, generator=torch.Generator().manual_seed(3))
        assert_close(pruned(ids, types, head_mask=soft), full(ids, types, head_mask=soft * zero_mask))
        soft_b = torch.rand(3, L, H0, generator=torch.Generator().manual_seed(4))
        assert_close(pruned(ids, types, head_mask=soft_b), full(ids, types, head_mask=soft_b * zero_mask))


@pytest.mark.parametrize("layer", [0, L - 1])
def test_zeroed_ffn_equals_removed_ffn(layer):
    full = tiny_model()
    sizes = tuple(0 if i == layer else F0 for i in range(L))
    pruned = Bert(tiny_config(ffn_sizes=sizes)).eval()
    assert pruned.layers[layer].ffn is None
    state = {k: v for k, v in full.state_dict().items() if not k.startswith(f"layers.{layer}.ffn.")}
    pruned.load_state_dict(state)  # strict: the removed block has no parameters left
    ffn_mask = torch.ones(L)
    ffn_mask[layer] = 0
    ids, types = random_batch()
    with torch.no_grad():
        assert_close(pruned(ids, types), full(ids, types, ffn_mask=ffn_mask))
        # The mask entry of a removed block is ignored, the others still apply.
        other = torch.tensor([0.5, 0.0, 2.0])
        assert_close(pruned(ids, types, ffn_mask=other), full(ids, types, ffn_mask=other * ffn_mask))


# ---- padding --------------------------------------------------------------------------------


def test_padding_does_not_change_real_tokens():
    model = tiny_model()
    ids, types = random_batch(B=1, T=6)
    with torch.no_grad():
        alone = model(ids, types, attention_mask=torch.ones_like(ids))
        for pad in (1, 5, 20):
            padded_ids = torch.cat([ids, torch.zeros(1, pad, dtype=torch.long)], 1)
            padded_types = torch.cat([types, torch.zeros(1, pad, dtype=torch.long)], 1)
            mask = torch.cat([torch.ones(1, 6), torch.zeros(1, pad)], 1).long()
            out = model(padded_ids, padded_types, attention_mask=mask)
            assert_close(out[:, :6], alone)
            assert (out[:, 6:] == 0).all()  # padding is packed away: its outputs are zeros, not garbage


def test_batched_with_longer_sentences():
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    lengths = [4, 9, 2, 7]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, V, (n,), generator=g)
        types[b, n // 2 : n] = 1
        mask[b, :n] = 1
    head_mask = torch.rand(len(lengths), L, H0, generator=g)
    ffn_mask = torch.rand(len(lengths), L, generator=g)
    with torch.no_grad():
        batch = model(ids, types, attention_mask=mask, head_mask=head_mask, ffn_mask=ffn_mask)
        for b, n in enumerate(lengths):
            alone = model(ids[b : b + 1, :n], types[b : b + 1, :n], head_mask=head_mask[b], ffn_mask=ffn_mask[b])
            assert_close(batch[b : b + 1, :n], alone)


# ---- gradients w.r.t. the masks -------------------------------------------------------------


def padded_batch():
    ids, types = random_batch(B=4, T=8, seed=7)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    ids = ids * mask
    return ids, types * mask, mask


def test_per_example_mask_gradients_sum_to_the_unbatched_gradient():
    model = tiny_model()
    ids, types, mask = padded_batch()
    B = ids.shape[0]
    proj = torch.randn(D, generator=torch.Generator().manual_seed(8))

    def per_example_loss(out):  # B,T,D -> B: a loss that sees every real token
        return ((out @ proj) * mask).sum(1)

    head_b = torch.ones(B, L, H0, requires_grad=True)
    ffn_b = torch.ones(B, L, requires_grad=True)
    per_example_loss(model(ids, types, mask, head_b, ffn_b)).sum().backward()

    head_u = torch.ones(L, H0, requires_grad=True)
    ffn_u = torch.ones(L, requires_grad=True)
    per_example_loss(model(ids, types, mask, head_u, ffn_u)).sum().backward()

    assert head_b.grad.shape == (B, L, H0) and ffn_b.grad.shape == (B, L)
    assert_close(head_b.grad.sum(0), head_u.grad, 1e-4)
    assert_close(ffn_b.grad.sum(0), ffn_u.grad, 1e-4)

    # Row b of the batched gradient is example b's own gradient: nothing leaks across the batch.
    for b in range(B):
        n = int(mask[b].sum())
        h = torch.ones(L, H0, requires_grad=True)
        f = torch.ones(L, requires_grad=True)
        out = model(ids[b : b + 1, :n], types[b : b + 1, :n], None, h, f)
        (out @ proj).sum().backward()
        assert_close(head_b.grad[b], h.grad, 1e-4)
        assert_close(ffn_b.grad[b], f.grad, 1e-4)


def test_masks_are_differentiable():
    model = tiny_model()
    ids, types, mask = padded_batch()
    head = torch.ones(L, H0, requires_grad=True)
    ffn = torch.ones(L, requires_grad=True)
    model(ids, types, mask, head, ffn).pow(2).sum().backward()
    assert head.grad is not None and ffn.grad is not None
    assert (head.grad != 0).all(), head.grad
    assert (ffn.grad != 0).all(), ffn.grad


def test_batched_and_unbatched_masks_agree_when_rows_are_equal():
    model = tiny_model()
    ids, types, mask = padded_batch()
    g = torch.Generator().manual_seed(9)
    head = torch.rand(L, H0, generator=g)
    ffn = torch.rand(L, generator=g)
    B = ids.shape[0]
    with torch.no_grad():
        unbatched = model(ids, types, mask, head, ffn)
        batched = model(ids, types, mask, head.expand(B, L, H0), ffn.expand(B, L))
    assert_close(batched, unbatched, 1e-6)


def test_dropout_only_in_training():
    model = tiny_model(hidden_dropout=0.5, attention_dropout=0.5)
    ids, types = random_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, types), model(ids, types))
        model.train()
        assert not torch.equal(model(ids, types), model(ids, types))


# ---- config -------------------------------------------------------------------------------


def test_config_rejects_hidden_not_divisible_by_heads():
    with pytest.raises(ValueError, match="hidden_size 30 is not a multiple of num_heads 4"):
        tiny_config(hidden_size=30)


def test_config_rejects_per_layer_fields_of_wrong_length():
    with pytest.raises(ValueError, match="kept_heads has 2 entries for 3 layers"):
        tiny_config(kept_heads=((0,), (1,)))
    with pytest.raises(ValueError, match="ffn_sizes has 4 entries for 3 layers"):
        tiny_config(ffn_sizes=(F0,) * 4)


def test_config_dict_round_trip():
    c = tiny_config(kept_heads=((0, 2), (1,), (3,)), ffn_sizes=(F0, 0, 16))
    back = BertConfig.from_dict(c.to_dict())
    assert back == c
    model = Bert(back)
    assert model.layers[2].ffn.up.weight.shape == (16, D)
    assert model.layers[1].ffn is None
