"""Pooler and task layer on top of the encoder: a first-token pooler, dropout, one linear layer.

The pooler's activation is the family's (`Family.pooler_activation`): BERT's pooler and RoBERTa's
classification head use tanh, ELECTRA's head gelu, DistilBERT's pre_classifier relu."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from st.errors import UserError
from st.models.bert import Bert, BertConfig, init_weights
from st.models.families import FAMILIES

ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu}


class Pooler(nn.Module):
    def __init__(self, hidden_size: int, activation: str = "tanh"):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = ACTIVATIONS[activation]

    @classmethod
    def for_config(cls, config: BertConfig) -> "Pooler":
        """The pooler of the config's family (its HF classification head's activation)."""
        if config.model_type not in FAMILIES:  # a hand-edited st checkpoint
            raise UserError(f"the model config's model_type {config.model_type!r} is not one of {', '.join(FAMILIES)}")
        return cls(config.hidden_size, FAMILIES[config.model_type].pooler_activation)

    def forward(self, hidden: Tensor) -> Tensor:  # B,T,D -> B,D
        return self.activation(self.dense(hidden[:, 0]))


class TaskHead(nn.Module):
    """Dropout and a linear layer: num_labels logits, or one score for regression (num_labels=1)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled: Tensor) -> Tensor:  # B,D -> B,num_labels
        return self.out(self.dropout(pooled))


class BertClassifier(nn.Module):
    """Encoder + pooler + task head: the paper's ST-DNN."""

    def __init__(self, encoder: Bert, num_labels: int, head_dropout: float = 0.1):
        super().__init__()
        d = encoder.config.hidden_size
        self.encoder = encoder
        self.pooler = Pooler.for_config(encoder.config)
        self.classifier = TaskHead(d, num_labels, head_dropout)
        for module in (self.pooler, self.classifier):
            module.apply(lambda m: init_weights(m, encoder.config.initializer_range))

    @property
    def num_labels(self) -> int:
        return self.classifier.out.out_features

    def forward(
        self, input_ids, token_type_ids=None, attention_mask=None, head_mask=None, ffn_mask=None, packed=True
    ) -> Tensor:
        hidden = self.encoder(input_ids, token_type_ids, attention_mask, head_mask, ffn_mask, packed)  # B,T,D
        return self.classifier(self.pooler(hidden))  # B,num_labels


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:  # B,C and B -> B
    """Cross-entropy per example, or squared error for a one-output regression head."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, labels, reduction="none")


def predict(logits: Tensor) -> Tensor:  # B,C -> B
    """Label index, or the score itself for regression."""
    return logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
