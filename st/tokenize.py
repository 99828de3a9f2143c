"""Tokenisation through the `tokenizers` library, matching the family's HF fast tokenizer.

A folder's tokenizer.json gives the model (WordPiece for BERT, ELECTRA and DistilBERT, byte-level BPE
for RoBERTa, Unigram for XLM-R) and the pair template (`[CLS] A [SEP] B [SEP]`, RoBERTa's
`<s> A </s></s> B </s>`); tokenizer_config.json overrides it where HF's fast tokenizers let it
(lower-casing, accents, add_prefix_space). A folder with only vocab.txt is a BERT WordPiece.

Tokenise a whole dataset once with `encode_unpadded`, then pad per batch with `collate`;
`encode` does both for a single batch.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, normalizers, pre_tokenizers, processors

from st.errors import UserError
from st.io import copy_file

# The files that make a tokenizer; checkpoints and exports carry copies so they need nothing else.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

Item = tuple[list[int], list[int]]  # (input_ids, token_type_ids) of one example, unpadded


# What st reads of tokenizer_config.json, and the kinds of value it takes (a special token, "*_token",
# is a string or an AddedToken {"content": ...}); special_tokens_map.json holds special tokens only.
CONFIG_KINDS = {
    "do_lower_case": (bool,),
    "strip_accents": (bool, type(None)),
    "tokenize_chinese_chars": (bool,),
    "add_prefix_space": (bool,),
    "model_max_length": (int, float),
}


def _read_config(folder: Path) -> dict:
    """tokenizer_config.json, checked (and special_tokens_map.json, checked though st reads its tokens
    from the tokenizer files): a damaged file is one line naming it and what is wrong, not a traceback."""
    _read_object(folder / "special_tokens_map.json")
    return _read_object(folder / "tokenizer_config.json")


def _read_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    fix = "restore it from the model's source"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    for key, value in data.items():
        if key.endswith("_token") or key == "additional_special_tokens":
            tokens = value if key == "additional_special_tokens" and isinstance(value, list) else [value]
            if not all(t is None or isinstance(t, str) or isinstance(_token(t), str) for t in tokens):
                raise UserError(f'{path}: {key} is {value!r}, not a token (a string, or {{"content": ...}}); {fix}')
        elif key in CONFIG_KINDS and not _is_kind(value, CONFIG_KINDS[key]):
            kinds = " or ".join("null" if k is type(None) else k.__name__ for k in CONFIG_KINDS[key])
            raise UserError(f"{path}: {key} is {value!r}, where a {kinds} belongs; {fix}")
    return data


def _is_kind(value, kinds: tuple) -> bool:
    # a bool is an int to isinstance; here it is only what asks for a bool
    return (bool in kinds) if isinstance(value, bool) else isinstance(value, kinds)


def _from_vocab(vocab_file: Path, cfg: dict, specials: dict[str, str]) -> Backend:
    # Read vocab.txt the way HF's BertTokenizer does (strip only "\n", a repeated line keeps
    # its last index), so ids agree even on odd vocab files.
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    except UnicodeDecodeError:
        raise UserError(f"{vocab_file} is not UTF-8 text; restore it from the model's source") from None
    missing = [t for t in (specials["unk"], specials["cls"], specials["sep"], specials["pad"]) if t not in vocab]
    if missing:
        raise UserError(f"{vocab_file} lacks the special tokens {missing}: is this a BERT vocabulary?")
    tok = Backend(models.WordPiece(vocab, unk_token=specials["unk"], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=cfg.get("tokenize_chinese_chars", True),
        strip_accents=cfg.get("strip_accents"),
        lowercase=cfg.get("do_lower_case", True),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = specials["cls"], specials["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    # HF registers the special tokens as added tokens, so "[SEP]" typed in a text stays one token.
    tok.add_special_tokens([t for t in specials.values() if t in vocab])
    return tok


def _follow_config(tok: Backend, cfg: dict) -> None:
    # HF's fast tokenizers set the pre-tokenizer's add_prefix_space from tokenizer_config.json,
    # False when absent (PreTrainedTokenizerFast.__init__); it decides RoBERTa's first-word ids.
    if isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel):
        tok.pre_tokenizer.add_prefix_space = bool(cfg.get("add_prefix_space", False))
    # tokenizer_config.json wins over tokenizer.json's normalizer, as in HF's BertTokenizerFast:
    # a cased model shipped with a lower-casing tokenizer.json must still be cased.
    if not isinstance(tok.normalizer, normalizers.BertNormalizer):
        return
    state = json.loads(tok.normalizer.__getstate__())
    want = {
        "lowercase": cfg.get("do_lower_case", True),
        "strip_accents": cfg.get("strip_accents"),
        "handle_chinese_chars": cfg.get("tokenize_chinese_chars", True),
    }
    if any(state.get(k, v) != v for k, v in want.items()):
        state.pop("type")
        tok.normalizer = normalizers.BertNormalizer(**{**state, **want})


def _token(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken {"content": ...}
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """The tokenizer.json's model and pair template (e.g. [CLS] A [SEP] (B [SEP])), longest-first
    truncation to `max_length`."""

    def __init__(self, backend: Backend, pad_id: int, max_length: int):
        specials = backend.num_special_tokens_to_add(is_pair=True)
        if max_length < max(specials, 1):
            raise UserError(
                f"max_length is {max_length}: it must be at least {specials} to fit a pair's special tokens"
            )
        self.backend, self.pad_id, self.max_length = backend, pad_id, max_length
        backend.no_padding()  # tokenizer.json may ask for fixed padding; we pad per batch in `collate`
        backend.enable_truncation(max_length, strategy="longest_first")

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int = 128) -> "Tokenizer":
        folder = Path(path)
        cfg = _read_config(folder)
        defaults = {"unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}
        specials = {k: str(_token(cfg.get(f"{k}_token")) or v) for k, v in defaults.items()}
        if (folder / "tokenizer.json").is_file():
            try:
                backend = Backend.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the Rust side raises a bare Exception on a bad file
                raise UserError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
            if not isinstance(backend.model, (models.WordPiece, models.BPE, models.Unigram)):
                raise UserError(
                    f"{folder / 'tokenizer.json'} has a {type(backend.model).__name__} model; "
                    "st reads WordPiece, byte-level BPE and Unigram tokenizers"
                )
            _follow_config(backend, cfg)
            if "pad_token" not in cfg and backend.token_to_id(specials["pad"]) is None:
                specials["pad"] = "<pad>"  # RoBERTa-style vocabularies without a tokenizer_config.json
        elif (folder / "vocab.txt").is_file():
            backend = _from_vocab(folder / "vocab.txt", cfg, specials)
        elif spm := next((n for n in ("spm.model", "sentencepiece.bpe.model") if (folder / n).is_file()), None):
            # DeBERTa-v3 checkpoints ship only SentencePiece's model; transformers converts it to tokenizer.json
            raise UserError(
                f"{folder} has SentencePiece's {spm} but no tokenizer.json, which st reads: write it with "
                f"`python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('{folder}')"
                f".save_pretrained('{folder}')\"` (needs transformers, sentencepiece and protobuf)"
            )
        else:
            raise UserError(
                f"{folder} has no tokenizer: expected tokenizer.json or vocab.txt (with an optional "
                "tokenizer_config.json)"
            )
        pad_id = backend.token_to_id(specials["pad"])
        if pad_id is None:
            raise UserError(f"the tokenizer in {folder} has no {specials['pad']} token to pad with")
        return cls(backend, pad_id, max_length)

    @property
    def vocab_size(self) -> int:
        # Largest id + 1, i.e. the embedding rows needed, even if the vocabulary has holes.
        return max(self.backend.get_vocab(with_added_tokens=True).values()) + 1

    def encode_unpadded(self, texts_a: list[str], texts_b: list[str] | None = None) -> list[Item]:
        if texts_b is not None and len(texts_b) != len(texts_a):
            raise ValueError(f"{len(texts_a)} first texts but {len(texts_b)} second texts")
        inputs = list(texts_a) if texts_b is None else list(zip(texts_a, texts_b))
        return [(e.ids, e.type_ids) for e in self.backend.encode_batch(inputs)]

    def encode(self, texts_a: list[str], texts_b: list[str] | None = None) -> dict[str, torch.Tensor]:
        return collate(self.encode_unpadded(texts_a, texts_b), self.pad_id)


def collate(items: list[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: input_ids, token_type_ids, attention_mask, each (B, T)."""
    T = max(len(ids) for ids, _ in items)
    pad = [T - len(ids) for ids, _ in items]
    return {
        "input_ids": torch.tensor([ids + [pad_id] * n for (ids, _), n in zip(items, pad)], dtype=torch.long),
        "token_type_ids": torch.tensor([tt + [0] * n for (_, tt), n in zip(items, pad)], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * n for (ids, _), n in zip(items, pad)], dtype=torch.long),
    }


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str) -> None:
    """Ids beyond the embedding table would crash on GPU with an unreadable device assert."""
    if tokenizer.vocab_size > model_vocab_size:
        raise UserError(
            f"tokenizer in {where} has {tokenizer.vocab_size} tokens but the model's embeddings have "
            f"{model_vocab_size} rows: the tokenizer and weights come from different models"
        )


def copy_tokenizer(source: str | Path, dest: str | Path) -> None:
    """Copy the tokenizer files of folder `source` that exist into `dest`."""
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if source.resolve() == dest.resolve():
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            copy_file(source / name, dest / name)
