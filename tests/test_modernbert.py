"""ModernBERT (st.models.modernbert) against transformers 4.57.6 and 5.x: hidden states, masks and their
gradients, token ids, config options refused or read, the pipeline end to end (score, prune, rewind, export to
HF and ONNX, share, sweep) and the zeros of the dense export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from st import speed
from st.errors import UserError
from st.export import export_hf, hf_state, load_hf_classifier
from st.models import load_checkpoint, load_pretrained
from st.models.families import FAMILIES
from st.models.heads import BertClassifier
from st.models.modernbert import ModernBert, ModernBertConfig
from st.models.weights import config_from_hf
from st.multitask import load_task_model
from st.prune import prune_classifier, prune_encoder
from st.tokenize import Tokenizer
from tests.test_export import onnx_logits
from tests.test_families import CORPUS, PAIRS, ROOT, TF5, st

transformers = pytest.importorskip("transformers")
L, H, D, F = 4, 4, 32, 24
MAX_TOKENS = 64
# Non-default everywhere it matters: a global layer every 2, a window (±2) shorter than the inputs,
# odd rotary bases, every bias on, mean pooling, a pad id that is not ModernBERT's.
HF_OPTIONS = dict(
    hidden_size=D,
    intermediate_size=F,
    num_hidden_layers=L,
    num_attention_heads=H,
    global_attn_every_n_layers=2,
    local_attention=5,
    global_rope_theta=500.0,
    local_rope_theta=77.0,
    attention_bias=True,
    mlp_bias=True,
    norm_bias=True,
    classifier_bias=True,
    classifier_pooling="mean",
    max_position_embeddings=MAX_TOKENS,
    initializer_range=0.2,  # task heads big enough to show errors
)


def write_model(folder: Path, vocab_size: int, pad: int, seed: int = 0, **options) -> Path:
    """A random ModernBertModel saved by transformers, with noise on every weight so a wrong slice shows."""
    torch.manual_seed(seed)
    config = transformers.ModernBertConfig(vocab_size=vocab_size, pad_token_id=pad, **{**HF_OPTIONS, **options})
    model = transformers.ModernBertModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json in ModernBERT's layout ([CLS] A [SEP] B [SEP], no token types),
    trained here on local text and saved by transformers' PreTrainedTokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer, processors

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=specials)
    cls, sep = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
    bpe.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    folder.mkdir(parents=True, exist_ok=True)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        **{f"{k}_token": f"[{k.upper()}]" for k in ("unk", "cls", "sep", "pad", "mask")},
    )
    hf.save_pretrained(folder)
    return folder


def padded_pairs(vocab_size: int, pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 11
    ids = torch.randint(0, vocab_size, (B, T), generator=g)
    ids[ids == pad] = pad + 1
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate((T, 8, 4)):
        mask[b, n:] = 0
    return ids.masked_fill(mask == 0, pad), mask


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("modernbert"), 99, pad=3)


def hf_hidden(folder: Path, ids, mask, edit=None, implementation="sdpa") -> torch.Tensor:
    hf = transformers.ModernBertModel.from_pretrained(folder, attn_implementation=implementation).eval()
    if edit is not None:
        with torch.no_grad():
            edit(hf)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]


# ---- the encoder against transformers -----------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hidden_states_match_transformers_packed_and_padded(random_model, implementation):
    ids, mask = padded_pairs(99, pad=3)
    ours = load_pretrained(random_model).eval()
    assert ours.config.global_attn_every_n_layers == 2 and ours.config.local_attention // 2 < ids.shape[1]
    want = hf_hidden(random_model, ids, mask, implementation=implementation)
    with torch.no_grad():
        for packed in (True, False):  # packed: N real tokens; False: the B,T graph ONNX exports
            got = ours(ids, None, mask, packed=packed) * mask[..., None]
            assert (got - want).abs().max().item() < 1e-5, packed
        one = ours(ids[1:2, :8], None, mask[1:2, :8])  # padding changes nothing: the example alone
        assert (one - want[1:2, :8]).abs().max().item() < 1e-5


def test_masks_equal_zeroed_weights_in_transformers(random_model):
    """ξ = 0 is the head's Wo columns at zero; ν = 0 the MLP's Wo (weight and bias) at zero."""
    ids, mask = padded_pairs(99, pad=3, seed=1)
    ours = load_pretrained(random_model).eval()
    head_mask, ffn_mask = torch.ones(L, H), torch.ones(L)
    head_mask[0, 1] = head_mask[1, 3] = head_mask[3, 0] = head_mask[3, 2] = 0
    ffn_mask[2] = 0
    Dh = D // H

    def zero(hf):
        for layer, head in (head_mask == 0).nonzero().tolist():
            hf.layers[layer].attn.Wo.weight[:, head * Dh : (head + 1) * Dh] = 0
        hf.layers[2].mlp.Wo.weight.zero_()
        hf.layers[2].mlp.Wo.bias.zero_()

    want = hf_hidden(random_model, ids, mask, zero)
    with torch.no_grad():
        for packed in (True, False):
            got = ours(ids, None, mask, head_mask, ffn_mask, packed=packed) * mask[..., None]
            assert (got - want).abs().max().item() < 1e-5
        per_example = ours(ids, None, mask, head_mask.expand(3, L, H), ffn_mask.expand(3, L))  # B,L,H0 and B,L
        assert (per_example * mask[..., None] - want).abs().max().item() < 1e-5
        small = prune_encoder(ours, head_mask, ffn_mask)  # physically removed: the same, in original indices
        assert small.layers[2].ffn is None and small.config.kept_heads[3] == (1, 3)
        assert (small(ids, None, mask) * mask[..., None] - want).abs().max().item() < 1e-5
        assert torch.equal(small(ids, None, mask, head_mask), small(ids, None, mask))


def test_mask_gradients_match_finite_differences(random_model):
    ids, mask = padded_pairs(99, pad=3, seed=2)
    model = load_pretrained(random_model).double().eval()
    w = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(head_mask, ffn_mask):
        return ((model(ids, None, mask, head_mask, ffn_mask) @ w) * mask).sum()

    head_mask = torch.ones(L, H, dtype=torch.float64, requires_grad=True)
    ffn_mask = torch.ones(L, dtype=torch.float64, requires_grad=True)
    g_head, g_ffn = torch.autograd.grad(loss(head_mask, ffn_mask), (head_mask, ffn_mask))
    eps = 1e-6
    with torch.no_grad():
        for layer, head in ((0, 0), (1, 2), (3, 3)):
            up, down = torch.ones(L, H, dtype=torch.float64), torch.ones(L, H, dtype=torch.float64)
            up[layer, head], down[layer, head] = 1 + eps, 1 - eps
            numeric = (loss(up, None) - loss(down, None)) / (2 * eps)
            assert abs(numeric - g_head[layer, head]) < 1e-5 * max(1, abs(numeric))
        for layer in (0, 2):
            up, down = torch.ones(L, dtype=torch.float64), torch.ones(L, dtype=torch.float64)
            up[layer], down[layer] = 1 + eps, 1 - eps
            numeric = (loss(None, up) - loss(None, down)) / (2 * eps)
            assert abs(numeric - g_ffn[layer]) < 1e-5 * max(1, abs(numeric))
    assert g_head.abs().min() > 0 and g_ffn.abs().min() > 0  # every mask matters


def test_config_options_st_does_not_implement_are_one_line(random_model):
    hf = json.loads((random_model / "config.json").read_text())
    for change, named in (
        ({"hidden_activation": "gelu_new"}, "hidden_activation"),
        ({"classifier_pooling": "max"}, "classifier_pooling"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}}, "rope_parameters"),
        (
            {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"][::-1]},
            "layer_types",
        ),
        ({"local_attention": 0}, "local_attention"),
        ({"norm_bias": "yes"}, "norm_bias"),
        ({"rope_parameters": "default"}, "rope_parameters"),  # not a dict
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 9.0}}, "rope_parameters"),  # flat: tf5 refuses it
        ({"rope_parameters": {"full_attention": 500.0}}, "rope_parameters"),
        ({"rope_scaling": {"rope_type": "default", "rope_theta": 9.0}}, "rope_scaling"),  # tf5 would take its theta
        ({"layer_types": "full_attention"}, "layer_types"),
    ):
        with pytest.raises(UserError, match=named) as e:
            config_from_hf({**hf, **change}, random_model)
        assert "\n" not in str(e.value)
    tf5_style = {**hf, "layer_types": ["full_attention", "sliding_attention"] * 2}
    tf5_style["rope_parameters"] = {
        "full_attention": {"rope_type": "default", "rope_theta": 500.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 77.0},
    }
    for k in ("global_attn_every_n_layers", "global_rope_theta", "local_rope_theta"):
        del tf5_style[k]
    assert config_from_hf(tf5_style, random_model) == config_from_hf(hf, random_model)
    for default in ({"rope_type": "default"}, {"type": "default"}):  # what transformers 4 and 5 read as no scaling
        assert config_from_hf({**hf, "rope_scaling": default}, random_model) == config_from_hf(hf, random_model)


def test_token_ids_equal_transformers_on_pairs_with_truncation(tmp_path):
    folder = write_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for max_length in (7, 12, 64):
        ours = Tokenizer.from_dir(folder, max_length=max_length)
        assert ours.pad_id == hf.pad_token_id
        for texts in ((PAIRS[0], None), PAIRS):
            got = [ids for ids, _ in ours.encode_unpadded(*texts)]
            want = hf(*texts, truncation=True, max_length=max_length)["input_ids"]
            assert got == want, (max_length, texts[1] is not None)
    ids, _ = ours.encode_unpadded(["good movie"], ["bad"])[0]
    a, b = (hf(t, add_special_tokens=False)["input_ids"] for t in ("good movie", "bad"))
    cls, sep = hf.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    assert ids == [cls, *a, sep, *b, sep]


def test_the_pruned_heads_layout_is_refused_in_one_line():
    config = ModernBertConfig(
        vocab_size=40, hidden_size=D, num_layers=2, num_heads=H, intermediate_size=F, pad_token_id=0
    )
    with pytest.raises(UserError, match="pruned-heads") as e:
        hf_state(BertClassifier(ModernBert(config), 2), layout="pruned-heads")
    assert "\n" not in str(e.value)


# ---- the pipeline, end to end, and the export in transformers 4 and 5 ------------------------------


def train_args(data_dir: Path, model_dir: Path) -> tuple:
    """The options every run of the pipeline shares (finetune's; sweep and adapt take them too)."""
    return ("--task", "csv", "--data-dir", data_dir, "--model", model_dir, "--batch-size", 16, "--lr", 5e-3,
            "--device", "cpu", "--max-length", 16, "--train-size", 64)  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, sentiment_dir) -> Path:
    """finetune, score, prune at r = 0.3, rewind and fine-tune the ticket, export (HF folder and ONNX), and
    ticket sharing with the ticket (`st share`)."""
    tmp = tmp_path_factory.mktemp("modernbert-pipeline")
    model_dir = write_tokenizer(tmp / "model")
    tok = Tokenizer.from_dir(model_dir)
    write_model(model_dir, tok.vocab_size, tok.pad_id, initializer_range=0.02)
    train = train_args(sentiment_dir, model_dir)
    st("finetune", *train, "--epochs", 1, "--out", tmp / "full")
    st("score", "--checkpoint", tmp / "full", "--out", tmp / "scores.json", "--device", "cpu")
    st(
        "prune",
        "--scores",
        tmp / "scores.json",
        "--ratio",
        0.3,
        "--checkpoint",
        tmp / "full",
        "--out",
        tmp / "ticket.json",
    )
    st("finetune", *train, "--epochs", 1, "--ticket", tmp / "ticket.json", "--out", tmp / "rewound")
    st("export", "--checkpoint", tmp / "rewound", "--hf", tmp / "hf", "--onnx", tmp / "model.onnx")
    st("share", "--tasks", "csv", "--tickets", tmp / "ticket.json", "--model", model_dir, "--data-dir",
       f"csv={sentiment_dir}", "--train-sizes", "csv=64", "--max-length", 16, "--epochs", 1, "--batch-size", 16,
       "--lr", 5e-3, "--device", "cpu", "--out", tmp / "share")  # fmt: skip
    return tmp


