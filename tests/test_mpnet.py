"""MPNet: parity with transformers' MPNetModel on the real all-mpnet-base-v2 (`make mpnet` assembles it;
`make test` too) and on random models of non-default sizes (hidden states, HF's own head mask, its
gradient, pruned = masked), token ids equal to MPNetTokenizerFast, and the paper's pipeline end to end
on a tiny random MPNet, its export loading in transformers 4 and 5 as MPNetForSequenceClassification."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from st.errors import UserError
from st.export import export_hf, load_hf_classifier
from st.models import load_checkpoint, load_pretrained, resolve_model_dir
from st.models.attention import attend, relative_buckets
from st.prune import prune_encoder
from st.tokenize import Tokenizer
from tests.conftest import WORDS
from tests.test_export import onnx_logits
from tests.test_families import PAIRS, TF5, padded_pairs, st, st_logits

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
L, H, D, F = 2, 4, 24, 40
MAX_TOKENS = 48  # room for offsets past MPNet's exact buckets (8), into its logarithmic ones


def real_mpnet() -> Path:
    """The assembled all-mpnet-base-v2; CI assembles it (`make test`), so there a missing folder fails."""
    try:
        return resolve_model_dir("mpnet-base")
    except UserError as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (CI's `make test` should have assembled it)")
        pytest.skip(str(e))


def write_model(folder: Path, vocab_size: int, seed: int = 0, **overrides) -> Path:
    """A random MPNetModel of non-default sizes saved by transformers, noise on every weight (the
    relative-position bias included), so a wrong slice or a wrong bucket shows."""
    torch.manual_seed(seed)
    config = transformers.MPNetConfig(
        vocab_size=vocab_size,
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=H,
        intermediate_size=F,
        max_position_embeddings=MAX_TOKENS + 2,
        layer_norm_eps=1e-5,
        initializer_range=0.2,
        **overrides,
    )
    model = transformers.MPNetModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tokenizer(folder: Path) -> Path:
    """MPNetTokenizerFast over a small lower-cased WordPiece vocabulary, saved by transformers itself."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>", *WORDS, ".", ",", "##s", "z", "##e", "##b", "##ra"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.MPNetTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def long_padded_pairs(vocab_size: int):
    """padded_pairs, and a second batch long enough (45 tokens) to reach MPNet's logarithmic buckets."""
    ids, _, mask = padded_pairs(vocab_size, 1)
    g = torch.Generator().manual_seed(3)
    long_ids = torch.randint(2, vocab_size, (2, 45), generator=g)
    long_mask = torch.ones_like(long_ids)
    long_mask[1, 30:] = 0
    return [(ids, mask), (long_ids.masked_fill(long_mask == 0, 1), long_mask)]


# ---- the real all-mpnet-base-v2 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    folder = real_mpnet()
    return folder, load_pretrained(folder).eval(), transformers.MPNetModel.from_pretrained(folder).eval()


def test_real_mpnet_matches_transformers_with_and_without_a_head_mask(real):
    folder, ours, hf = real
    c = ours.config
    assert (c.num_layers, c.num_heads, c.hidden_size, c.relative_attention_buckets) == (12, 12, 768, 32)
    a = ["The movie was very good.", "A gripping, well-acted drama that loses its way late.", "ok", "Café déjà vu!"]
    b = ["Nice acting", "I wanted to like it more than I did, but it never works out.", "bad", "fine"]
    batch = Tokenizer.from_dir(folder, max_length=24).encode(a, b)
    real_tokens = batch["attention_mask"].bool()
    assert not real_tokens.all() and real_tokens[1].all()  # padded, and one pair truncated to 24
    head_mask = torch.rand(12, 12, generator=torch.Generator().manual_seed(1))
    head_mask[0, 3] = head_mask[5, :6] = head_mask[11, 11] = 0.0
    for hm in (None, head_mask):
        with torch.no_grad():
            got = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], head_mask=hm)
            want = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], head_mask=hm)
        error = (got - want.last_hidden_state)[real_tokens].abs().max().item()
        print(f"all-mpnet-base-v2, head mask {hm is not None}: max |hidden - HF| = {error:.1e}")
        assert error < 1e-4


