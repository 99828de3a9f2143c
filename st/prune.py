"""Physical pruning: a ticket's masks become a smaller model, and that model becomes a folder.

A mask is in original-head coordinates: head_mask (L, H0) and ffn_mask (L,) of 0/1, the same
tensors the dense model takes as forward arguments. Pruning keeps exactly what the masked dense
model computes:
  - a head with mask 0 contributes a zero context, so only the output projection's bias is left of
    it; deleting its Q/K/V rows and its columns of `out.weight` (keeping `out.bias`) is exact;
  - an FFN with mask 0 leaves LayerNorm(attention_out); deleting the block and keeping `ffn_norm`
    is exact.
A model pruned already can be pruned again with a mask for the full model: heads gone stay gone.

Exports: `export` writes our checkpoint format (read back by `load_checkpoint` / `load_pretrained`),
`export_hf` a folder that `transformers.BertForSequenceClassification.from_pretrained` loads,
using HF's own `pruned_heads` config field; transformers itself is never imported here.
"""

from __future__ import annotations


from pathlib import Path

import torch
from torch import Tensor

from st.errors import UserError
from st.io import write_json, write_safetensors
from st.models.bert import Bert, BertConfig
from st.models.checkpoint import save_checkpoint
from st.models.heads import BertClassifier
from st.models.weights import hf_key_table
from st.tokenize import copy_tokenizer


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
            raise UserError(f"{name} has values other than 0 and 1; only a binary mask (a ticket) can be pruned physically")
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
    full_heads = all(k == tuple(range(config.num_heads)) for k in kept_heads)
    full_ffn = all(s == config.intermediate_size for s in ffn_sizes)
    fields = config.to_dict()
    fields["kept_heads"] = None if full_heads else tuple(kept_heads)
    fields["ffn_sizes"] = None if full_ffn else tuple(ffn_sizes)
    return BertConfig.from_dict(fields)


# ---- pruning --------------------------------------------------------------------------------------


