"""Physical pruning equals masking; exports load back (ours and Hugging Face's) with the same outputs."""

import json

import pytest
import torch

from st.errors import UserError
from st.models import Bert, BertClassifier, BertConfig, load_checkpoint, load_pretrained, resolve_model_dir
from st.prune import config_for_masks, export, export_hf, hf_state, prune_classifier, prune_encoder

L, H, D, F = 3, 4, 16, 32
DH = D // H


def tiny_config(**kw) -> BertConfig:
    fields = dict(vocab_size=50, hidden_size=D, num_layers=L, num_heads=H, intermediate_size=F, max_position_embeddings=32)
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
        torch.testing.assert_close(pruned(**x), model(**x, head_mask=head.double(), ffn_mask=ffn.double()), atol=1e-12, rtol=0)


def test_export_round_trip(tmp_path):
    model = tiny_classifier(4)
    head, ffn = random_masks(4)
    written = export(model, tmp_path / "ckpt", head_mask=head, ffn_mask=ffn, task="rte", ratio=0.3)
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
    export(written, tmp_path / "again")
    assert load_checkpoint(tmp_path / "again")[0].encoder.config == written.encoder.config


def _load_hf(folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.BertForSequenceClassification.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return hf.eval()


def test_export_hf_matches_ours_on_real_minilm(tmp_path, monkeypatch):
    folder = resolve_model_dir("minilm-l6")
    torch.manual_seed(0)
    model = BertClassifier(load_pretrained(folder), num_labels=3).eval()
    c = model.encoder.config
    head, ffn = random_masks(11, layers=c.num_layers, heads=c.num_heads, p_head=0.4, n_ffn_removed=2)
    assert (head == 0).any() and int((ffn == 0).sum()) == 2
    pruned = export_hf(model, tmp_path / "hf", ["no", "maybe", "yes"], head_mask=head, ffn_mask=ffn, tokenizer_from=folder)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["pruned_heads"] == {
        str(i): [h for h in range(c.num_heads) if head[i, h] == 0] for i in range(c.num_layers) if (head[i] == 0).any()
    }
    assert (tmp_path / "hf" / "vocab.txt").exists()
    hf = _load_hf(tmp_path / "hf", monkeypatch)
    assert hf.config.id2label == {0: "no", 1: "maybe", 2: "yes"} and hf.num_labels == 3
    x = batch(vocab=c.vocab_size, B=4, T=12, seed=5)
    with torch.no_grad():
        ours, ours_hidden = pruned(**x), pruned.encoder(**x)
        out = hf(**x, output_hidden_states=True)
        dense = model(**x, head_mask=head, ffn_mask=ffn)
    torch.testing.assert_close(out.logits, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=0)
    real = x["attention_mask"].bool()  # padded positions are not compared
    torch.testing.assert_close(out.hidden_states[-1][real], ours_hidden[real], atol=1e-5, rtol=1e-5)


def test_export_hf_regression_and_unsorted_kept_heads(tmp_path, monkeypatch):
    model = tiny_classifier(5, num_labels=1)
    head, ffn = random_masks(5, p_head=0.3)
    pruned = prune_classifier(model, head, ffn)
    # The same model with each layer's heads stored in reverse order: HF's order must still come out.
    c = pruned.encoder.config
    reversed_config = BertConfig.from_dict({**c.to_dict(), "kept_heads": tuple(k[::-1] for k in c.kept_heads)})
    shuffled = BertClassifier(Bert(reversed_config), 1).eval()
    state = pruned.state_dict()
    for i, kept in enumerate(c.kept_heads):
        n = len(kept)
        rows = (torch.arange(n - 1, -1, -1)[:, None] * DH + torch.arange(DH)).reshape(-1)
        p = f"encoder.layers.{i}.attention."
        w, b = state[p + "qkv.weight"], state[p + "qkv.bias"]
        state[p + "qkv.weight"] = torch.cat([blk[rows] for blk in w.chunk(3)])
        state[p + "qkv.bias"] = torch.cat([blk[rows] for blk in b.chunk(3)])
        state[p + "out.weight"] = state[p + "out.weight"][:, rows]
    shuffled.load_state_dict(state)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(shuffled(**x), pruned(**x), atol=1e-5, rtol=0)
    a, b = hf_state(pruned), hf_state(shuffled)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    export_hf(shuffled, tmp_path / "hf")
    hf = _load_hf(tmp_path / "hf", monkeypatch)
    assert hf.config.problem_type == "regression" and hf.num_labels == 1
    with torch.no_grad():
        torch.testing.assert_close(hf(**x).logits, model(**x, head_mask=head, ffn_mask=ffn), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="id2label"):
        export_hf(pruned, tmp_path / "bad", ["a", "b"])
    assert not (tmp_path / "bad" / "config.json").exists()
