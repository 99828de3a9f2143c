"""Per-family Hugging Face layouts: which HF tensor names make each of our tensors, and the HF config.

A family is one `Family` row; reading (`st.models.weights`) and writing (`st.export`) both go
through it, so a new family is a new row (its key table, its classes, its config fields), not new
code paths. Only BERT is a row today.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from st.models.bert import BertConfig


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    prefix: str  # the encoder's prefix inside an HF task model ("bert." in BertForSequenceClassification)
    classifier_class: str  # the HF class for sequence classification, written to "architectures"
    encoder_table: Callable[[int], dict[str, tuple[str, ...]]]  # num_layers -> {ours: HF names (under prefix)}
    pooler_table: dict[str, tuple[str, ...]]  # our Pooler's names -> HF names (under prefix)
    task_table: dict[str, str]  # our TaskHead's names -> HF names (top level)
    config_fields: Callable[[BertConfig], dict]  # the encoder's part of an HF config.json


def bert_key_table(num_layers: int) -> dict[str, tuple[str, ...]]:
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


def bert_config_fields(c: BertConfig) -> dict:
    return {
        "model_type": "bert",
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


BERT = Family(
    model_type="bert",
    prefix="bert.",
    classifier_class="BertForSequenceClassification",
    encoder_table=bert_key_table,
    pooler_table={"dense.weight": ("pooler.dense.weight",), "dense.bias": ("pooler.dense.bias",)},
    task_table={"out.weight": "classifier.weight", "out.bias": "classifier.bias"},
    config_fields=bert_config_fields,
)

FAMILIES = {f.model_type: f for f in (BERT,)}  # config.json model_type -> its family
