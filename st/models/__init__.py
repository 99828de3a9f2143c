"""The BERT encoder, its weights and task heads."""

from st.models.bert import Bert, BertConfig
from st.models.checkpoint import load_checkpoint, save_checkpoint
from st.models.heads import BertClassifier
from st.models.weights import load_pretrained, load_pretrained_parts, resolve_model_dir

__all__ = [
    "Bert",
    "BertConfig",
    "BertClassifier",
    "load_checkpoint",
    "save_checkpoint",
    "load_pretrained",
    "load_pretrained_parts",
    "resolve_model_dir",
]
