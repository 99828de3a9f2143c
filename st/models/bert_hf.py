"""The BERT families' Hugging Face side (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, MPNet): which HF
tensors make each of ours, and config.json both ways. `st.models.families` makes these its rows; the
encoder is `st.models.bert`'s for all of them.
"""

from __future__ import annotations

from st.errors import UserError
from st.models.bert import BertConfig

# Each layer's tensors (ours -> the HF modules they are made of; Q, K and V are concatenated, in that order).
_BERT_LAYER = {
    "attention.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attention.out": ("attention.output.dense",),
    "attention_norm": ("attention.output.LayerNorm",),
    "ffn.up": ("intermediate.dense",),
    "ffn.down": ("output.dense",),
    "ffn_norm": ("output.LayerNorm",),
}
_DISTILBERT_LAYER = {
    "attention.qkv": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    "attention.out": ("attention.out_lin",),
    "attention_norm": ("sa_layer_norm",),
    "ffn.up": ("ffn.lin1",),
    "ffn.down": ("ffn.lin2",),
    "ffn_norm": ("output_layer_norm",),
}


def _layer_table(c: BertConfig, hf_layers: str, layer: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """`layer`'s names for every layer: layers.{i}.<ours>.{weight,bias} -> <hf_layers>{i}.<HF module>.{weight,bias}."""
    return {
        f"layers.{i}.{ours}.{p}": tuple(f"{hf_layers}{i}.{module}.{p}" for module in modules)
        for i in range(c.num_layers)
        for p in ("weight", "bias")
        for ours, modules in layer.items()
    }


def bert_key_table(c: BertConfig) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the HF names it is made of (Q, K and V are concatenated, in that order).
    BERT, RoBERTa, XLM-R and ELECTRA share these names."""
    table = {
        "embeddings.word.weight": ("embeddings.word_embeddings.weight",),
        "embeddings.position.weight": ("embeddings.position_embeddings.weight",),
        "embeddings.token_type.weight": ("embeddings.token_type_embeddings.weight",),
        "embeddings.norm.weight": ("embeddings.LayerNorm.weight",),
        "embeddings.norm.bias": ("embeddings.LayerNorm.bias",),
    }
    if not c.type_vocab_size:
        del table["embeddings.token_type.weight"]
    table.update(_layer_table(c, "encoder.layer.", _BERT_LAYER))
    return table


def electra_key_table(c: BertConfig) -> dict[str, tuple[str, ...]]:
    table = bert_key_table(c)
    if c.embedding_size not in (None, c.hidden_size):  # ElectraModel.embeddings_project, outside "embeddings."
        table.update({f"embeddings.project.{p}": (f"embeddings_project.{p}",) for p in ("weight", "bias")})
    return table


_MPNET_LAYER = {
    "attention.qkv": ("attention.attn.q", "attention.attn.k", "attention.attn.v"),
    "attention.out": ("attention.attn.o",),
    "attention_norm": ("attention.LayerNorm",),
    "ffn.up": ("intermediate.dense",),
    "ffn.down": ("output.dense",),
    "ffn_norm": ("output.LayerNorm",),
}


def mpnet_key_table(c: BertConfig) -> dict[str, tuple[str, ...]]:
    table = {
        "embeddings.word.weight": ("embeddings.word_embeddings.weight",),
        "embeddings.position.weight": ("embeddings.position_embeddings.weight",),
        "embeddings.norm.weight": ("embeddings.LayerNorm.weight",),
        "embeddings.norm.bias": ("embeddings.LayerNorm.bias",),
        "relative_bias.weight": ("encoder.relative_attention_bias.weight",),  # buckets,H0: whole, however pruned
    }
    table.update(_layer_table(c, "encoder.layer.", _MPNET_LAYER))
    return table


def distilbert_key_table(c: BertConfig) -> dict[str, tuple[str, ...]]:
    table = {
        "embeddings.word.weight": ("embeddings.word_embeddings.weight",),
        "embeddings.position.weight": ("embeddings.position_embeddings.weight",),
        "embeddings.norm.weight": ("embeddings.LayerNorm.weight",),
        "embeddings.norm.bias": ("embeddings.LayerNorm.bias",),
    }
    table.update(_layer_table(c, "transformer.layer.", _DISTILBERT_LAYER))
    return table


# ---- config.json, both ways ---------------------------------------------------------------------

_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def read_bert_config(hf: dict) -> dict:
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError("st supports hidden_act 'gelu' with absolute position embeddings")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise UserError(f"it lacks {missing[0]}; it is not a complete {hf['model_type']} config")
    return dict(
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
        model_type=hf["model_type"],
    )


def read_roberta_config(hf: dict) -> dict:
    # RobertaConfig's defaults differ from BERT's: pad 1, one token type, eps 1e-5 (always written in practice).
    hf = {"pad_token_id": 1, "type_vocab_size": 1, **hf}
    return {**read_bert_config(hf), "pad_token_id": hf["pad_token_id"], "positions_after_padding": True}


def read_electra_config(hf: dict) -> dict:
    fields = read_bert_config(hf)
    E = hf.get("embedding_size", 128)  # ElectraConfig's default
    return {**fields, "embedding_size": None if E == fields["hidden_size"] else E}


def read_distilbert_config(hf: dict) -> dict:
    if hf.get("activation", "gelu") != "gelu":
        raise UserError("st supports activation 'gelu'")
    renamed = {
        "dim": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "hidden_dim": "intermediate_size",
    }
    missing = [k for k in ("vocab_size", *renamed) if k not in hf]
    if missing:
        raise UserError(f"it lacks {missing[0]}; it is not a complete distilbert config")
    bert_like = {renamed.get(k, k): v for k, v in hf.items() if k not in ("hidden_act", "position_embedding_type")}
    fields = read_bert_config(
        {
            **bert_like,
            "hidden_dropout_prob": hf.get("dropout", 0.1),
            "attention_probs_dropout_prob": hf.get("attention_dropout", 0.1),
        }
    )
    # DistilBERT has no token types, and its LayerNorm eps is fixed at 1e-12 in HF's code, not in the config.
    return {
        **fields,
        "type_vocab_size": 0,
        "layer_norm_eps": 1e-12,
        "sinusoidal_positions": bool(hf.get("sinusoidal_pos_embds", False)),
    }


# transformers' MPNetEncoder.compute_position_bias uses 32 buckets whatever the config says (a larger
# table's extra rows go unused, a smaller one fails), and MPNetEmbeddings pads with id 1 whatever
# pad_token_id says: st follows the code, so a config that says otherwise is refused, not misread.
MPNET_BUCKETS, MPNET_PAD = 32, 1


def read_mpnet_config(hf: dict) -> dict:
    buckets, pad = hf.get("relative_attention_num_buckets", MPNET_BUCKETS), hf.get("pad_token_id", MPNET_PAD)
    if buckets != MPNET_BUCKETS:
        raise UserError(
            f"relative_attention_num_buckets is {buckets!r}; transformers' MPNet uses {MPNET_BUCKETS}, as st"
        )
    if pad != MPNET_PAD:
        raise UserError(f"pad_token_id is {pad!r}; transformers' MPNet pads with id {MPNET_PAD}, as st")
    # MPNetConfig's defaults: eps 1e-12, 512 positions (read_bert_config's); no token types.
    return {
        **read_bert_config(hf),
        "type_vocab_size": 0,
        "pad_token_id": MPNET_PAD,
        "positions_after_padding": True,
        "relative_attention_buckets": MPNET_BUCKETS,
    }


def bert_config_fields(c: BertConfig) -> dict:
    fields = {
        "model_type": c.model_type,
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
        "position_embedding_type": "absolute",
    }
    if c.model_type == "electra":
        fields["embedding_size"] = c.embedding_size or c.hidden_size
    return fields


def mpnet_config_fields(c: BertConfig) -> dict:
    fields = bert_config_fields(c)
    for name in ("type_vocab_size", "position_embedding_type"):  # not MPNetConfig's
        del fields[name]
    return {**fields, "relative_attention_num_buckets": c.relative_attention_buckets}


def distilbert_config_fields(c: BertConfig) -> dict:
    return {
        "model_type": "distilbert",
        "vocab_size": c.vocab_size,
        "dim": c.hidden_size,
        "n_layers": c.num_layers,
        "n_heads": c.num_heads,
        "hidden_dim": c.intermediate_size,
        "activation": "gelu",
        "dropout": c.hidden_dropout,
        "attention_dropout": c.attention_dropout,
        "max_position_embeddings": c.max_position_embeddings,
        "sinusoidal_pos_embds": c.sinusoidal_positions,
        "initializer_range": c.initializer_range,
        "pad_token_id": c.pad_token_id,
    }
