"""DeBERTa-v2/v3 (`model_type: deberta-v2`): parity with transformers 4.57.6's DebertaV2Model on random
non-default models (hidden states; head and FFN masks against HF with the masked parts zeroed), physical
pruning of the positional projections, token ids equal to HF's DeBERTa-v2 fast tokenizer, the zero-filled
export on HF's own DebertaV2ForSequenceClassification (and its zeros, read from the file), and the pipeline
end to end with its exports loading in transformers 4 and 5 and ONNX Runtime, then share, sweep and adapt."""

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
from st.export import export_hf, load_hf_classifier
from st.models import BertClassifier, load_checkpoint, load_pretrained
from st.models.deberta import DebertaV2Config
from st.models.families import FAMILIES
from st.multitask import load_task_model
from st.prune import prune_classifier
from st.tickets import round_half_up
from st.tokenize import Tokenizer
from tests.test_export import onnx_logits
from tests.test_families import CORPUS, PAIRS, TF5, st

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
L, H, D, F, V, PAD = 2, 4, 24, 40, 37, 5
# Few buckets (mid = 2) and max_relative_positions below the inputs' length: the log buckets and the clamp
# at the table's ends both happen; each config turns on what the others leave off.
CONFIGS = {
    "v3": dict(position_buckets=4, max_relative_positions=12, pos_att_type="p2c|c2p", share_att_key=True,
               norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0),
    "c2p-only": dict(position_buckets=-1, max_relative_positions=5, pos_att_type=["c2p"], share_att_key=False,
                     position_biased_input=True, type_vocab_size=3, embedding_size=16),
    "separate-keys": dict(position_buckets=6, pos_att_type=["p2c", "c2p"], share_att_key=False,
                          position_biased_input=True, type_vocab_size=2, embedding_size=16),
}  # fmt: skip


def hf_config(name: str, vocab_size: int = V, pad: int = PAD, **more):
    return transformers.DebertaV2Config(
        vocab_size=vocab_size, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F,
        max_position_embeddings=40, pad_token_id=pad, layer_norm_eps=1e-5, initializer_range=0.2,
        relative_attention=True, **{**CONFIGS[name], **more},
    )  # fmt: skip


def write_model(folder: Path, name: str, vocab_size: int = V, pad: int = PAD, seed: int = 0):
    """A random DebertaV2Model saved by transformers, with noise on every weight so a wrong slice shows."""
    torch.manual_seed(seed)
    model = transformers.DebertaV2Model(hf_config(name, vocab_size, pad))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


def padded_pairs(seed: int = 0, T: int = 17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(PAD + 1, V, (3, T), generator=g)
    mask, types = torch.ones(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate((T, 9, 4)):
        mask[b, n:] = 0
        types[b, n // 2 : n] = 1
    return ids.masked_fill(mask == 0, PAD), types, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_encoder_matches_transformers_with_and_without_masks(name, tmp_path):
    hf = write_model(tmp_path, name)
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.num_heads == H and ours.config.relative_attention
    ids, types, mask = padded_pairs()
    real = mask.bool()
    head = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    ffn = torch.tensor([1.0, 0])
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        for packed in (True, False):  # packed, and the padded layout ONNX graphs use
            got = ours(ids, types, mask, packed=packed)
            assert (got - want)[real].abs().max() < 1e-5, packed
        # HF takes no head mask: zero the masked heads' output-projection columns and the masked FFN's output.
        Dh = D // H
        for i, layer in enumerate(hf.encoder.layer):
            for h in range(H):
                if not head[i, h]:
                    layer.attention.output.dense.weight[:, h * Dh : (h + 1) * Dh] = 0
            if not ffn[i]:
                layer.output.dense.weight.zero_(), layer.output.dense.bias.zero_()
        want = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        got = ours(ids, types, mask, head_mask=head, ffn_mask=ffn)
        assert (got - want)[real].abs().max() < 1e-5
        per_example = ours(ids, types, mask, head_mask=head.expand(3, L, H), ffn_mask=ffn.expand(3, L))
        assert (per_example - got)[real].abs().max() < 1e-6


def test_pruning_removes_each_heads_rows_of_every_projection(tmp_path):
    """With their own pos_key/pos_query projections, a pruned model computes what the masked one does."""
    write_model(tmp_path, "separate-keys")
    torch.manual_seed(1)
    model = BertClassifier(load_pretrained(tmp_path), num_labels=3).eval()
    head, ffn = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]]), torch.tensor([0, 1])
    small = prune_classifier(model, head, ffn).eval()
    layer = small.encoder.layers[1].attention
    assert layer.pos_k.weight.shape == layer.pos_q.weight.shape == (D // H, D)  # one head left of four
    assert small.encoder.rel_embeddings.weight.shape == model.encoder.rel_embeddings.weight.shape  # whole
    ids, types, mask = padded_pairs(seed=3)
    with torch.no_grad():
        want = model(ids, types, mask, head_mask=head.float(), ffn_mask=ffn.float())
        assert (small(ids, types, mask) - want).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["v3", "separate-keys"])
