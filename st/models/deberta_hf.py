"""DeBERTa-v2/v3's Hugging Face side: which HF tensors make each of ours, and config.json both ways.

`st.models.families` makes these its DEBERTA_V2 row (`model_type: deberta-v2`, v2 and v3 alike). Names and
defaults are transformers 4.57.6's (modeling_deberta_v2.py, configuration_deberta_v2.py). What its config
can ask for and `st.models.deberta` does not implement is refused here, one line each, never ignored.
"""

from __future__ import annotations

from st.errors import UserError
from st.models.deberta import DebertaV2Config

# Each layer's tensors (ours -> the HF modules they are made of; Q, K and V are concatenated, in that order).
_LAYER = {
    "attention.qkv": ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
    "attention.pos_k": ("attention.self.pos_key_proj",),
    "attention.pos_q": ("attention.self.pos_query_proj",),
    "attention.out": ("attention.output.dense",),
    "attention_norm": ("attention.output.LayerNorm",),
    "ffn.up": ("intermediate.dense",),
    "ffn.down": ("output.dense",),
    "ffn_norm": ("output.LayerNorm",),
}


def deberta_key_table(c: DebertaV2Config) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the HF names (under `deberta.`) it is made of, for this config's options."""
    table = {
        "embeddings.word.weight": ("embeddings.word_embeddings.weight",),
        "embeddings.norm.weight": ("embeddings.LayerNorm.weight",),
        "embeddings.norm.bias": ("embeddings.LayerNorm.bias",),
    }
    if c.position_biased_input:
        table["embeddings.position.weight"] = ("embeddings.position_embeddings.weight",)
    if c.type_vocab_size:
        table["embeddings.token_type.weight"] = ("embeddings.token_type_embeddings.weight",)
    if c.embedding_size not in (None, c.hidden_size):
        table["embeddings.project.weight"] = ("embeddings.embed_proj.weight",)  # HF's has no bias
    if c.relative_attention:  # one table for all layers, whole however the heads are pruned
        table["rel_embeddings.weight"] = ("encoder.rel_embeddings.weight",)
    if c.norm_rel_ebd == "layer_norm":
        table.update({f"rel_norm.{p}": (f"encoder.LayerNorm.{p}",) for p in ("weight", "bias")})
    skip = {f"attention.{name}" for name in ("pos_k", "pos_q") if name not in c.positional_projections}
    for i in range(c.num_layers):
        for ours, modules in _LAYER.items():
            if ours not in skip:
                for p in ("weight", "bias"):
                    table[f"layers.{i}.{ours}.{p}"] = tuple(f"encoder.layer.{i}.{m}.{p}" for m in modules)
    return table


def deberta_unused_keys(c: DebertaV2Config) -> tuple[str, ...]:
    """DeBERTa-v2/v3 checkpoints keep an absolute position table that position_biased_input=false leaves
    unused (transformers ignores it too)."""
    return () if c.position_biased_input else ("embeddings.position_embeddings.weight",)


# Our pooler.* and classifier.* -> DebertaV2ForSequenceClassification's ContextPooler and classifier.
DEBERTA_HEAD = {
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
    "classifier.out.weight": "classifier.weight",
    "classifier.out.bias": "classifier.bias",
}

_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _terms(value, field: str) -> list[str]:
    """HF writes pos_att_type and norm_rel_ebd as "a|b" strings or lists (pos_att_type may be null)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [x.strip() for x in value.lower().split("|") if x.strip()]
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return [x.strip().lower() for x in value]
    raise UserError(f"{field} is {value!r}; it must be a '|'-separated string or a list of names")


def read_deberta_config(hf: dict) -> dict:
    """DebertaV2Config fields from a DeBERTa-v2/v3 config.json (DebertaV2Config's defaults where absent)."""
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise UserError(f"it lacks {missing[0]}; it is not a complete deberta-v2 config")
    # The fields computed with here, checked first (DebertaV2Config checks the rest): a hand-edited "768"
    # is one line, not a TypeError.
    for field in ("hidden_size", "num_attention_heads"):
        if type(hf[field]) is not int or hf[field] < 1:
            raise UserError(f"the model config's {field} must be a positive whole number, got {hf[field]!r}")
    for field in ("conv_kernel_size", "attention_head_size", "pooler_hidden_size", "embedding_size"):
        if hf.get(field) is not None and type(hf[field]) is not int:
            raise UserError(f"the model config's {field} must be a whole number, got {hf[field]!r}")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    refused = (
        (hf.get("hidden_act", "gelu") != "gelu", f"hidden_act is {hf.get('hidden_act')!r}; st's DeBERTa uses 'gelu'"),
        (
            (hf.get("conv_kernel_size") or 0) > 0,
            "conv_kernel_size > 0 asks for the v2-xlarge convolution layer, which st does not implement",
        ),
        (
            hf.get("attention_head_size", D // H) != D // H,
            f"attention_head_size {hf.get('attention_head_size')!r} is not hidden_size / num_attention_heads, "
            "which st requires",
        ),
        (
            hf.get("pooler_hidden_size", D) != D,
            f"pooler_hidden_size {hf.get('pooler_hidden_size')!r} differs from hidden_size {D}; transformers' "
            "classifier reads hidden_size features, so st supports only the two equal",
        ),
        (
            (hf.get("pooler_dropout") or 0) != 0,
            f"pooler_dropout is {hf.get('pooler_dropout')!r}; st's pooler has no dropout before its dense layer "
            "(0 in the DeBERTa-v2/v3 checkpoints)",
        ),
    )
    for refuse, why in refused:
        if refuse:
            raise UserError(why)
    norm = _terms(hf.get("norm_rel_ebd", "none"), "norm_rel_ebd")
    if set(norm) - {"none", "layer_norm"}:
        raise UserError(f"norm_rel_ebd is {hf['norm_rel_ebd']!r}; st supports 'none' and 'layer_norm'")
    E = hf.get("embedding_size") or D
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=D,
        num_layers=hf["num_hidden_layers"],
        num_heads=H,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 0),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-7),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id", 0) or 0,
        embedding_size=None if E == D else E,
        position_biased_input=hf.get("position_biased_input", True),
        relative_attention=hf.get("relative_attention", False),
        position_buckets=hf.get("position_buckets", -1),
        max_relative_positions=hf.get("max_relative_positions", -1),
        pos_att_type=tuple(_terms(hf.get("pos_att_type"), "pos_att_type")),
        share_att_key=hf.get("share_att_key", False),
        norm_rel_ebd="layer_norm" if "layer_norm" in norm else "none",
        pooler_hidden_act=hf.get("pooler_hidden_act", "gelu"),
    )


def deberta_config_fields(c: DebertaV2Config) -> dict:
    return {
        "model_type": "deberta-v2",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": c.hidden_dropout,
        "attention_probs_dropout_prob": c.attention_dropout,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "initializer_range": c.initializer_range,
        "layer_norm_eps": c.layer_norm_eps,
        "pad_token_id": c.pad_token_id,
        "embedding_size": c.embedding_size or c.hidden_size,
        "position_biased_input": c.position_biased_input,
        "relative_attention": c.relative_attention,
        "position_buckets": c.position_buckets,
        "max_relative_positions": c.max_relative_positions,
        "pos_att_type": list(c.pos_att_type),
        "share_att_key": c.share_att_key,
        "norm_rel_ebd": c.norm_rel_ebd,
        "pooler_hidden_size": c.hidden_size,
        "pooler_hidden_act": c.pooler_hidden_act,
        "pooler_dropout": 0,
    }
