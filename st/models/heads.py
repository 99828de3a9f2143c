"""Pooler and task layer on top of the encoder: a pooler, dropout, one linear layer.

The pooler's activation is the family's (`Family.pooler_activation`): BERT's pooler and RoBERTa's
classification head use tanh, ELECTRA's head gelu, DistilBERT's pre_classifier relu. A family's
`pooler_options` may shape it further from the encoder config: ModernBERT's head pools the first token or
the mean of the real tokens, has an optional dense bias and a LayerNorm after the activation."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from st.errors import UserError
from st.models.bert import Bert, BertConfig, init_weights
from st.models.families import FAMILIES
from st.models.modernbert import ACTIVATIONS


class Pooler(nn.Module):
    """pool (the first token, or the mean over real tokens), dense, activation (, LayerNorm)."""

    def __init__(
        self,
        hidden_size: int,
        activation: str = "tanh",
        pooling: str = "cls",
        dense_bias: bool = True,
        norm_eps: float | None = None,  # None: no norm (BERT families); ModernBERT: its norm_eps
        norm_bias: bool = True,
    ):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size, bias=dense_bias)
        self.activation = ACTIVATIONS[activation]
        self.mean = pooling == "mean"
        self.norm = None if norm_eps is None else nn.LayerNorm(hidden_size, eps=norm_eps, bias=norm_bias)

    @classmethod
    def for_config(cls, config: BertConfig) -> "Pooler":
        """The pooler of the config's family (its HF classification head's activation)."""
        if config.model_type not in FAMILIES:  # a hand-edited st checkpoint
            raise UserError(f"the model config's model_type {config.model_type!r} is not one of {', '.join(FAMILIES)}")
        family = FAMILIES[config.model_type]
        return cls(config.hidden_size, **{"activation": family.pooler_activation, **family.pooler_options(config)})

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:  # B,T,D (and B,T) -> B,D
        if not self.mean:
            pooled = hidden[:, 0]  # B,D
        elif attention_mask is None:
            pooled = hidden.mean(1)
        else:  # real tokens only: the unpacked hidden states hold zeros at padding, the ONNX graph does not
            real = attention_mask[..., None].to(hidden.dtype)  # B,T,1
            pooled = (hidden * real).sum(1) / real.sum(1)
        pooled = self.activation(self.dense(pooled))
        return pooled if self.norm is None else self.norm(pooled)


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
        return self.classifier(self.pooler(hidden, attention_mask))  # B,num_labels


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:  # B,C and B -> B
    """Cross-entropy per example, or squared error for a one-output regression head."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, labels, reduction="none")


def predict(logits: Tensor) -> Tensor:  # B,C -> B
    """Label index, or the score itself for regression."""
    return logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
