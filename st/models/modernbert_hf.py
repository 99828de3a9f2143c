"""ModernBERT's Hugging Face side: which HF tensors make each of ours, and config.json both ways.

`st.models.families` makes these its MODERNBERT row (`model_type: modernbert`, also mmBERT's and the
Ettin encoders'). Names and defaults are transformers 4.57.6's (modeling_modernbert.py,
configuration_modernbert.py); transformers 5's `layer_types` and `rope_parameters` are read too. What a
config asks for and `st.models.modernbert` does not implement is refused, one line each, never ignored;
the fields left unread only steer transformers' runtime (compilation, flash attention) or its
masked-LM head (sparse_prediction, decoder_bias), which a classifier does not have.
Dropouts are BERT's: a run sets every encoder dropout (embedding, attention, MLP) to its --dropout
(`ModernBertConfig.with_dropout`) and the task head's to --head-dropout, whatever the checkpoint says;
an exported folder writes them (the head's as classifier_dropout) and `load_hf_classifier` reads them back.
"""

from __future__ import annotations

from st.errors import UserError
from st.models.modernbert import ModernBertConfig

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

_LAYER = {  # ours -> the HF module, under layers.{i}.
    "attention_norm": "attn_norm",  # not in layer 0 (the identity there)
    "attention.qkv": "attn.Wqkv",
    "attention.out": "attn.Wo",
    "ffn.norm": "mlp_norm",
    "ffn.up": "mlp.Wi",
    "ffn.down": "mlp.Wo",
}


def modernbert_key_table(c: ModernBertConfig) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> its HF name under `model.`; biases where the config's flags give them."""
    modules = {"embeddings.norm": "embeddings.norm", "final_norm": "final_norm"}
    for i in range(c.num_layers):
        modules.update({f"layers.{i}.{o}": f"layers.{i}.{h}" for o, h in _LAYER.items() if i or o != "attention_norm"})
    table = {"embeddings.word.weight": ("embeddings.tok_embeddings.weight",)}
    for ours, hf in modules.items():
        bias = c.norm_bias if ours.endswith("norm") else c.attention_bias if ".attention." in ours else c.mlp_bias
        table.update({f"{ours}.{p}": (f"{hf}.{p}",) for p in ("weight", "bias")[: 1 + bias]})
    return table


# transformers 5 writes `layer_types` and `rope_parameters`, 4.x `global_attn_every_n_layers` and the thetas.
FIELDS = (
    "max_position_embeddings", "norm_eps", "norm_bias", "attention_bias", "mlp_bias", "global_attn_every_n_layers",
    "local_attention", "global_rope_theta", "local_rope_theta", "embedding_dropout", "attention_dropout",
    "mlp_dropout", "hidden_activation", "classifier_pooling", "classifier_bias", "classifier_activation",
    "initializer_range", "pad_token_id",
)  # fmt: skip


# transformers 5's rope_parameters keys -> the 4.x theta each one holds.
_ROPE_FIELDS = {"full_attention": "global_rope_theta", "sliding_attention": "local_rope_theta"}


def _default_rope(rope, extra: tuple[str, ...]) -> bool:
    """A dict asking for the default rotary embedding (`rope_type`, or its older name `type`, absent or
    "default"), with no keys beyond those and `extra`."""
    return (
        isinstance(rope, dict)
        and all(rope.get(k, "default") == "default" for k in ("rope_type", "type"))
        and not set(rope) - {"rope_type", "type", *extra}
    )


def read_modernbert_config(hf: dict) -> dict:
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise UserError(f"it lacks {missing[0]}; it is not a complete modernbert config")
    fields = {k: hf[k] for k in FIELDS if hf.get(k) is not None}
    if hf.get("local_rope_theta", 0) is None:  # transformers: local layers then use the global theta
        fields["local_rope_theta"] = fields.get("global_rope_theta", 160000.0)
    scaling = hf.get("rope_scaling")
    if scaling is not None and not _default_rope(scaling, ()):  # {"rope_type": "default"}: transformers' default
        raise UserError(f"rope_scaling is {scaling!r}; st implements ModernBERT's default rotary embeddings")
    ropes = hf.get("rope_parameters") or {}
    if not isinstance(ropes, dict) or set(ropes) - set(_ROPE_FIELDS):
        raise UserError(
            f"rope_parameters is {ropes!r}; st reads it as transformers 5 does: a dict keyed by 'full_attention' "
            "and 'sliding_attention', each {'rope_type': 'default', 'rope_theta': ...} (transformers 5 refuses "
            "a flat one)"
        )
    for kind, field in _ROPE_FIELDS.items():
        rope = ropes.get(kind) or {}
        if not _default_rope(rope, ("rope_theta",)):
            raise UserError(f"rope_parameters[{kind!r}] is {rope!r}; st implements the default rotary embeddings")
        fields[field] = rope.get("rope_theta", fields.get(field, ModernBertConfig.__dataclass_fields__[field].default))
    L, types = hf["num_hidden_layers"], hf.get("layer_types")
    if types is not None and isinstance(L, int):
        if not isinstance(types, list):
            raise UserError(f"layer_types is {types!r}; it must be a list of 'full_attention' and 'sliding_attention'")
        every = next((i for i, t in enumerate(types) if i and t == "full_attention"), max(L, 1))
        if types != ["sliding_attention" if i % every else "full_attention" for i in range(L)]:
            raise UserError(f"layer_types is {types!r}; st implements a global layer every n layers, from layer 0")
        fields["global_attn_every_n_layers"] = every
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=L,
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        model_type="modernbert",
        **fields,
    )


def modernbert_config_fields(c: ModernBertConfig) -> dict:
    """In transformers 4.x's names; transformers 5 reads them too (global_attn_every_n_layers, the thetas)."""
    fields = {k: getattr(c, k) for k in FIELDS}
    return {
        "model_type": "modernbert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.intermediate_size,
        **fields,
    }


# ModernBertForMaskedLM's prediction head (dense, act, norm) has the names and shapes of the sequence
# classifier's head, so transformers starts a classifier from it; st does too, as BERT's pre-trained pooler.
MODERNBERT_POOLER = {f"{m}.{p}": (f"head.{m}.{p}",) for m in ("dense", "norm") for p in ("weight", "bias")}
MODERNBERT_HEAD = {  # our BertClassifier -> ModernBertForSequenceClassification; biases as the config has them
    **{f"pooler.{m}.{p}": f"head.{m}.{p}" for m in ("dense", "norm") for p in ("weight", "bias")},
    "classifier.out.weight": "classifier.weight",
    "classifier.out.bias": "classifier.bias",
}


def modernbert_pooler_options(c: ModernBertConfig) -> dict:
    """`st.models.heads.Pooler`'s shape for this config: pool, dense (bias?), act, norm."""
    return dict(
        activation=c.classifier_activation,
        pooling=c.classifier_pooling,
        dense_bias=c.classifier_bias,
        norm_eps=c.norm_eps,
        norm_bias=c.norm_bias,
    )
