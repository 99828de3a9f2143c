"""Per-family Hugging Face layouts: which HF tensor names make each of our tensors, and the HF config.

A family is one `Family` row; reading (`st.models.weights`) and writing (`st.export`) both go
through it, so a family is a row (its key tables, its classes, its config both ways), not new code
paths. The BERT families share one encoder (post-LN BERT layers); what differs is names, the embedding
rule (BertConfig's model_type .. sinusoidal_positions fields, applied in `st.models.bert`), MPNet's
relative-position bias and the classification head's activation. ModernBERT and DeBERTa-v2/v3 are
architectures of their own (`st.models.modernbert`, `st.models.deberta`: config_class, encoder_class; their
HF names and config.json in `st.models.modernbert_hf`, `st.models.deberta_hf`) behind rows like the others,
on the same contract (masks, packing, `st.models.units`), so nothing downstream names an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from st.errors import UserError
from st.models import deberta_hf
from st.models.bert import Bert, BertConfig
from st.models.bert_hf import (
    bert_config_fields,
    bert_key_table,
    distilbert_config_fields,
    distilbert_key_table,
    electra_key_table,
    mpnet_config_fields,
    mpnet_key_table,
    read_bert_config,
    read_distilbert_config,
    read_electra_config,
    read_mpnet_config,
    read_roberta_config,
)
from st.models.deberta import DebertaV2, DebertaV2Config
from st.models.modernbert import ModernBert, ModernBertConfig
from st.models.modernbert_hf import (
    MODERNBERT_HEAD,
    MODERNBERT_POOLER,
    modernbert_config_fields,
    modernbert_key_table,
    modernbert_pooler_options,
    read_modernbert_config,
)


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
    # The task head's shape beyond `pooler_activation`, from the encoder config (`st.models.heads.Pooler`'s
    # keyword arguments): ModernBERT's head pools by its config, has a norm and an optional dense bias.
    pooler_options: Callable[[object], dict] = lambda config: {}
    # transformers can load the `pruned-heads` export (False for DeBERTa: its prune_heads raises).
    prunes_heads: bool = True
    # HF names (under prefix) a checkpoint may carry that this config does not use, as HF ignores them.
    unused_keys: Callable[[object], tuple[str, ...]] = lambda config: ()


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
    prunes_heads=False,  # transformers' MPNet prunes q/k/v/o but not its bias table: forward then fails
)


MODERNBERT = Family(
    model_type="modernbert",
    prefix="model.",
    classifier_class="ModernBertForSequenceClassification",
    encoder_table=modernbert_key_table,
    pooler_table=MODERNBERT_POOLER,  # ModernBertForMaskedLM's head: transformers starts a classifier from it
    head_table=MODERNBERT_HEAD,
    pooler_activation="gelu",  # the config's classifier_activation decides (pooler_options)
    head_dropout_field="classifier_dropout",
    skipped_prefixes=("decoder.", "classifier."),
    read_config=read_modernbert_config,
    config_fields=modernbert_config_fields,
    config_class=ModernBertConfig,
    encoder_class=ModernBert,
    pooler_options=modernbert_pooler_options,
    prunes_heads=False,  # transformers' ModernBERT has no prune_heads
)

DEBERTA_V2 = Family(  # DeBERTa-v2 and v3: st.models.deberta, its HF names and config.json in st.models.deberta_hf
    model_type="deberta-v2",
    prefix="deberta.",
    classifier_class="DebertaV2ForSequenceClassification",
    encoder_table=deberta_hf.deberta_key_table,
    pooler_table={},  # pre-trained DeBERTa checkpoints have no pooler; the task head's dense layer starts fresh
    head_table=deberta_hf.DEBERTA_HEAD,
    pooler_activation="gelu",  # the config's pooler_hidden_act decides (pooler_options)
    head_dropout_field="cls_dropout",
    skipped_prefixes=("lm_predictions.", "mask_predictions.", "pooler.", *_TASK_HEADS),
    read_config=deberta_hf.read_deberta_config,
    config_fields=deberta_hf.deberta_config_fields,
    config_class=DebertaV2Config,
    encoder_class=DebertaV2,
    pooler_options=lambda config: {"activation": config.pooler_hidden_act},
    prunes_heads=False,  # transformers' DeBERTa raises NotImplementedError in prune_heads
    unused_keys=deberta_hf.deberta_unused_keys,
)

FAMILIES = {
    f.model_type: f for f in (BERT, ROBERTA, XLM_ROBERTA, ELECTRA, DISTILBERT, MPNET, MODERNBERT, DEBERTA_V2)
}  # config.json model_type -> its family


def family_of(model_type: str | None, where: str) -> Family:
    """The family of a config.json model_type; anything else is one line naming what is supported."""
    if model_type not in FAMILIES:
        raise UserError(
            f"{where} has model_type {model_type!r}; st supports {', '.join(repr(k) for k in FAMILIES)} "
            f"(BERT, RoBERTa, XLM-RoBERTa, ELECTRA discriminator, DistilBERT, MPNet, ModernBERT, DeBERTa-v2/v3): use "
            "a checkpoint of one of these"
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