def test_real_token_ids_equal_mpnet_tokenizer_fast_on_truncated_pairs():
    folder = real_mpnet()
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == "MPNetTokenizerFast"
    texts = (
        ["The movie was VERY good", "Naïve résumé of a café, déjà vu", "x", "an unseen wordpiece: zebroid"],
        ["nice acting, a long long long second sentence that gets truncated", "ok", "THE PLOT", "y z"],
    )
    for max_length in (7, 12, 64):
        ours = Tokenizer.from_dir(folder, max_length=max_length)
        assert ours.pad_id == hf.pad_token_id == 1
        for args in ((texts[0],), texts):
            got = [ids for ids, _ in ours.encode_unpadded(*args)]
            assert got == hf(*args, truncation=True, max_length=max_length)["input_ids"], (max_length, len(args))
    ids, _ = Tokenizer.from_dir(folder).encode_unpadded(["good movie"], ["bad"])[0]
    a, b = (hf(t, add_special_tokens=False)["input_ids"] for t in ("good movie", "bad"))
    assert ids == [0, *a, 2, 2, *b, 2]  # <s> A </s></s> B </s>


def test_the_alias_names_the_make_command_when_the_model_is_not_assembled(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))  # an environment where nothing was assembled
    with pytest.raises(UserError, match=r"'mpnet-base' is not assembled in .*: run make mpnet") as e:
        resolve_model_dir("mpnet-base")
    assert "\n" not in str(e.value)
    folder = tmp_path / "models" / "all-mpnet-base-v2"
    write_model(folder, 37)
    assert resolve_model_dir("mpnet-base") == folder


# ---- random models of non-default sizes -------------------------------------------------------------


def test_buckets_equal_transformers_past_the_max_distance():
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    T = 300  # offsets up to 299: exact, logarithmic and clipped (>= 128) buckets, both directions
    position = torch.arange(T)
    want = MPNetEncoder.relative_position_bucket(position[None, :] - position[:, None], num_buckets=32)
    got = relative_buckets(T, 32, torch.device("cpu"))
    # every bucket is reached but 16: offset 0 of the upper half ("key after the query") cannot happen
    assert torch.equal(got, want) and set(got.unique().tolist()) == set(range(32)) - {16}


def test_random_mpnet_matches_transformers_with_a_head_mask_its_gradient_and_pruning(tmp_path):
    vocab = 37
    folder = write_model(tmp_path, vocab)
    hf = transformers.MPNetModel.from_pretrained(folder, add_pooling_layer=False).eval()
    ours = load_pretrained(folder).eval()
    assert ours.config.layer_norm_eps == 1e-5 and ours.config.type_vocab_size == 0
    head_mask = torch.rand(L, H, generator=torch.Generator().manual_seed(1))
    head_mask[0, 1] = head_mask[1, 3] = 0.0
    for ids, mask in long_padded_pairs(vocab):
        real = mask.bool()
        weights = torch.randn(*ids.shape, D, generator=torch.Generator().manual_seed(2))
        for hm in (None, head_mask):
            mine = hm.clone().requires_grad_() if hm is not None else None
            theirs = hm.clone().requires_grad_() if hm is not None else None
            got = ours(ids, None, mask, head_mask=mine)
            want = hf(input_ids=ids, attention_mask=mask, head_mask=theirs).last_hidden_state
            assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0), (got - want)[real].abs().max()
            if hm is not None:
                (got * weights * mask[..., None]).sum().backward()
                (want * weights * mask[..., None]).sum().backward()
                assert torch.allclose(mine.grad, theirs.grad, atol=1e-4, rtol=1e-4), (mine.grad, theirs.grad)
        # Pruned = masked: the bias table stays whole; each layer takes its kept heads' columns.
        zero = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
        pruned = prune_encoder(ours, zero, torch.tensor([1.0, 0.0]))
        assert pruned.config.kept_heads == ((0, 2), (2, 3)) and pruned.relative_bias.weight.shape == (32, H)
        with torch.no_grad():
            want = ours(ids, None, mask, head_mask=zero * head_mask, ffn_mask=torch.tensor([1.0, 0.0]))
            assert torch.allclose(pruned(ids, None, mask, head_mask=head_mask)[real], want[real], atol=1e-5)


