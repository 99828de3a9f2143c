"""RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT: parity with transformers 4.57.6 on random models built by
transformers (hidden states, a head mask and its gradients), tokenizer ids equal to each family's HF fast
tokenizer, and the paper's pipeline end to end (finetune, score, prune, rewind, export) with the exported
folder loading in transformers 4 and 5 in the family's own class, with st's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from st.errors import UserError
from st.export import export_hf, load_hf_classifier
from st.models import load_checkpoint, load_pretrained
from st.models.bert import sinusoidal_table
from st.models.families import FAMILIES
from st.tokenize import Tokenizer
from tests.conftest import WORDS

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
NEW = ("roberta", "xlm-roberta", "electra", "distilbert")
L, H, D, F = 2, 4, 24, 40
MAX_TOKENS = 20  # few positions, so a wrong offset runs off the table
CORPUS = [f"{a} {b}, {c} {d}." for a in WORDS for b, c, d in zip(WORDS[3:], WORDS[5:], WORDS[::-1])] + [
    "Café déjà vu: naïve résumé!",
    "the movie was very good",
    "THE PLOT WAS AWFUL",
    "an unseen wordpiece zebra",
]
PAIRS = (
    ["the movie was very good", "awful plot , sad acting and a zebra", "Café fine", "x"],
    ["nice acting", "the movie was very very very good , great and nice", "déjà vu", "THE PLOT"],
)


def hf_config(family: str, vocab_size: int, pad: int):
    """A small, non-default config: odd pad id, few positions, eps 1e-5, ELECTRA's E != D."""
    common = dict(
        vocab_size=vocab_size, pad_token_id=pad, initializer_range=0.2
    )  # task heads big enough to show errors
    bert_like = dict(
        common, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F, layer_norm_eps=1e-5
    )
    if family in ("roberta", "xlm-roberta"):
        cls = transformers.RobertaConfig if family == "roberta" else transformers.XLMRobertaConfig
        return cls(
            **bert_like, max_position_embeddings=MAX_TOKENS + pad + 1, type_vocab_size=1, bos_token_id=0, eos_token_id=2
        )
    if family == "electra":
        return transformers.ElectraConfig(
            **bert_like, embedding_size=16, max_position_embeddings=MAX_TOKENS, type_vocab_size=3
        )
    return transformers.DistilBertConfig(
        **common,
        dim=D,
        n_layers=L,
        n_heads=H,
        hidden_dim=F,
        max_position_embeddings=MAX_TOKENS,
        sinusoidal_pos_embds=True,
    )


