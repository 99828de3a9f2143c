"""Physical pruning equals masking; our own export loads back with the same outputs (HF and ONNX: test_export.py)."""

import pytest
import torch

from st.errors import UserError
from st.export import export_st
from st.models import Bert, BertClassifier, BertConfig, load_checkpoint, load_pretrained
from st.prune import apply_masks, config_for_masks, prune_classifier, prune_encoder

L, H, D, F = 3, 4, 16, 32
DH = D // H


def tiny_config(**kw) -> BertConfig:
    fields = dict(
        vocab_size=50, hidden_size=D, num_layers=L, num_heads=H, intermediate_size=F, max_position_embeddings=32
    )
    return BertConfig(**{**fields, **kw})


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Large random weights and biases everywhere, so a wrong slice or a lost bias shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def tiny_classifier(seed=0, num_labels=3) -> BertClassifier:
    torch.manual_seed(seed)
    return randomise(BertClassifier(Bert(tiny_config()), num_labels), seed)


def batch(vocab=50, B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, 4:] = 0  # padding in the batch
    attention[2, 6:] = 0
    ids[attention == 0] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 3:] = 1
    return dict(input_ids=ids, token_type_ids=types, attention_mask=attention)


def random_masks(seed, layers=L, heads=H, p_head=0.5, n_ffn_removed=1):
    g = torch.Generator().manual_seed(seed)
    head = (torch.rand(layers, heads, generator=g) > p_head).float()
    for i in range(layers):  # at least one head per layer, as tickets guarantee
        if head[i].sum() == 0:
            head[i, torch.randint(heads, (1,), generator=g)] = 1.0
    ffn = torch.ones(layers)
    ffn[torch.randperm(layers, generator=g)[:n_ffn_removed]] = 0.0
    return head, ffn


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("seed", range(5))
def test_pruned_model_equals_masked_dense_model(seed):
    model = tiny_classifier(seed)
    head, ffn = random_masks(seed, n_ffn_removed=seed % 3)
    x = batch(seed=seed)
    pruned = prune_classifier(model, head, ffn)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x), model(**x, head_mask=head, ffn_mask=ffn), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            pruned.encoder(**x), model.encoder(**x, head_mask=head, ffn_mask=ffn), atol=1e-5, rtol=0
        )
        # A full-size mask applies to the pruned model unchanged (it picks its surviving heads' entries).
        torch.testing.assert_close(pruned(**x, head_mask=head, ffn_mask=ffn), pruned(**x), atol=0, rtol=0)
    removed_heads, removed_ffn = int((head == 0).sum()), int((ffn == 0).sum())
    per_head = 3 * (D * DH + DH) + D * DH  # Q, K, V rows and biases; out-projection columns (its bias stays)
    per_ffn = D * F + F + F * D + D
    assert n_params(model) - n_params(pruned) == removed_heads * per_head + removed_ffn * per_ffn
    for i, layer in enumerate(pruned.encoder.layers):
        assert layer.attention.n_heads == int(head[i].sum())
        assert (layer.ffn is None) == (ffn[i] == 0)
        assert layer.ffn_norm is not None


def test_zeroed_head_equals_deleting_its_weights():
    model = tiny_classifier(7).encoder
    head, ffn = torch.ones(L, H), torch.ones(L)
    head[1, 2] = 0.0
    pruned = prune_encoder(model, head, ffn)
    assert pruned.config.kept_heads == ((0, 1, 2, 3), (0, 1, 3), (0, 1, 2, 3))
    old, new = model.layers[1].attention, pruned.layers[1].attention
    keep = torch.tensor([0, 1, 3])
    rows = (keep[:, None] * DH + torch.arange(DH)).reshape(-1)
    for b in range(3):  # Q, K and V blocks each lose head 2's rows
        assert torch.equal(new.qkv.weight[b * 3 * DH : (b + 1) * 3 * DH], old.qkv.weight[b * H * DH + rows])
        assert torch.equal(new.qkv.bias[b * 3 * DH : (b + 1) * 3 * DH], old.qkv.bias[b * H * DH + rows])
    assert torch.equal(new.out.weight, old.out.weight[:, rows])
    assert torch.equal(new.out.bias, old.out.bias)  # a zeroed head still adds the projection's bias
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x), model(**x, head_mask=head), atol=1e-5, rtol=0)