def test_bf16_training_attention_adds_the_bias():
    """bf16 training on CPU takes `attend`'s math path (for its cheaper dropout): it adds an additive
    mask as SDPA does. A drop probability that rounds to 0 leaves the math path's result comparable."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    bias = torch.randn(2, 3, 9, 9, generator=g).masked_fill(torch.rand(2, 1, 1, 9, generator=g) < 0.3, -math.inf)
    bias[..., 0] = 0.0  # every query keeps a key
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    got = attend(*(t.bfloat16() for t in (q, k, v)), bias, dropout=1e-9)  # the math path (bf16, dropout > 0)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, atol=3e-2)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("relative_attention_num_buckets", 64, "relative_attention_num_buckets is 64; transformers' MPNet uses 32"),
        ("pad_token_id", 0, "pad_token_id is 0; transformers' MPNet pads with id 1"),
    ],
)
def test_what_transformers_hard_codes_is_refused_in_one_line(tmp_path, field, value, message):
    folder = write_model(tmp_path, 37)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(UserError, match=message) as e:
        load_pretrained(folder)
    assert "\n" not in str(e.value)


# ---- the pipeline end to end, and the export in transformers 4 and 5 -------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, sentiment_dir):
    """A tiny random MPNet with its tokenizer: finetune, score, prune at r = 0.3, rewind and fine-tune the
    ticket, export the rewound run as a Hugging Face folder and an ONNX file (checked in ORT first)."""
    tmp = tmp_path_factory.mktemp("mpnet")
    model_dir = write_tokenizer(tmp / "model")
    write_model(model_dir, Tokenizer.from_dir(model_dir).vocab_size)
    train = ("--task", "csv", "--data-dir", sentiment_dir, "--model", model_dir, "--batch-size", 16, "--lr", 5e-3)
    train += ("--device", "cpu", "--max-length", 16, "--train-size", 64)
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
    return tmp


def test_pipeline_export_loads_in_transformers_4_with_st_logits(pipeline):
    model, _ = load_checkpoint(pipeline / "rewound")
    assert 0 < sum(map(len, model.encoder.config.kept_heads)) < L * H  # rewound physically pruned
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        pipeline / "hf", output_loading_info=True
    )
    assert type(hf).__name__ == "MPNetForSequenceClassification" and not any(info.values()), info
    enc = transformers.AutoTokenizer.from_pretrained(pipeline / "hf")(
        *PAIRS, padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    batch, ours = st_logits(pipeline)
    assert torch.equal(enc["input_ids"], batch["input_ids"])
    with torch.no_grad():
        error = (hf.eval()(**enc).logits - ours).abs().max().item()
    print(f"mpnet: max |logits - transformers 4| = {error:.1e}")
    assert error < 1e-5
    back, _ = load_hf_classifier(pipeline / "hf", remove_zeros=True)  # back into st, as the small model
    assert back.encoder.config.kept_heads == model.encoder.config.kept_heads
    with torch.no_grad():
        again = back.eval()(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert torch.allclose(again, ours, atol=1e-6)
    assert (onnx_logits(pipeline / "model.onnx", batch) - ours).abs().max().item() < 1e-4
    # transformers' MPNet prunes q/k/v/o but not its bias table, so its own pruned model fails in forward:
    # st refuses that layout for MPNet rather than write a folder transformers cannot run.
    with pytest.raises(UserError, match="pruned-heads layout does not exist for mpnet"):
        export_hf(model, pipeline / "hf-pruned-heads", layout="pruned-heads")


def test_pipeline_export_loads_in_transformers_5_with_st_logits(pipeline):
    target = Path(os.environ.get("ST_TRANSFORMERS5", ROOT / ".venv" / "tf5"))
    if not (target / "transformers").is_dir():
        pytest.fail(f"transformers 5 is not installed in {target}: run `make test` (its set-up installs it)")
    batch, expected = st_logits(pipeline)
    batch.pop("token_type_ids")  # MPNet takes none
    folder = str(pipeline / "hf")
    run = subprocess.run(
        [sys.executable, "-c", TF5, json.dumps({folder: {k: v.tolist() for k, v in batch.items()}})],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["version"].startswith("5.") and out[folder]["class"] == "MPNetForSequenceClassification"
    error = (expected - torch.tensor(out[folder]["logits"])).abs().max().item()
    print(f"mpnet: max |logits - transformers 5| = {error:.1e}")
    assert error < 1e-5