def write_model(folder: Path, family: str, vocab_size: int, pad: int, seed: int = 0) -> Path:
    """A random encoder saved by transformers, with noise on every weight so a wrong slice shows."""
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(hf_config(family, vocab_size, pad), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_embeddings" not in name or family != "distilbert":  # keep DistilBERT's table sinusoidal
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tokenizer(folder: Path, family: str) -> Path:
    """Each family's HF fast tokenizer, trained here on local text and saved by transformers itself."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceUnigramTokenizer, processors

    folder.mkdir(parents=True, exist_ok=True)
    if family == "roberta":  # byte-level BPE; <pad> at id 3, not RoBERTa's 1
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<unk>", "</s>", "<pad>", "<mask>"]
        )
        bpe.save_model(str(folder))
        hf = transformers.RobertaTokenizerFast(
            vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")
        )
    elif family == "xlm-roberta":  # Unigram, with XLM-R's <s> A </s></s> B </s> template
        uni = SentencePieceUnigramTokenizer()
        uni.train_from_iterator(
            CORPUS, vocab_size=70, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>"
        )
        uni.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        uni.save(str(folder / "raw.json"))
        hf = transformers.XLMRobertaTokenizerFast(tokenizer_file=str(folder / "raw.json"))
    else:  # WordPiece from a vocab.txt, cased for DistilBERT
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ",", "##s", "z", "##e", "##b", "##ra"]
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        cls = transformers.ElectraTokenizerFast if family == "electra" else transformers.DistilBertTokenizerFast
        hf = cls(vocab_file=str(folder / "vocab.txt"), do_lower_case=family == "electra")
    hf.save_pretrained(folder)
    return folder


# ---- the encoder against transformers -----------------------------------------------------------


def padded_pairs(vocab_size: int, pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 11
    ids = torch.randint(0, vocab_size, (B, T), generator=g)
    ids[ids == pad] = pad + 1  # pad ids only where there is padding, as a tokenizer makes them
    mask = torch.ones(B, T, dtype=torch.long)
    types = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate((T, 8, 4)):
        mask[b, n:] = 0
        types[b, n // 2 : n] = 1
    return ids.masked_fill(mask == 0, pad), types, mask


@pytest.mark.parametrize("family", NEW)
def test_encoder_matches_transformers_with_a_head_mask_and_its_gradient(family, tmp_path):
    vocab, pad = 37, 5
    folder = write_model(tmp_path, family, vocab, pad)
    hf = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    ours = load_pretrained(folder).eval()
    if family == "distilbert":  # our own sinusoidal table (for a model built from a config) is HF's
        assert torch.allclose(sinusoidal_table(MAX_TOKENS, D), hf.embeddings.position_embeddings.weight, atol=1e-7)
    assert ours.config.model_type == family and ours.config.layer_norm_eps == (
        1e-12 if family == "distilbert" else 1e-5
    )
    ids, types, mask = padded_pairs(vocab, pad)
    real = mask.bool()
    hf_types = (
        {"token_type_ids": types} if family == "electra" else {}
    )  # RoBERTa's tokenizers pass none; ours are ignored
    head_mask = torch.rand(L, H, generator=torch.Generator().manual_seed(1))
    head_mask[0, 1] = head_mask[1, 3] = 0.0
    weights = torch.randn(*ids.shape, D, generator=torch.Generator().manual_seed(2))
    worst = 0.0
    for hm in (None, head_mask):
        mine = hm.clone().requires_grad_() if hm is not None else None
        theirs = hm.clone().requires_grad_() if hm is not None else None
        got = ours(ids, types, mask, head_mask=mine)
        want = hf(input_ids=ids, attention_mask=mask, head_mask=theirs, **hf_types).last_hidden_state
        worst = max(worst, (got - want)[real].abs().max().item())
        assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)
        if hm is not None:
            (got * weights * mask[..., None]).sum().backward()
            (want * weights * mask[..., None]).sum().backward()
            assert torch.allclose(mine.grad, theirs.grad, atol=1e-4, rtol=1e-4), (mine.grad, theirs.grad)
    print(f"{family}: max |hidden - HF| = {worst:.1e}")


def test_a_tokenizer_larger_than_the_embeddings_is_one_line(tmp_path, sentiment_dir):
    model_dir = write_tokenizer(tmp_path / "model", "roberta")
    write_model(model_dir, "roberta", 40, 3)  # the tokenizer has 300 tokens
    result = CliRunner().invoke(
        cli,
        [
            "finetune",
            "--task",
            "csv",
            "--data-dir",
            str(sentiment_dir),
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        "has 300 tokens but the model's embeddings have 40 rows" in result.output
        and len(result.output.strip().splitlines()) == 1
    )


def test_a_wrong_shape_names_the_key(tmp_path):
    folder = write_model(tmp_path, "electra", 37, 5)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "embedding_size": 12}))
    with pytest.raises(
        UserError, match=r"embeddings.word_embeddings.weight has shape \(37, 16\), config.json implies \(37, 12\)"
    ):
        load_pretrained(folder)


def test_an_unknown_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_model(tmp_path, "distilbert", 37, 5)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.layer.1.attention.z_lin.weight"] = torch.zeros(D, D)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        UserError,
        match=r"unknown key 'transformer.layer.1.attention.z_lin.weight' \(1 unknown in all\); is this a distilbert",
    ):
        load_pretrained(folder)


# ---- tokenizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NEW)
def test_token_ids_equal_the_families_fast_tokenizer(family, tmp_path):
    folder = write_tokenizer(tmp_path, family)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for max_length in (7, 12, 64):
        ours = Tokenizer.from_dir(folder, max_length=max_length)
        assert ours.pad_id == hf.pad_token_id
        for texts in ((PAIRS[0], None), PAIRS):
            got = [ids for ids, _ in ours.encode_unpadded(*texts)]
            want = hf(*texts, truncation=True, max_length=max_length)["input_ids"]
            assert got == want, (max_length, texts[1] is not None)
    if family == "roberta":  # the pair template: <s> A </s></s> B </s>
        ids, _ = ours.encode_unpadded(["good movie"], ["bad"])[0]
        a, b = (hf(t, add_special_tokens=False)["input_ids"] for t in ("good movie", "bad"))
        s, e = hf.convert_tokens_to_ids(["<s>", "</s>"])
        assert ids == [s, *a, e, e, *b, e]


# ---- the pipeline, end to end, and the export in transformers 4 and 5 ------------------------------


def st(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, sentiment_dir):
    """family -> the folder of its pipeline run, run on first use (one transformers 5 process checks all)."""
    done = {}

    def get(family: str) -> Path:
        if family not in done:
            done[family] = run_pipeline(family, tmp_path_factory.mktemp(family), sentiment_dir)
        return done[family]

    return get


def run_pipeline(family: str, tmp: Path, sentiment_dir: Path) -> Path:
    """A tiny random model of the family with its tokenizer: finetune, score, prune at r = 0.3, rewind
    and fine-tune the ticket, export the rewound run as a Hugging Face folder and an ONNX file."""
    model_dir = write_tokenizer(tmp / "model", family)
    tok = Tokenizer.from_dir(model_dir)
    write_model(model_dir, family, tok.vocab_size, tok.pad_id)
    train = (
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        model_dir,
        "--batch-size",
        16,
        "--lr",
        5e-3,
        "--device",
        "cpu",
        "--max-length",
        16,
        "--train-size",
        64,
    )
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
    st(
        "export", "--checkpoint", tmp / "rewound", "--hf", tmp / "hf", "--onnx", tmp / "model.onnx"
    )  # ONNX: checked in ORT first
    st(
        "share",
        "--tasks",
        "csv",
        "--tickets",
        tmp / "ticket.json",
        "--model",
        model_dir,
        "--data-dir",
        f"csv={sentiment_dir}",
        "--epochs",
        1,
        "--batch-size",
        32,
        "--device",
        "cpu",
        "--out",
        tmp / "share",
    )  # ticket sharing (Algorithm 1)
    return tmp


def st_logits(tmp: Path) -> tuple[dict, torch.Tensor]:
    """The rewound model's logits on padded pairs tokenized by st from the exported folder."""
    model, _ = load_checkpoint(tmp / "rewound")
    batch = Tokenizer.from_dir(tmp / "hf", max_length=16).encode(*PAIRS)
    with torch.no_grad():
        return batch, model.eval()(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])