def _head_rows(positions: list[int], head_dim: int) -> Tensor:
    """Indices of the rows (or columns) of heads at `positions` in a [head 0 | head 1 | ...] layout."""
    return (torch.tensor(positions, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _pruned_encoder_state(model: Bert, new: BertConfig) -> dict[str, Tensor]:
    old, Dh = model.config, model.config.head_dim
    out = {}  # load_state_dict copies these into the new model, so slices and views are fine
    for name, tensor in model.state_dict().items():
        if not name.startswith("layers."):
            out[name] = tensor
            continue
        i, rest = name.split(".", 2)[1:]
        i = int(i)
        if rest.startswith("ffn.") and new.layer_ffn_size(i) == 0:
            continue  # the whole block goes; ffn_norm stays
        old_heads = old.layer_heads(i)
        positions = [old_heads.index(h) for h in new.layer_heads(i)]  # kept heads, by position in this layer
        if rest.startswith("attention.qkv."):
            inner = len(old_heads) * Dh
            rows = _head_rows(positions, Dh)
            out[name] = torch.cat([tensor[b * inner + rows] for b in range(3)])  # [Q | K | V], kept heads each
        elif rest == "attention.out.weight":
            out[name] = tensor[:, _head_rows(positions, Dh)]  # D, H·Dh: input columns of kept heads
        else:  # LayerNorms, a kept FFN, and out.bias whole: a zeroed head still adds the bias
            out[name] = tensor
    return out


def prune_encoder(model: Bert, head_mask, ffn_mask) -> Bert:
    """A new, physically smaller Bert that computes `model(..., head_mask=head_mask, ffn_mask=ffn_mask)`.

    Weights are copied exactly; dtype, device and train/eval mode are those of `model`, which is
    left untouched.
    """
    config = config_for_masks(model.config, head_mask, ffn_mask)
    state = _pruned_encoder_state(model, config)
    reference = next(model.parameters())
    pruned = Bert(config).to(device=reference.device, dtype=reference.dtype)
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


def _maybe_prune(model: BertClassifier, head_mask, ffn_mask) -> BertClassifier:
    if head_mask is None and ffn_mask is None:
        return model
    config = model.encoder.config
    if head_mask is None:
        head_mask = torch.ones(config.num_layers, config.num_heads)
    if ffn_mask is None:
        ffn_mask = torch.ones(config.num_layers)
    return prune_classifier(model, head_mask, ffn_mask)


# ---- export ---------------------------------------------------------------------------------------


def export(model: BertClassifier, folder: str | Path, *, head_mask=None, ffn_mask=None, **meta) -> BertClassifier:
    """Write `model` (pruned first when masks are given) as our checkpoint; returns what was written.

    The config records kept_heads / ffn_sizes, so `load_checkpoint(folder)` and
    `load_pretrained(folder)` rebuild the small model; `meta` goes into config.json as given.
    """
    model = _maybe_prune(model, head_mask, ffn_mask)
    save_checkpoint(folder, model, **meta)
    return model


def hf_state(model: BertClassifier) -> dict[str, Tensor]:
    """Tensors of a Hugging Face `BertForSequenceClassification` with `pruned_heads` applied.

    HF keeps a pruned layer's remaining heads in increasing original order; a removed FFN block
    (or a narrower one) is padded with zero rows/columns up to the config's intermediate_size:
    gelu(0) = 0 and a zero output adds nothing before the LayerNorm, so this is exact.
    """
    config = model.encoder.config
    ours = {k: v.detach() for k, v in model.encoder.state_dict().items()}
    like = ours["embeddings.word.weight"]
    out = {}
    for name, hf_names in hf_key_table(config.num_layers).items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if ".ffn." in name:
            out[hf_names[0]] = _ffn_full_width(ours.get(name), name, config, like)
            continue
        tensor = ours[name]
        if layer is not None and ".attention." in name:
            heads = config.layer_heads(layer)
            order = _head_rows(sorted(range(len(heads)), key=lambda j: heads[j]), config.head_dim)  # our positions, in HF's order
            if "qkv" in name:
                for q_k_or_v, hf_name in zip(tensor.chunk(3), hf_names):
                    out[hf_name] = q_k_or_v[order]
                continue
            if name.endswith("out.weight"):
                tensor = tensor[:, order]
        out[hf_names[0]] = tensor
    out = {"bert." + k: v for k, v in out.items()}
    out["bert.pooler.dense.weight"] = model.pooler.dense.weight.detach()
    out["bert.pooler.dense.bias"] = model.pooler.dense.bias.detach()
    out["classifier.weight"] = model.classifier.out.weight.detach()
    out["classifier.bias"] = model.classifier.out.bias.detach()
    return out


def _ffn_full_width(tensor: Tensor | None, name: str, c: BertConfig, like: Tensor) -> Tensor:
    """An FFN tensor zero-padded to intermediate_size (all zeros for a removed block)."""
    D, F0 = c.hidden_size, c.intermediate_size
    shape, dim = {
        "up.weight": ((F0, D), 0),
        "up.bias": ((F0,), 0),
        "down.weight": ((D, F0), 1),
        "down.bias": ((D,), 0),
    }[name.split(".ffn.")[1]]
    full = torch.zeros(shape, dtype=like.dtype, device=like.device)
    if tensor is not None:
        full.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return full


def hf_config(model: BertClassifier, id2label=None) -> dict:
    """config.json of a Hugging Face `BertForSequenceClassification` for `model`."""
    c, n = model.encoder.config, model.num_labels
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(n)}
    elif not isinstance(id2label, dict):
        id2label = dict(enumerate(id2label))
    if sorted(int(k) for k in id2label) != list(range(n)):
        raise UserError(f"id2label has {len(id2label)} labels {sorted(id2label)}; the model has {n} outputs (0..{n - 1})")
    id2label = {int(k): str(v) for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
    pruned = {str(i): sorted(set(range(c.num_heads)) - set(c.layer_heads(i))) for i in range(c.num_layers)}
    cfg = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": c.hidden_dropout,
        "attention_probs_dropout_prob": c.attention_dropout,
        "classifier_dropout": model.classifier.dropout.p,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "initializer_range": c.initializer_range,
        "layer_norm_eps": c.layer_norm_eps,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": "absolute",
        # HF prunes these heads again when it builds the model, then loads the smaller tensors.
        "pruned_heads": {k: v for k, v in pruned.items() if v},
        "num_labels": n,
        "id2label": {str(k): v for k, v in id2label.items()},
        "label2id": {v: k for k, v in id2label.items()},
    }
    if n == 1:
        cfg["problem_type"] = "regression"
    return cfg


def export_hf(
    model: BertClassifier,
    folder: str | Path,
    id2label=None,
    *,
    head_mask=None,
    ffn_mask=None,
    tokenizer_from: str | Path | None = None,
) -> BertClassifier:
    """Write a folder `transformers.BertForSequenceClassification.from_pretrained` loads; returns the model written.

    `id2label`: label names as a list or {index: name}; `tokenizer_from`: a model folder whose
    tokenizer files (vocab.txt, tokenizer.json, ...) are copied along, where present.
    """
    model = _maybe_prune(model, head_mask, ffn_mask)
    folder = Path(folder)
    config = hf_config(model, id2label)  # validates id2label before anything is written
    write_safetensors(folder / "model.safetensors", hf_state(model), metadata={"format": "pt"})
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, folder)
    write_json(folder / "config.json", config)  # last: a folder with config.json is complete
    return model