def test_all_ones_mask_changes_nothing():
    model = tiny_classifier(1)
    pruned = prune_classifier(model, torch.ones(L, H), torch.ones(L))
    assert pruned.encoder.config == model.encoder.config
    assert pruned is not model
    for (k, a), (k2, b) in zip(model.state_dict().items(), pruned.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_pruning_twice_equals_pruning_once_with_the_combined_mask():
    model = tiny_classifier(3)
    h1 = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]]).float()
    f1 = torch.tensor([1.0, 0.0, 1.0])
    h2 = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]]).float()  # head 3 of layer 0 is gone already
    f2 = torch.tensor([1.0, 1.0, 0.0])  # ...and so is FFN 1
    twice = prune_classifier(prune_classifier(model, h1, f1), h2, f2)
    once = prune_classifier(model, h1 * h2, f1 * f2)
    assert twice.encoder.config == once.encoder.config
    assert once.encoder.config.kept_heads == ((1, 2), (0,), (1, 3))
    assert once.encoder.config.ffn_sizes == (F, 0, 0)
    assert twice.state_dict().keys() == once.state_dict().keys()
    for k, v in once.state_dict().items():
        assert torch.equal(twice.state_dict()[k], v), k
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(twice(**x), model(**x, head_mask=h1 * h2, ffn_mask=f1 * f2), atol=1e-5, rtol=0)


def test_config_for_masks_on_a_pruned_config():
    config = tiny_config(kept_heads=((0, 2), (1, 2, 3), (3,)), ffn_sizes=(F, 0, F))
    ones = torch.ones(L, H)
    assert config_for_masks(config, ones, torch.ones(L)) == config  # gone stays gone, even under a 1
    head = ones.clone()
    head[0, 2] = head[1, 0] = 0  # head 0 of layer 1 is gone already: masking it changes nothing
    new = config_for_masks(config, head, torch.tensor([0.0, 1.0, 1.0]))
    assert new.kept_heads == ((0,), (1, 2, 3), (3,))
    assert new.ffn_sizes == (0, 0, F)
    head = ones.clone()
    head[2, 3] = 0  # the last surviving head of layer 2
    with pytest.raises(UserError, match="at least one head"):
        config_for_masks(config, head, torch.ones(L))
    # Nothing pruned is written as None fields.
    assert config_for_masks(tiny_config(), ones, torch.ones(L)) == tiny_config()


def test_bad_masks_are_refused_with_a_message():
    model = tiny_classifier(0)
    with pytest.raises(UserError, match=r"\(2, 4\).*\(3, 4\)"):
        prune_classifier(model, torch.ones(2, H), torch.ones(L))
    with pytest.raises(UserError, match=r"ffn_mask.*\(4,\).*\(3,\)"):
        prune_classifier(model, torch.ones(L, H), torch.ones(4))
    head = torch.ones(L, H)
    head[1] = 0
    with pytest.raises(UserError, match="layer 1.*at least one head"):
        prune_classifier(model, head, torch.ones(L))
    with pytest.raises(UserError, match="0 and 1"):
        prune_classifier(model, torch.full((L, H), 0.5), torch.ones(L))
    assert issubclass(UserError, ValueError)


def test_dtype_and_mode_are_kept_and_the_source_is_untouched():
    model = tiny_classifier(2).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head, ffn = random_masks(2)
    pruned = prune_classifier(model, head, ffn)
    assert all(p.dtype == torch.float64 for p in pruned.parameters())
    assert not pruned.training
    assert prune_classifier(model.train(), head, ffn).training
    model.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    x = batch()
    with torch.no_grad():  # in float64 the two paths agree to rounding
        torch.testing.assert_close(
            pruned(**x), model(**x, head_mask=head.double(), ffn_mask=ffn.double()), atol=1e-12, rtol=0
        )


def test_export_round_trip(tmp_path):
    model = tiny_classifier(4)
    head, ffn = random_masks(4)
    written = export_st(model, tmp_path / "ckpt", head_mask=head, ffn_mask=ffn, task="rte", ratio=0.3)
    loaded, cfg = load_checkpoint(tmp_path / "ckpt")
    assert cfg["task"] == "rte" and cfg["ratio"] == 0.3
    assert loaded.encoder.config == written.encoder.config == config_for_masks(model.encoder.config, head, ffn)
    encoder = load_pretrained(tmp_path / "ckpt")
    assert encoder.config == written.encoder.config
    x = batch()
    loaded.eval(), encoder.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**x), written(**x))
        assert torch.equal(encoder(**x), written.encoder(**x))
        torch.testing.assert_close(loaded(**x), model(**x, head_mask=head, ffn_mask=ffn), atol=1e-5, rtol=0)
    # An already pruned model exports as it is.
    export_st(written, tmp_path / "again")
    assert load_checkpoint(tmp_path / "again")[0].encoder.config == written.encoder.config


def test_apply_masks_without_masks_is_the_model_and_a_missing_mask_keeps_everything():
    model = tiny_classifier(6)
    assert apply_masks(model) is model
    head = torch.ones(L, H)
    head[0, 1] = 0
    only_heads = apply_masks(model, head_mask=head)
    assert only_heads.encoder.config.kept_heads[0] == (0, 2, 3) and only_heads.encoder.config.ffn_sizes is None
    only_ffn = apply_masks(model, ffn_mask=torch.tensor([1.0, 0.0, 1.0]))
    assert only_ffn.encoder.config.kept_heads is None and only_ffn.encoder.config.ffn_sizes == (F, 0, F)
