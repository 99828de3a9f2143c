"""Physical pruning: a ticket's masks become a smaller model.

A mask is in original-head coordinates: head_mask (L, H0) and ffn_mask (L,) of 0/1, the same
tensors the dense model takes as forward arguments. Pruning keeps exactly what the masked dense
model computes:
  - a head with mask 0 contributes a zero context, so only the output projection's bias is left of
    it; deleting its entries (its Q/K/V rows and its output-projection columns, wherever the
    architecture's `units()` puts them) and keeping the projection's bias is exact;
  - an FFN with mask 0 adds nothing (post-LN: LayerNorm(attention_out); pre-LN: the residual stream
    as it was); deleting the block and keeping its norm is exact.
A model pruned already can be pruned again with a mask for the full model: heads gone stay gone.
Writing the result (st, Hugging Face, ONNX) is `st.export`'s job.
"""

from __future__ import annotations

import torch
from torch import Tensor

from st.errors import UserError
from st.models.bert import BertConfig
from st.models.families import build_encoder
from st.models.heads import BertClassifier
from st.models.weights import config_with_blocks, pruned_state

# ---- masks -> config ----------------------------------------------------------------------------


def _check_masks(config: BertConfig, head_mask, ffn_mask) -> tuple[Tensor, Tensor]:
    """Both masks as CPU bool tensors, after checking shape (L, H0) / (L,) and 0/1 values."""
    L, H0 = config.num_layers, config.num_heads
    masks = []
    for name, mask, shape in (("head_mask", head_mask, (L, H0)), ("ffn_mask", ffn_mask, (L,))):
        mask = torch.as_tensor(mask).detach().cpu()
        if tuple(mask.shape) != shape:
            raise UserError(
                f"{name} has shape {tuple(mask.shape)} but the model needs {shape} "
                f"({L} layers × {H0} heads, in the pre-trained model's head indices)"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise UserError(
                f"{name} has values other than 0 and 1; only a binary mask (a ticket) can be pruned physically"
            )
        masks.append(mask.bool())
    return masks[0], masks[1]


def config_for_masks(config: BertConfig, head_mask, ffn_mask) -> BertConfig:
    """The config of `config` after removing the heads and FFN blocks whose mask is 0.

    Works on a config pruned already: a head survives if it is still there and its mask is 1;
    an FFN block removed already stays removed. At least one head per layer must survive.
    Layers that keep everything are written as None fields, so an all-ones mask on a dense
    config gives back an equal config.
    """
    heads, ffn = _check_masks(config, head_mask, ffn_mask)
    kept_heads, ffn_sizes = [], []
    for i in range(config.num_layers):
        kept = tuple(h for h in config.layer_heads(i) if heads[i, h])
        if not kept:
            raise UserError(
                f"head_mask removes every head of layer {i}; keep at least one head per layer "
                f"(tickets never prune a layer's last head)"
            )
        kept_heads.append(kept)
        ffn_sizes.append(config.layer_ffn_size(i) if ffn[i] else 0)
    return config_with_blocks(config, kept_heads, ffn_sizes)


# ---- pruning --------------------------------------------------------------------------------------


def prune_encoder(model, head_mask, ffn_mask):
    """A new, physically smaller Bert that computes `model(..., head_mask=head_mask, ffn_mask=ffn_mask)`.

    Weights are copied exactly; dtype, device and train/eval mode are those of `model`, which is
    left untouched.
    """
    config = config_for_masks(model.config, head_mask, ffn_mask)
    state = pruned_state(model.state_dict(), model.config, config)
    reference = next(model.parameters())
    pruned = build_encoder(config).to(device=reference.device, dtype=reference.dtype)
    pruned.load_state_dict(state)
    return pruned.train(model.training)


def prune_classifier(model: BertClassifier, head_mask, ffn_mask) -> BertClassifier:
    """`prune_encoder` on the encoder; pooler and task head copied."""
    encoder = prune_encoder(model.encoder, head_mask, ffn_mask)
    reference = next(model.parameters())
    pruned = BertClassifier(encoder, model.num_labels, model.classifier.dropout.p)
    pruned.to(device=reference.device, dtype=reference.dtype)
    pruned.pooler.load_state_dict(model.pooler.state_dict())
    pruned.classifier.load_state_dict(model.classifier.state_dict())
    return pruned.train(model.training)


def apply_masks(model: BertClassifier, head_mask=None, ffn_mask=None) -> BertClassifier:
    """`model` pruned by the masks given (a missing one keeps everything); `model` itself without masks."""
    if head_mask is None and ffn_mask is None:
        return model
    config = model.encoder.config
    if head_mask is None:
        head_mask = torch.ones(config.num_layers, config.num_heads)
    if ffn_mask is None:
        ffn_mask = torch.ones(config.num_layers)
    return prune_classifier(model, head_mask, ffn_mask)