@pytest.mark.parametrize("family", NEW)
def test_pipeline_export_loads_in_transformers_4_with_st_logits(family, pipelines):
    tmp = pipelines(family)
    model, cfg = load_checkpoint(tmp / "rewound")
    assert 0 < sum(map(len, model.encoder.config.kept_heads)) < L * H  # rewound physically pruned (r = 0.3: 2 heads)
    assert (tmp / "model.onnx").stat().st_size > 0 and json.loads((tmp / "share" / "metrics.json").read_text())["dev"][
        "csv"
    ]
    if family == "distilbert":  # the sinusoidal table is never trained
        assert torch.equal(
            model.encoder.embeddings.position.weight, load_pretrained(tmp / "model").embeddings.position.weight
        )
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp / "hf", output_loading_info=True)
    assert type(hf).__name__ == FAMILIES[family].classifier_class and not any(info.values()), info
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp / "hf")
    enc = hf_tok(*PAIRS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    batch, ours = st_logits(tmp)
    assert torch.equal(enc["input_ids"], batch["input_ids"])
    with torch.no_grad():
        theirs = hf.eval()(**enc).logits
    error = (ours - theirs).abs().max().item()
    print(f"{family}: max |logits - transformers 4| = {error:.1e}")
    assert error < 1e-5
    export_hf(model.eval(), tmp / "hf-pruned-heads", layout="pruned-heads")  # transformers 4.x's own head pruning
    pruned_heads = transformers.AutoModelForSequenceClassification.from_pretrained(tmp / "hf-pruned-heads").eval()
    with torch.no_grad():
        assert (pruned_heads(**enc).logits - ours).abs().max().item() < 1e-5
    back, _ = load_hf_classifier(tmp / "hf", remove_zeros=True)  # and back into st, as the small model
    assert back.encoder.config.kept_heads == model.encoder.config.kept_heads
    with torch.no_grad():
        assert torch.equal(back.eval()(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]), ours)


TF5 = """
import json, sys, torch, transformers
transformers.logging.set_verbosity_error()
out = {"version": transformers.__version__}
for folder, batch in json.loads(sys.argv[1]).items():
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits
    out[folder] = {"class": type(model).__name__, "logits": logits.tolist()}
print(json.dumps(out))
"""


def test_pipeline_exports_load_in_transformers_5_with_st_logits(pipelines):
    target = Path(os.environ.get("ST_TRANSFORMERS5", ROOT / ".venv" / "tf5"))
    if not (target / "transformers").is_dir():
        pytest.fail(f"transformers 5 is not installed in {target}: run `make test` (its set-up installs it)")
    batches, expected = {}, {}
    for family in NEW:
        folder = str(pipelines(family) / "hf")
        batch, expected[folder] = st_logits(pipelines(family))
        if family != "electra":
            batch.pop("token_type_ids")  # as the family's HF tokenizer gives it (no token types)
        batches[folder] = {k: v.tolist() for k, v in batch.items()}
    run = subprocess.run(
        [sys.executable, "-c", TF5, json.dumps(batches)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out.pop("version").startswith("5.")
    for family, (folder, got) in zip(NEW, out.items()):
        assert got["class"] == FAMILIES[family].classifier_class
        error = (expected[folder] - torch.tensor(got["logits"])).abs().max().item()
        print(f"{family}: max |logits - transformers 5| = {error:.1e}")
        assert error < 1e-5, family


def test_a_sweep_runs_unchanged_on_another_family(pipelines, sentiment_dir):
    """The phase-transition grid goes through the same pipeline; one family (XLM-R: Unigram, positions
    after the pad id, no pooler) stands for all, to keep the suite short."""
    tmp = pipelines("xlm-roberta")
    st(
        "sweep",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tmp / "model",
        "--epochs",
        1,
        "--batch-size",
        16,
        "--lr",
        5e-3,
        "--max-length",
        16,
        "--train-size",
        64,
        "--ratios",
        0.3,
        "--kinds",
        "winning",
        "--seeds",
        1,
        "--device",
        "cpu",
        "--out",
        tmp / "sweep",
    )
    results = json.loads((tmp / "sweep" / "results.json").read_text())
    assert len(results["runs"]) == 2  # the full model and the winning ticket at r = 0.3
