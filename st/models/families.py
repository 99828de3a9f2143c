"""Per-family Hugging Face layouts: which HF tensor names make each of our tensors, and the HF config.

A family is one `Family` row; reading (`st.models.weights`) and writing (`st.export`) both go
through it, so a family is a row (its key tables, its classes, its config both ways), not new code
paths. The encoder is the same for all (post-LN BERT layers); what differs is names, the embedding
rule (BertConfig's model_type .. sinusoidal_positions fields, applied in `st.models.bert`), MPNet's
relative-position bias and the classification head's activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from st.errors import UserError
from st.models.bert import Bert, BertConfig


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    prefix: str  # the encoder's prefix inside an HF task model ("bert." in BertForSequenceClassification)
    classifier_class: str  # the HF class for sequence classification, written to "architectures"
    encoder_table: Callable[[BertConfig], dict[str, tuple[str, ...]]]  # {ours: HF names (under prefix)}
    pooler_table: dict[str, tuple[str, ...]]  # a pre-trained encoder's pooler, ours -> HF (under prefix); may be empty
    head_table: dict[str, str]  # our BertClassifier's pooler.* and classifier.* -> HF names in the task model (full)
    pooler_activation: str  # the task head's nonlinearity after its dense layer: tanh, gelu or relu
    head_dropout_field: str  # the HF config field holding the task head's dropout
    skipped_prefixes: tuple[str, ...]  # pre-training heads and HF task heads, unused by an encoder
    read_config: Callable[[dict], dict]  # HF config.json -> BertConfig fields
    config_fields: Callable[[BertConfig], dict]  # the encoder's part of an HF config.json
    # The architecture: its config class and encoder module (one model file each, one contract).
    config_class: type = BertConfig
    encoder_class: type = Bert


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


# ---- the rows -------------------------------------------------------------------------------------

_POOLER = {"dense.weight": ("pooler.dense.weight",), "dense.bias": ("pooler.dense.bias",)}
_TASK_HEADS = ("classifier.", "qa_outputs.")
# RoBERTa, XLM-R and ELECTRA share one head: dense, activation, out_proj on the first token
# (HF also applies dropout before dense; in eval the outputs are the same).
_CLASSIFICATION_HEAD = {
    "pooler.dense.weight": "classifier.dense.weight",
    "pooler.dense.bias": "classifier.dense.bias",
    "classifier.out.weight": "classifier.out_proj.weight",
    "classifier.out.bias": "classifier.out_proj.bias",
}


def _roberta_like(model_type: str, classifier_class: str) -> Family:
    return Family(
        model_type=model_type,
        prefix="roberta.",
        classifier_class=classifier_class,
        encoder_table=bert_key_table,
        # RobertaForSequenceClassification drops the pre-trained pooler; its head's dense layer starts fresh.
        pooler_table={},
        head_table=_CLASSIFICATION_HEAD,
        pooler_activation="tanh",
        head_dropout_field="classifier_dropout",
        skipped_prefixes=("lm_head.", "pooler.", *_TASK_HEADS),
        read_config=read_roberta_config,
        config_fields=bert_config_fields,
    )


BERT = Family(
    model_type="bert",
    prefix="bert.",
    classifier_class="BertForSequenceClassification",
    encoder_table=bert_key_table,
    pooler_table=_POOLER,
    head_table={
        "pooler.dense.weight": "bert.pooler.dense.weight",
        "pooler.dense.bias": "bert.pooler.dense.bias",
        "classifier.out.weight": "classifier.weight",
        "classifier.out.bias": "classifier.bias",
    },
    pooler_activation="tanh",
    head_dropout_field="classifier_dropout",
    skipped_prefixes=("cls.", *_TASK_HEADS),
    read_config=read_bert_config,
    config_fields=bert_config_fields,
)
ROBERTA = _roberta_like("roberta", "RobertaForSequenceClassification")
XLM_ROBERTA = _roberta_like("xlm-roberta", "XLMRobertaForSequenceClassification")
ELECTRA = Family(
    model_type="electra",
    prefix="electra.",
    classifier_class="ElectraForSequenceClassification",
    encoder_table=electra_key_table,
    pooler_table={},
    head_table=_CLASSIFICATION_HEAD,
    pooler_activation="gelu",
    head_dropout_field="classifier_dropout",
    skipped_prefixes=("discriminator_predictions.", "generator_predictions.", "generator_lm_head.", *_TASK_HEADS),
    read_config=read_electra_config,
    config_fields=bert_config_fields,
)
DISTILBERT = Family(
    model_type="distilbert",
    prefix="distilbert.",
    classifier_class="DistilBertForSequenceClassification",
    encoder_table=distilbert_key_table,
    pooler_table={},
    head_table={
        "pooler.dense.weight": "pre_classifier.weight",
        "pooler.dense.bias": "pre_classifier.bias",
        "classifier.out.weight": "classifier.weight",
        "classifier.out.bias": "classifier.bias",
    },
    pooler_activation="relu",
    head_dropout_field="seq_classif_dropout",
    skipped_prefixes=("vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "pre_classifier.", *_TASK_HEADS),
    read_config=read_distilbert_config,
    config_fields=distilbert_config_fields,
)
MPNET = Family(
    model_type="mpnet",
    prefix="mpnet.",
    classifier_class="MPNetForSequenceClassification",
    encoder_table=mpnet_key_table,
    # MPNetForSequenceClassification drops the pre-trained pooler; its head's dense layer starts fresh.
    pooler_table={},
    head_table=_CLASSIFICATION_HEAD,
    pooler_activation="tanh",
    # HF's MPNet head drops out with hidden_dropout_prob, the encoder's: the head's own rate goes in a field
    # MPNet ignores, so hidden_dropout_prob stays the encoder's and the rate comes back into st.
    head_dropout_field="classifier_dropout",
    skipped_prefixes=("lm_head.", "pooler.", *_TASK_HEADS),
    read_config=read_mpnet_config,
    config_fields=mpnet_config_fields,
)

FAMILIES = {
    f.model_type: f for f in (BERT, ROBERTA, XLM_ROBERTA, ELECTRA, DISTILBERT, MPNET)
}  # config.json model_type -> its family


def family_of(model_type: str | None, where: str) -> Family:
    """The family of a config.json model_type; anything else is one line naming what is supported."""
    if model_type not in FAMILIES:
        raise UserError(
            f"{where} has model_type {model_type!r}; st supports {', '.join(repr(k) for k in FAMILIES)} "
            f"(BERT, RoBERTa, XLM-RoBERTa, ELECTRA discriminator, DistilBERT, MPNet): use a checkpoint of one of these"
        )
    return FAMILIES[model_type]


def config_from_dict(d: dict):
    """An encoder config, of the architecture its model_type names, from its `to_dict()` form."""
    if not isinstance(d, dict):
        raise UserError(f"the model's encoder config is a {type(d).__name__}, not a JSON object")
    return family_of(d.get("model_type", "bert"), "the model's encoder config").config_class.from_dict(d)


def build_encoder(config):
    """A freshly initialised encoder of `config`'s architecture."""
    return family_of(config.model_type, "the model's encoder config").encoder_class(config)
