"""Weight loading: parity with transformers.BertModel on the real packaged MiniLM, checkpoint
layouts seen in the wild, and one clear UserError per kind of bad input."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never touch the network

import pytest
import torch
from safetensors.torch import load_file, save_file

from st.errors import UserError
from st.models import (
    Bert,
    BertClassifier,
    BertConfig,
    load_checkpoint,
    load_pretrained,
    load_pretrained_parts,
    resolve_model_dir,
    save_checkpoint,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def max_diff_on_real_tokens(ours, theirs, attention_mask) -> float:
    real = attention_mask.bool()
    return (ours[real] - theirs[real]).abs().max().item()


# ---- the real packaged model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    folder = resolve_model_dir("minilm-l6")
    ours = load_pretrained("minilm-l6").eval()
    tok = transformers.BertTokenizerFast.from_pretrained(str(folder))
    pairs = [
        ("A man is playing a guitar.", "Someone plays an instrument on a stage in front of a large crowd."),
        ("The cat sat.", "No."),
        (
            "Super tickets win.",
            "Pruning heads and feed-forward blocks of BERT before fine-tuning improves generalisation.",
        ),
    ]
    batch = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any() and (batch["token_type_ids"] == 1).any()
    return folder, ours, batch


def hf_model(folder, attn: str):
    return transformers.BertModel.from_pretrained(str(folder), attn_implementation=attn).eval()


def test_minilm_config_is_read(minilm):
    _, ours, _ = minilm
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size, c.vocab_size) == (6, 384, 12, 1536, 30522)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_minilm_matches_hf(minilm, attn):
    folder, ours, batch = minilm
    ref = hf_model(folder, attn)
    with torch.no_grad():
        theirs = ref(**batch).last_hidden_state
        mine = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert max_diff_on_real_tokens(mine, theirs, batch["attention_mask"]) <= 1e-5


def test_minilm_head_mask_matches_hf_eager(minilm):
    folder, ours, batch = minilm
    ref = hf_model(folder, "eager")
    L, H = 6, 12
    g = torch.Generator().manual_seed(0)
    head_mask = (torch.rand(L, H, generator=g) > 0.4).float()
    head_mask[:, 0] = 1  # keep a head per layer, as a ticket does
    assert (head_mask == 0).any()
    with torch.no_grad():
        theirs = ref(**batch, head_mask=head_mask).last_hidden_state
        mine = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], head_mask=head_mask)
        unmasked = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert max_diff_on_real_tokens(mine, theirs, batch["attention_mask"]) <= 1e-5
    assert max_diff_on_real_tokens(mine, unmasked, batch["attention_mask"]) > 1e-2

    # Per-example masks: HF takes them as (L, B, H, 1, 1).
    B = batch["input_ids"].shape[0]
    per_example = (torch.rand(B, L, H, generator=g) > 0.3).float()
    with torch.no_grad():
        theirs = ref(**batch, head_mask=per_example.permute(1, 0, 2)[..., None, None]).last_hidden_state
        mine = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], head_mask=per_example)
    assert max_diff_on_real_tokens(mine, theirs, batch["attention_mask"]) <= 1e-5


def test_minilm_head_mask_gradient_matches_hf_eager(minilm):
    """The importance score is this gradient: it must be HF's (Michel et al.'s) number."""
    folder, ours, batch = minilm
    ref = hf_model(folder, "eager")
    real = batch["attention_mask"].bool()
    proj = torch.randn(384, generator=torch.Generator().manual_seed(1))

    theirs_mask = torch.ones(6, 12, requires_grad=True)
    (ref(**batch, head_mask=theirs_mask).last_hidden_state[real] @ proj).sum().backward()
    mine_mask = torch.ones(6, 12, requires_grad=True)
    (
        ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], head_mask=mine_mask)[real] @ proj
    ).sum().backward()
    scale = theirs_mask.grad.abs().max()
    assert ((mine_mask.grad - theirs_mask.grad).abs().max() / scale).item() <= 1e-4


# ---- tiny HF checkpoints in the layouts seen in the wild ----------------------------------------


def tiny_hf_config(**overrides):
    fields = dict(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        initializer_range=0.2,  # so that every weight visibly matters
    )
    return transformers.BertConfig(**{**fields, **overrides})


def tiny_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 60, (3, 9), generator=g)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids * mask, types * mask, mask


def assert_same_as_hf(folder, ref_encoder):
    """Our encoder loaded from `folder` computes what `ref_encoder` (an HF BertModel) computes."""
    ours = load_pretrained(folder).eval()
    ids, types, mask = tiny_batch()
    with torch.no_grad():
        theirs = ref_encoder.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        mine = ours(ids, types, mask)
    assert max_diff_on_real_tokens(mine, theirs, mask) <= 1e-5


def write_hf_folder(folder, config, state: dict, filename="model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(folder / "config.json"))
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if filename == "model.safetensors":
        save_file(state, str(folder / filename))
    else:
        torch.save(state, folder / filename)
    return folder


@pytest.fixture
def tiny_hf(tmp_path):
    """(folder, HF BertModel, raw state) of a plain tiny BertModel checkpoint with a pooler."""
    torch.manual_seed(0)
    config = tiny_hf_config()
    model = transformers.BertModel(config)
    state = model.state_dict()
    return write_hf_folder(tmp_path / "tiny", config, state), model, dict(state)


def test_plain_hf_checkpoint(tiny_hf):
    folder, ref, _ = tiny_hf
    assert_same_as_hf(folder, ref)
    config, _, pooler, where = load_pretrained_parts(folder)
    assert where == folder and config.num_layers == 2
    assert torch.equal(pooler["dense.weight"], ref.pooler.dense.weight)


def test_pretraining_checkpoint_with_bert_prefix_and_cls_heads(tmp_path):
    torch.manual_seed(1)
    pretraining = transformers.BertForPreTraining(tiny_hf_config())
    pretraining.save_pretrained(str(tmp_path), safe_serialization=True)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(k.startswith("bert.") for k in keys) and any(k.startswith("cls.") for k in keys)
    assert_same_as_hf(tmp_path, pretraining.bert)
    _, _, pooler, _ = load_pretrained_parts(tmp_path)
    assert torch.equal(pooler["dense.bias"], pretraining.bert.pooler.dense.bias)


def test_tf_era_gamma_beta_names(tmp_path, tiny_hf):
    _, ref, state = tiny_hf
    old = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    old["embeddings.position_ids"] = torch.arange(64)[None]  # older checkpoints stored this buffer
    assert any(k.endswith("gamma") for k in old)
    assert_same_as_hf(write_hf_folder(tmp_path / "old", tiny_hf_config(), old), ref)


def test_checkpoint_without_pooler(tmp_path):
    torch.manual_seed(2)
    ref = transformers.BertModel(tiny_hf_config(), add_pooling_layer=False)
    folder = write_hf_folder(tmp_path / "nopool", tiny_hf_config(), ref.state_dict())
    assert_same_as_hf(folder, ref)
    assert load_pretrained_parts(folder)[2] is None


def test_pytorch_model_bin(tmp_path, tiny_hf):
    _, ref, state = tiny_hf
    folder = write_hf_folder(tmp_path / "bin", tiny_hf_config(), state, filename="pytorch_model.bin")
    assert not (folder / "model.safetensors").exists()
    assert_same_as_hf(folder, ref)


class NotATensor:  # a pickle that a weights_only load must refuse
    pass


def test_pytorch_model_bin_with_code_is_refused(tmp_path, tiny_hf):
    folder = tmp_path / "evil"
    folder.mkdir()
    tiny_hf_config().to_json_file(str(folder / "config.json"))
    torch.save({"embeddings.word_embeddings.weight": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin could not be loaded safely"):
        load_pretrained(folder)


def test_fp16_checkpoint_loads_as_fp32(tmp_path, tiny_hf):
    _, _, state = tiny_hf
    folder = write_hf_folder(
        tmp_path / "half", tiny_hf_config(), {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    )
    model = load_pretrained(folder)
    assert model.layers[0].attention.qkv.weight.dtype == torch.float32


def test_overrides_replace_config_fields(tiny_hf):
    folder, _, _ = tiny_hf
    model = load_pretrained(folder, hidden_dropout=0.0, attention_dropout=0.0)
    assert model.config.hidden_dropout == 0.0 and model.layers[0].attention.dropout_p == 0.0


# ---- bad input: one UserError each, naming the problem ------------------------------------------


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="has no config.json"):
        load_pretrained(tmp_path)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", ["gpt2", "t5"])
def test_unsupported_model_type_names_the_supported_families(tiny_hf, model_type):
    folder, _, _ = tiny_hf
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UserError,
        match=f"model_type '{model_type}'; st supports 'bert', 'roberta', 'xlm-roberta', 'electra', 'distilbert'",
    ) as e:
        load_pretrained(folder)
    assert "\n" not in str(e.value)


def test_unsupported_activation(tiny_hf):
    folder, _, _ = tiny_hf
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="hidden_act 'gelu'"):
        load_pretrained(folder)


def test_no_weights_file(tiny_hf):
    folder, _, _ = tiny_hf
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="neither model.safetensors nor pytorch_model.bin"):
        load_pretrained(folder)


@pytest.mark.parametrize("keep", [0.5, 10])  # cut in the data, cut in the header
def test_truncated_safetensors(tiny_hf, keep):
    folder, _, _ = tiny_hf
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(UserError, match="model.safetensors is not a readable safetensors file.*truncated"):
        load_pretrained(folder)


def rewrite(folder, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def test_unknown_key_is_named(tiny_hf):
    folder, _, state = tiny_hf
    rewrite(folder, {**state, "encoder.layer.0.attention.self.rotary.weight": torch.zeros(4)})
    with pytest.raises(
        UserError, match=r"model.safetensors: unknown key 'encoder.layer.0.attention.self.rotary.weight'"
    ):
        load_pretrained(folder)


def test_missing_key_is_named(tiny_hf):
    folder, _, state = tiny_hf
    del state["encoder.layer.1.output.dense.bias"]
    rewrite(folder, state)
    with pytest.raises(UserError, match=r"model.safetensors: missing key 'encoder.layer.1.output.dense.bias'"):
        load_pretrained(folder)


def test_checkpoint_with_more_layers_than_config(tiny_hf):
    folder, _, _ = tiny_hf
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"unknown key 'encoder.layer.1."):
        load_pretrained(folder)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("encoder.layer.0.intermediate.dense.weight", (40, 32)),
        ("embeddings.word_embeddings.weight", (61, 32)),
        ("encoder.layer.1.attention.self.value.bias", (31,)),
        # Q, K and V are concatenated: a bad width must be caught before torch.cat sees it.
        ("encoder.layer.1.attention.self.key.weight", (32, 31)),
        ("pooler.dense.weight", (32, 16)),
    ],
)
def test_wrong_shape_is_named(tiny_hf, key, shape):
    folder, _, state = tiny_hf
    state[key] = torch.zeros(shape)
    rewrite(folder, state)
    with pytest.raises(
        UserError, match=rf"model.safetensors: {key} has shape {tuple(shape)}".replace("(", r"\(").replace(")", r"\)")
    ):
        load_pretrained_parts(folder)


# ---- pruned checkpoints: transformers 4.x pruned_heads, zero-filled heads and FFN blocks --------


def test_model_pruned_by_transformers_loads_at_its_size(tmp_path):
    """A model someone pruned with transformers 4.x's prune_heads, saved with save_pretrained."""
    torch.manual_seed(3)
    ref = transformers.BertModel(tiny_hf_config()).eval()
    ref.prune_heads({0: [1, 3], 1: [0, 1, 2]})
    ref.save_pretrained(tmp_path / "pruned", safe_serialization=True)
    ours = load_pretrained(tmp_path / "pruned")
    assert ours.config.kept_heads == ((0, 2), (3,))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.embeddings.parameters()) + sum(
        p.numel() for p in ref.encoder.parameters()
    )
    assert_same_as_hf(tmp_path / "pruned", ref)