def st_logits(tmp: Path):
    model, _ = load_checkpoint(tmp / "rewound")
    batch = Tokenizer.from_dir(tmp / "hf", max_length=16).encode(*PAIRS)
    with torch.no_grad():
        return model.eval(), batch, model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])


def test_pipeline_export_loads_in_transformers_4_with_st_logits(pipeline):
    model, batch, ours = st_logits(pipeline)
    config = model.encoder.config
    assert sum(map(len, config.kept_heads)) == L * H - round(0.3 * L * H)  # rewound, physically pruned
    assert config.ffn_sizes.count(0) == round(0.3 * L)  # and its FFN blocks
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        pipeline / "hf", output_loading_info=True
    )
    assert type(hf).__name__ == "ModernBertForSequenceClassification" and not any(info.values()), info
    enc = transformers.AutoTokenizer.from_pretrained(pipeline / "hf")(
        *PAIRS, padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    assert torch.equal(enc["input_ids"], batch["input_ids"])
    with torch.no_grad():
        theirs = hf.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    error = (ours - theirs).abs().max().item()
    print(f"modernbert: max |logits - transformers 4| = {error:.1e}")
    assert ours.std(0).max() > 1e-3 and batch["input_ids"].shape[1] > hf.config.local_attention  # not trivial
    assert error < 1e-5
    back, _ = load_hf_classifier(pipeline / "hf", remove_zeros=True)  # back into st, as the small model
    assert back.encoder.config == config
    with torch.no_grad():
        assert (back.eval()(batch["input_ids"], None, batch["attention_mask"]) - ours).abs().max().item() < 1e-6
    onnx = (onnx_logits(pipeline / "model.onnx", batch) - ours).abs().max().item()  # `st export`'s pruned graph
    print(f"modernbert: max |logits - ONNX Runtime| = {onnx:.1e}")
    assert onnx < 1e-4


def test_pipeline_export_loads_in_transformers_5_with_st_logits(pipeline):
    target = Path(os.environ.get("ST_TRANSFORMERS5", ROOT / ".venv" / "tf5"))
    if not (target / "transformers").is_dir():
        pytest.fail(f"transformers 5 is not installed in {target}: run `make test` (its set-up installs it)")
    _, batch, ours = st_logits(pipeline)
    folder = str(pipeline / "hf")
    feed = {folder: {k: batch[k].tolist() for k in ("input_ids", "attention_mask")}}
    run = subprocess.run(
        [sys.executable, "-c", TF5, json.dumps(feed)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out.pop("version").startswith("5.") and out[folder]["class"] == FAMILIES["modernbert"].classifier_class
    error = (ours - torch.tensor(out[folder]["logits"])).abs().max().item()
    print(f"modernbert: max |logits - transformers 5| = {error:.1e}")
    assert error < 1e-5


def test_run_dropouts_replace_the_checkpoints_as_for_bert(pipeline):
    """--dropout sets every encoder dropout and --head-dropout (the task's 0.1 here) the head's, whatever the
    checkpoint says (0 in ModernBERT's); the export writes them and reads them back."""
    pretrained = json.loads((pipeline / "model" / "config.json").read_text())
    exported = json.loads((pipeline / "hf" / "config.json").read_text())
    fields = ("embedding_dropout", "attention_dropout", "mlp_dropout", "classifier_dropout")
    assert [pretrained[k] for k in fields] == [0.0] * 4 and [exported[k] for k in fields] == [0.1] * 4
    back, _ = load_hf_classifier(pipeline / "hf")
    assert back.classifier.dropout.p == 0.1 and back.encoder.config.mlp_dropout == 0.1


def test_share_trains_the_ticket_and_keeps_it(pipeline):
    metrics = json.loads((pipeline / "share" / "metrics.json").read_text())
    assert metrics["tickets"] == "shared" and 0 <= metrics["dev"]["csv"]["accuracy"] <= 1
    rewound, _ = load_checkpoint(pipeline / "rewound")
    shared = load_task_model(pipeline / "share", "csv")  # one task: the shared encoder is its ticket
    assert shared.encoder.config.kept_heads == rewound.encoder.config.kept_heads
    assert shared.encoder.config.ffn_sizes == rewound.encoder.config.ffn_sizes
    assert metrics["percent_remaining"] == json.loads((pipeline / "ticket.json").read_text())["percent_remaining"]


def test_a_sweep_runs_on_modernbert(pipeline, sentiment_dir, monkeypatch):
    # The speed-up is timed on st's model, not ONNX Runtime: the pruned graph's export is `st export`'s above,
    # and two more ONNX exports (the full and the pruned model) would add about 8 s.
    monkeypatch.setattr(speed, "_onnx_installed", lambda: False)
    train = train_args(sentiment_dir, pipeline / "model")
    st("sweep", *train, "--epochs", 1, "--ratios", 0.3, "--kinds", "winning", "--seeds", 1, "--out", pipeline / "sweep")
    runs = json.loads((pipeline / "sweep" / "results.json").read_text())["runs"]
    assert [(r["kind"], r["ratio"], r["error"]) for r in runs] == [("full", 0.0, None), ("winning", 0.3, None)]
    assert runs[1]["percent_remaining"]["encoder"] < 100 and runs[1]["speedup"] > 0


def test_export_of_a_masked_model_is_the_pruned_model(random_model, tmp_path):
    """export_hf with masks: zero rows/columns in the dense folder, the same logits as the pruned model."""
    torch.manual_seed(0)
    model = BertClassifier(load_pretrained(random_model), 3).eval()
    head_mask, ffn_mask = torch.ones(L, H), torch.tensor([1.0, 0.0, 1.0, 1.0])
    head_mask[2, :3] = 0
    small = prune_classifier(model, head_mask, ffn_mask)
    export_hf(model, tmp_path, head_mask=head_mask, ffn_mask=ffn_mask)
    state = load_file(tmp_path / "model.safetensors")  # what HF reads: a pruned head's slots are zeros
    Dh, gone, kept = D // H, slice(0, 3), 3
    qkv = state["model.layers.2.attn.Wqkv.weight"].view(3, H, Dh, D)  # [q | k | v] blocks, each H heads of Dh rows
    qkv_bias = state["model.layers.2.attn.Wqkv.bias"].view(3, H, Dh)
    wo = state["model.layers.2.attn.Wo.weight"].view(D, H, Dh)  # columns by head
    assert not qkv[:, gone].any() and not qkv_bias[:, gone].any() and not wo[:, gone].any()
    assert all(qkv[i, kept].any() for i in range(3)) and wo[:, kept].any()
    wi, mlp_wo = state["model.layers.1.mlp.Wi.weight"], state["model.layers.1.mlp.Wo.weight"]  # the removed FFN
    assert wi.shape == (2 * F, D) and mlp_wo.shape == (D, F)  # dense: full size, its 2·F GLU rows and F columns zero
    assert not wi.any() and not state["model.layers.1.mlp.Wi.bias"].any()
    assert not mlp_wo.any() and not state["model.layers.1.mlp.Wo.bias"].any()
    assert state["model.layers.0.mlp.Wi.weight"].any() and state["model.layers.0.mlp.Wo.weight"].any()
    hf = transformers.ModernBertForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = padded_pairs(99, pad=3, seed=3)
    with torch.no_grad():
        assert (hf(input_ids=ids, attention_mask=mask).logits - small(ids, None, mask)).abs().max().item() < 1e-5
        masked = model(ids, None, mask, head_mask, ffn_mask)
        assert (masked - small(ids, None, mask)).abs().max().item() < 1e-5