def test_zero_filled_export_adds_nothing_in_transformers(name, tmp_path):
    """On HF's own DebertaV2ForSequenceClassification: a pruned head's zero q/k/v (and positional) rows make its
    c2c, c2p and p2c scores and its values zero, so the dense export gives the pruned model's logits."""
    write_model(tmp_path / "base", name)
    torch.manual_seed(2)
    model = BertClassifier(load_pretrained(tmp_path / "base"), num_labels=2).eval()
    head, ffn = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]]), torch.tensor([1, 0])
    small = export_hf(model, tmp_path / "hf", ["no", "yes"], head_mask=head, ffn_mask=ffn)
    state = load_file(tmp_path / "hf" / "model.safetensors")  # what HF reads
    projections = ["query_proj", "key_proj", "value_proj"]
    projections += ["pos_key_proj", "pos_query_proj"] if name == "separate-keys" else []  # v3 shares q/k's
    for i in range(L):
        gone, kept = head[i] == 0, head[i] == 1
        at = f"deberta.encoder.layer.{i}.attention"
        for proj in projections:  # a pruned head's rows, weight and bias, in each projection
            w, b = state[f"{at}.self.{proj}.weight"].view(H, D // H, D), state[f"{at}.self.{proj}.bias"].view(H, -1)
            assert not w[gone].any() and not b[gone].any() and all(w[kept].flatten(1).any(1)), (i, proj)
        out = state[f"{at}.output.dense.weight"].view(D, H, D // H)  # and its output-projection columns
        assert not out[:, gone].any() and all(out[:, kept].transpose(0, 1).flatten(1).any(1)), i
    for p in ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias"):
        assert state[f"deberta.encoder.layer.1.{p}"].shape == state[f"deberta.encoder.layer.0.{p}"].shape
        assert not state[f"deberta.encoder.layer.1.{p}"].any() and state[f"deberta.encoder.layer.0.{p}"].any(), p
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert type(hf).__name__ == "DebertaV2ForSequenceClassification" and not any(info.values()), info
    ids, types, mask = padded_pairs(seed=4)
    with torch.no_grad():
        ours = small.eval()(ids, types, mask)
        assert (hf.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask).logits - ours).abs().max() < 1e-5
    back, _ = load_hf_classifier(tmp_path / "hf", remove_zeros=True)  # and back into st as the small model
    assert back.encoder.config.kept_heads == ((1, 2), (0,)) and back.encoder.config.ffn_sizes == (F, 0)
    with torch.no_grad():
        assert (back.eval()(ids, types, mask) - ours).abs().max() < 1e-5
    with pytest.raises(UserError, match="pruned-heads layout does not exist for deberta-v2"):
        export_hf(small, tmp_path / "ph", layout="pruned-heads")
    assert not (tmp_path / "ph").exists()


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("conv_kernel_size", 3, "convolution"),
        ("hidden_act", "relu", "hidden_act"),
        ("norm_rel_ebd", "layer_norm|other", "norm_rel_ebd"),
        ("pooler_hidden_size", 16, "pooler_hidden_size"),
        ("pooler_dropout", 0.1, "pooler_dropout"),
        ("attention_head_size", 8, "attention_head_size"),
        ("hidden_size", "24", "hidden_size must be a positive whole number"),  # a hand-edited config.json
        ("num_attention_heads", "4", "num_attention_heads must be a positive whole number"),
        ("num_attention_heads", 0, "num_attention_heads must be a positive whole number"),
        ("conv_kernel_size", "3", "conv_kernel_size must be a whole number"),
    ],
)
def test_options_st_does_not_implement_are_refused_in_one_line(field, value, said, tmp_path):
    write_model(tmp_path, "v3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(UserError, match=said) as e:
        load_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_an_unused_absolute_position_table_is_skipped_as_hf_skips_it(tmp_path):
    """DeBERTa-v2/v3 checkpoints carry deberta.embeddings.position_embeddings.weight though
    position_biased_input is false; HF ignores it, and so does st (any other unknown key is still refused)."""
    from safetensors.torch import load_file, save_file

    write_model(tmp_path, "v3")
    tensors = load_file(tmp_path / "model.safetensors")
    save_file(
        {**tensors, "deberta.embeddings.position_embeddings.weight": torch.zeros(40, D)}, tmp_path / "model.safetensors"
    )
    assert load_pretrained(tmp_path).embeddings.position is None
    save_file({**tensors, "deberta.embeddings.other.weight": torch.zeros(40, D)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="unknown key 'embeddings.other.weight'"):
        load_pretrained(tmp_path)


def test_config_round_trips_and_bad_fields_are_one_line():
    c = DebertaV2Config(vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, intermediate_size=F,
                        relative_attention=True, position_buckets=4, pos_att_type=("c2p",))  # fmt: skip
    assert DebertaV2Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.with_dropout(0.0).attention_dropout == 0.0 and c.span == 4 and c.positional_projections == ("pos_k",)
    for bad in (dict(pos_att_type=("c2c",)), dict(share_att_key="yes"), dict(num_heads=5), dict(hidden_dropout=1)):
        with pytest.raises(UserError):
            DebertaV2Config.from_dict({**c.to_dict(), **bad})


# ---- the tokenizer ----------------------------------------------------------------------------------


def write_tokenizer(folder: Path) -> Path:
    """A SentencePiece Unigram tokenizer.json with DeBERTa's specials and template, saved by HF's
    DebertaV2TokenizerFast itself."""
    from tokenizers import SentencePieceUnigramTokenizer, processors

    folder.mkdir(parents=True, exist_ok=True)
    uni = SentencePieceUnigramTokenizer()
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # DeBERTa-v3's ids 0..3
    uni.train_from_iterator(CORPUS, vocab_size=70, special_tokens=specials, unk_token="[UNK]")
    uni.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    uni.save(str(folder / "raw.json"))
    transformers.DebertaV2TokenizerFast(tokenizer_file=str(folder / "raw.json")).save_pretrained(folder)
    (folder / "raw.json").unlink()
    return folder


def test_token_ids_equal_the_deberta_v2_fast_tokenizer(tmp_path):
    folder = write_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == "DebertaV2TokenizerFast"
    for max_length in (7, 12, 64):
        ours = Tokenizer.from_dir(folder, max_length=max_length)
        assert ours.pad_id == hf.pad_token_id == 0
        for texts in ((PAIRS[0], None), PAIRS):
            got = ours.encode_unpadded(*texts)
            want = hf(*texts, truncation=True, max_length=max_length, return_token_type_ids=True)
            assert [ids for ids, _ in got] == want["input_ids"], (max_length, texts[1] is not None)
            assert [types for _, types in got] == want["token_type_ids"]
    ids, types = Tokenizer.from_dir(folder).encode_unpadded(["good movie"], ["bad"])[0]
    a, b = (hf(t, add_special_tokens=False)["input_ids"] for t in ("good movie", "bad"))
    assert ids == [1, *a, 2, *b, 2] and types == [0] * (len(a) + 2) + [1] * (len(b) + 1)


# ---- the pipeline end to end ----------------------------------------------------------------------------


def train_args(data_dir: Path, model_dir: Path) -> tuple:
    """The options every run of the pipeline shares (finetune's; sweep and adapt take them too)."""
    return ("--task", "csv", "--data-dir", data_dir, "--model", model_dir, "--batch-size", 16, "--lr", 5e-3,
            "--device", "cpu", "--max-length", 16, "--train-size", 64)  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, sentiment_dir):
    """A tiny random v3-like model with its tokenizer: finetune, score, prune at r = 0.3, rewind and fine-tune
    the ticket, export the rewound run as a Hugging Face folder and an ONNX file; ticket sharing (`st share`)."""
    tmp = tmp_path_factory.mktemp("deberta")
    tok = Tokenizer.from_dir(write_tokenizer(tmp / "model"))
    write_model(tmp / "model", "v3", tok.vocab_size, tok.pad_id)
    train = train_args(sentiment_dir, tmp / "model")
    st("finetune", *train, "--epochs", 1, "--out", tmp / "full")
    st("score", "--checkpoint", tmp / "full", "--out", tmp / "scores.json", "--device", "cpu")
    st("prune", "--scores", tmp / "scores.json", "--ratio", 0.3, "--checkpoint", tmp / "full", "--out", tmp / "t.json")
    st("finetune", *train, "--epochs", 1, "--ticket", tmp / "t.json", "--out", tmp / "rewound")
    st("export", "--checkpoint", tmp / "rewound", "--hf", tmp / "hf", "--onnx", tmp / "model.onnx")
    st("share", "--tasks", "csv", "--tickets", tmp / "t.json", "--model", tmp / "model", "--data-dir",
       f"csv={sentiment_dir}", "--train-sizes", "csv=64", "--max-length", 16, "--epochs", 1, "--batch-size", 16,
       "--lr", 5e-3, "--device", "cpu", "--out", tmp / "share")  # fmt: skip
    model, _ = load_checkpoint(tmp / "rewound")
    batch = Tokenizer.from_dir(tmp / "hf", max_length=16).encode(*PAIRS)
    with torch.no_grad():
        logits = model.eval()(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    return tmp, model, batch, logits


def test_pipeline_exports_load_in_transformers_4_and_5_and_onnx_runtime(pipeline):
    tmp, model, batch, ours = pipeline
    config = model.encoder.config  # physically pruned: round-half-up of r = 0.3 of the 8 heads and 2 FFN blocks
    assert sum(map(len, config.kept_heads)) == L * H - round_half_up(0.3 * L * H) == 6
    assert config.ffn_sizes.count(0) == round_half_up(0.3 * L) == 1 and config.ffn_sizes.count(F) == L - 1
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp / "hf", output_loading_info=True)
    assert type(hf).__name__ == FAMILIES["deberta-v2"].classifier_class and not any(info.values()), info
    enc = transformers.AutoTokenizer.from_pretrained(tmp / "hf")(
        *PAIRS, padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    assert torch.equal(enc["input_ids"], batch["input_ids"]) and torch.equal(
        enc["token_type_ids"], batch["token_type_ids"]
    )
    with torch.no_grad():
        error = (hf.eval()(**enc).logits - ours).abs().max().item()
    print(f"deberta-v2: max |logits - transformers 4| = {error:.1e}")
    assert error < 1e-5
    onnx = (onnx_logits(tmp / "model.onnx", batch) - ours).abs().max().item()
    print(f"deberta-v2: max |logits - ONNX Runtime| = {onnx:.1e}")
    assert onnx < 1e-4

    target = Path(os.environ.get("ST_TRANSFORMERS5", ROOT / ".venv" / "tf5"))
    if not (target / "transformers").is_dir():
        pytest.fail(f"transformers 5 is not installed in {target}: run `make test` (its set-up installs it)")
    folder = str(tmp / "hf")
    run = subprocess.run(
        [sys.executable, "-c", TF5, json.dumps({folder: {k: v.tolist() for k, v in batch.items()}})],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["version"].startswith("5.") and out[folder]["class"] == "DebertaV2ForSequenceClassification"
    error = (torch.tensor(out[folder]["logits"]) - ours).abs().max().item()
    print(f"deberta-v2: max |logits - transformers 5| = {error:.1e}")
    assert error < 1e-5


def test_share_sweep_and_adapt_run_on_deberta(pipeline, sentiment_dir, monkeypatch):
    """Ticket sharing kept the ticket; a sweep (full model + winning ticket) and domain adaptation from the
    rewound ticket and the multi-task folder go through unchanged."""
    tmp, model, _, _ = pipeline
    metrics = json.loads((tmp / "share" / "metrics.json").read_text())
    assert metrics["tickets"] == "shared" and 0 <= metrics["dev"]["csv"]["accuracy"] <= 1
    assert metrics["percent_remaining"] == json.loads((tmp / "t.json").read_text())["percent_remaining"]
    shared = load_task_model(tmp / "share", "csv").encoder.config  # one task: the shared encoder is its ticket
    assert (shared.kept_heads, shared.ffn_sizes) == (model.encoder.config.kept_heads, model.encoder.config.ffn_sizes)

    monkeypatch.setattr(speed, "_onnx_installed", lambda: False)  # time st's model: ONNX is `st export`'s above
    train = train_args(sentiment_dir, tmp / "model")
    st("sweep", *train, "--epochs", 1, "--ratios", 0.3, "--kinds", "winning", "--seeds", 1, "--out", tmp / "sweep")
    runs = json.loads((tmp / "sweep" / "results.json").read_text())["runs"]
    assert [(r["kind"], r["ratio"], r["error"]) for r in runs] == [("full", 0.0, None), ("winning", 0.3, None)]
    assert runs[1]["percent_remaining"]["encoder"] < 100 and runs[1]["speedup"] > 0

    froms = ("--from", f"ticket={tmp / 'rewound'}", "--from", f"shared={tmp / 'share'}")
    st("adapt", *train[:-2], *froms, "--fractions", 0.25, "--epochs", 1, "--out", tmp / "adapt")  # no --train-size
    rows = json.loads((tmp / "adapt" / "results.json").read_text())["rows"]
    assert len(rows) == 2 and all(0 <= r["dev"]["accuracy"] <= 1 for r in rows), rows
    for name in ("ticket", "shared"):  # each started from its pruned encoder and kept it
        adapted, _ = load_checkpoint(tmp / "adapt" / name / "fraction0.25-seed0")
        assert adapted.encoder.config.kept_heads == model.encoder.config.kept_heads, name


def test_a_spm_model_without_tokenizer_json_says_how_to_write_one(tmp_path):
    """Real DeBERTa-v3 checkpoints ship SentencePiece's spm.model only; st reads tokenizer.json."""
    (tmp_path / "spm.model").write_bytes(b"\x00")
    with pytest.raises(UserError, match="spm.model but no tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert "AutoTokenizer" in str(e.value) and "save_pretrained" in str(e.value) and "\n" not in str(e.value)