@pytest.mark.parametrize(
    "pruned, message",
    [
        ({"2": [0]}, "layer indices 0..1"),
        ({"0": [0, 1, 2, 3]}, "keeping one head per layer"),
        ({"0": [4]}, "head indices 0..3"),
        ([[0]], "pruned_heads must map"),
    ],
)
def test_bad_pruned_heads_are_refused(tiny_hf, pruned, message):
    folder, _, _ = tiny_hf
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "pruned_heads": pruned}))
    with pytest.raises(UserError, match=message):
        load_pretrained(folder)


def zero_heads(state: dict, layer: int, head: int, part: str) -> None:
    """Silence one head of an HF state: only its value rows and bias, or only its output columns."""
    p, rows = f"encoder.layer.{layer}.attention.", slice(head * 8, (head + 1) * 8)  # head dim 32 / 4
    if part == "value":
        state[p + "self.value.weight"][rows] = 0
        state[p + "self.value.bias"][rows] = 0
    else:
        state[p + "output.dense.weight"][:, rows] = 0


def test_zero_heads_and_ffn_blocks_are_removed_on_request(tmp_path, tiny_hf):
    _, ref, state = tiny_hf
    state = {k: v.clone() for k, v in state.items()}
    zero_heads(state, 0, 1, "value")  # V = 0: softmax(QK^T)·V = 0, whatever Q and K are
    zero_heads(state, 0, 2, "out")  # its output columns are 0
    for h in range(4):  # a whole layer silent: one head stays, adding exactly nothing
        zero_heads(state, 1, h, "out")
    state["encoder.layer.1.output.dense.weight"].zero_()  # an FFN block whose output is 0 (up left as it is)
    state["encoder.layer.1.output.dense.bias"].zero_()
    state["encoder.layer.0.output.dense.weight"].zero_()  # zero weight but a bias: it still adds something
    state["encoder.layer.0.output.dense.bias"] = torch.linspace(-1, 1, 32)
    folder = write_hf_folder(tmp_path / "zeros", tiny_hf_config(), state)
    ref.load_state_dict(state)

    dense = load_pretrained(folder)
    assert dense.config.kept_heads is None and dense.config.ffn_sizes is None
    slim = load_pretrained(folder, remove_zeros=True)
    assert slim.config.kept_heads == ((0, 3), (0,)) and slim.config.ffn_sizes == (48, 0)
    per_head, ffn = 3 * (32 * 8 + 8) + 32 * 8, 32 * 48 + 48 + 48 * 32 + 32
    assert sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in slim.parameters()) == 5 * per_head + ffn
    assert_same_as_hf(folder, ref)
    ids, types, mask = tiny_batch()
    with torch.no_grad():
        theirs = ref.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        assert max_diff_on_real_tokens(slim.eval()(ids, types, mask), theirs, mask) <= 1e-5
    # Our own checkpoints take the option too, and a model with nothing silent is left as it is.
    assert (
        load_pretrained(resolve_model_dir("minilm-l6"), remove_zeros=True).config == load_pretrained("minilm-l6").config
    )


# ---- our own checkpoints ---------------------------------------------------------------------


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    encoder = Bert(
        BertConfig(
            vocab_size=60,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            kept_heads=((0, 3), (0, 1, 2, 3)),
            ffn_sizes=(48, 0),
        )
    )
    return BertClassifier(encoder, num_labels=3, head_dropout=0.2).eval()


def test_checkpoint_round_trip(tmp_path):
    model = tiny_classifier()
    save_checkpoint(tmp_path / "ck", model, task="rte", ticket={"ratio": 0.3})
    back, cfg = load_checkpoint(tmp_path / "ck")
    assert cfg["task"] == "rte" and cfg["ticket"] == {"ratio": 0.3}
    assert back.encoder.config == model.encoder.config
    assert back.num_labels == 3 and back.classifier.dropout.p == 0.2
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids, types, mask = tiny_batch()
    with torch.no_grad():
        assert torch.equal(back.eval()(ids, types, mask), model(ids, types, mask))
    # The encoder of a fine-tuned checkpoint is a valid starting point too (e.g. for importance).
    config, encoder, pooler, _ = load_pretrained_parts(tmp_path / "ck")
    assert config == model.encoder.config
    assert torch.equal(encoder["layers.0.attention.qkv.weight"], model.encoder.layers[0].attention.qkv.weight)
    assert torch.equal(pooler["dense.weight"], model.pooler.dense.weight)


def test_load_checkpoint_refuses_a_non_st_folder(tiny_hf):
    folder, _, _ = tiny_hf
    with pytest.raises(UserError, match="is not an st fine-tuned checkpoint"):
        load_checkpoint(folder)


def test_load_checkpoint_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_load_checkpoint_with_mismatched_weights(tmp_path):
    model = tiny_classifier()
    save_checkpoint(tmp_path / "ck", model)
    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    del state["classifier.out.bias"]
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(UserError, match="missing key 'classifier.out.bias'"):
        load_checkpoint(tmp_path / "ck")


# ---- locating a model ------------------------------------------------------------------------


def test_alias_resolves_to_the_packaged_folder():
    folder = resolve_model_dir("minilm-l6")
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def test_unknown_model_names_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(UserError) as err:
        resolve_model_dir("no-such/model")
    message = str(err.value)
    assert "'no-such/model'" in message and "Hugging Face cache" in message and str(cache) in message


def fake_hub_cache(root, tiny_hf_folder, repo="org/name", hashes=("abc123",), main="abc123"):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for h in hashes:
        snap = repo_dir / "snapshots" / h
        snap.mkdir(parents=True)
        for f in ("config.json", "model.safetensors"):
            (snap / f).write_bytes((tiny_hf_folder / f).read_bytes())
    if main is not None:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(main + "\n")
    return repo_dir


def test_hf_cache_layout_is_resolved(tmp_path, monkeypatch, tiny_hf):
    folder, ref, _ = tiny_hf
    cache = tmp_path / "hub"
    repo_dir = fake_hub_cache(cache, folder, hashes=("abc123", "def456"), main="abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("org/name") == repo_dir / "snapshots" / "abc123"
    assert_same_as_hf("org/name", ref)


def test_hf_cache_without_refs_uses_a_snapshot(tmp_path, monkeypatch, tiny_hf):
    folder, _, _ = tiny_hf
    cache = tmp_path / "hf" / "hub"
    repo_dir = fake_hub_cache(cache, folder, main=None)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resolve_model_dir("org/name") == repo_dir / "snapshots" / "abc123"
