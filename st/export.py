"""Exports of a fine-tuned (and usually pruned) model: `st`'s own folder, Hugging Face folders, ONNX.

Hugging Face layouts, each a folder of the family's `...ForSequenceClassification` (Bert, Roberta,
XLMRoberta, Electra, DistilBert, MPNet, ModernBert, DebertaV2; the family is the encoder config's
model_type):
  dense (default)  full-size tensors; a pruned head's Q/K/V rows (ModernBERT's fused Wqkv; DeBERTa's
                   positional projections too) and output-projection columns and a removed FFN
                   block's weights and down bias are zeros. Exact: such a head's scores are 0, its
                   softmax uniform, its values 0, so it adds nothing, exactly as a head mask of 0.
                   Loads with `from_pretrained` in transformers 4.x and 5.x.
  pruned-heads     transformers 4.x's `pruned_heads` config field with the smaller Q/K/V/output
                   matrices (a removed FFN block is zero-filled: HF has no per-layer FFN width).
                   transformers 5 removed head pruning and refuses these folders (size mismatch).
                   Refused where transformers 4.x cannot run pruned heads (`Family.prunes_heads`:
                   MPNet, ModernBERT, DeBERTa).
Both read back into `st` (`load_pretrained`, `load_hf_classifier`); `remove_zeros=True` removes the
dense layout's zero heads and FFN blocks physically, giving back the small model.

Tensors are built in our names first and renamed through the family's key table
(`st.models.families`), so a new family plugs in as a table. transformers is never imported here.
The ONNX export and its check in ONNX Runtime live in `st.onnx_export` (onnx is imported only there,
and only when used).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from st.errors import UserError
from st.io import check_writable, staged_outputs, write_json, write_safetensors
from st.layout import CONFIG, WEIGHTS
from st.models.checkpoint import load_checkpoint, save_checkpoint
from st.models.families import Family, build_encoder, family_of
from st.models.heads import BertClassifier, Pooler
from st.models.units import layer_param, per_unit, put
from st.models.weights import config_with_blocks, load_pretrained_parts, read_config, read_tensors
from st.onnx_export import export_onnx, quantize_int8, require_onnx
from st.prune import apply_masks
from st.tickets import Ticket
from st.tokenize import copy_tokenizer

HF_LAYOUTS = ("dense", "pruned-heads")
QUANTIZE = ("int8",)


# ---- Hugging Face tensors ---------------------------------------------------------------------


def _slots(config, layer: int, kind: str, layout: str) -> tuple[list[int], int]:
    """Where each of a layer's units (in our order) sits in the HF tensors, and how many unit slots they have.

    Heads, dense: at the original index among all H0 heads; pruned-heads: HF keeps a layer's remaining
    heads in increasing original order, so at the rank among the kept ones. FFN units: the block's
    first units, in a full-width block (HF has no per-layer FFN width).
    """
    if kind == "ffn":
        return list(range(config.layer_ffn_size(layer))), config.intermediate_size
    heads = config.layer_heads(layer)
    if layout == "dense":
        return list(heads), config.num_heads
    ranked = sorted(heads)
    return [ranked.index(h) for h in heads], len(heads)


def _full_size_state(model: BertClassifier, layout: str) -> dict[str, Tensor]:
    """The encoder's tensors at the size HF builds from its config: each head and FFN unit in its slot
    (the architecture's `units()` says where its entries are), zeros in empty slots; a removed FFN
    block all zeros. Zero FFN weights make the block's output exactly zero (act(0) = 0, or a GLU's
    0 · gate), as an FFN mask of 0; zero heads are discussed in the module docstring."""
    config = model.encoder.config
    units = config.units()
    ours = {k: v.detach() for k, v in model.encoder.state_dict().items()}
    like = ours["embeddings.word.weight"]
    heads = None if layout == "dense" else [config.layer_heads(i) for i in range(config.num_layers)]
    hf_sized = config_with_blocks(config, heads, None)  # pruned-heads: the kept heads, full FFN blocks
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_encoder(hf_sized).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        where = layer_param(name)
        found = units.place(where[1]) if where else None
        if name not in ours:  # a removed FFN block
            out[name] = like.new_zeros(shape)
        elif found is None:
            out[name] = ours[name]
        else:
            place, kind = found
            slots, total = _slots(config, where[0], kind, layout)
            out[name] = put(ours[name], place, slots, total, per_unit(config, kind))
    return out


def _family(model: BertClassifier) -> Family:
    return family_of(model.encoder.config.model_type, "the model's encoder config")


def _check_layout(family: Family, layout: str) -> None:
    if layout == "pruned-heads" and not family.prunes_heads:
        raise UserError(
            f"the pruned-heads layout does not exist for {family.model_type}: transformers cannot build a "
            f"{family.model_type} model with pruned heads; export the dense layout (the default), which loads "
            "everywhere with the same outputs"
        )


def hf_state(model: BertClassifier, layout: str = "dense") -> dict[str, Tensor]:
    """The tensors of the family's HF sequence-classification model for `model`, in `layout`."""
    if layout not in HF_LAYOUTS:
        raise UserError(f"unknown Hugging Face layout {layout!r}; choose one of: {', '.join(HF_LAYOUTS)}")
    config, family = model.encoder.config, _family(model)
    _check_layout(family, layout)
    full = _full_size_state(model, layout)
    out = {}
    for name, hf_names in family.encoder_table(config).items():
        for part, hf_name in zip(full[name].chunk(len(hf_names)), hf_names):  # Q, K, V are three HF tensors
            out[family.prefix + hf_name] = part
    top = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}  # pooler.*, classifier.*
    for name, hf_name in family.head_table.items():
        if name in top:  # a head's optional biases (ModernBERT's) are in the table whether the model has them or not
            out[hf_name] = top[name].detach()
    return out


def hf_config(model: BertClassifier, id2label=None, layout: str = "dense") -> dict:
    """config.json of the family's HF sequence-classification model for `model`, in `layout`."""
    c, n, family = model.encoder.config, model.num_labels, _family(model)
    _check_layout(family, layout)
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(n)}
    elif not isinstance(id2label, dict):
        id2label = dict(enumerate(id2label))
    if sorted(int(k) for k in id2label) != list(range(n)):
        raise UserError(
            f"id2label has {len(id2label)} labels {sorted(id2label)}; the model has {n} outputs (0..{n - 1})"
        )
    id2label = {int(k): str(v) for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
    cfg = {
        "architectures": [family.classifier_class],
        **family.config_fields(c),
        family.head_dropout_field: model.classifier.dropout.p,
    }
    if layout == "pruned-heads":
        pruned = {str(i): sorted(set(range(c.num_heads)) - set(c.layer_heads(i))) for i in range(c.num_layers)}
        # transformers 4.x prunes these heads again when it builds the model, then loads the smaller tensors.
        cfg["pruned_heads"] = {k: v for k, v in pruned.items() if v}
    cfg.update(
        num_labels=n, id2label={str(k): v for k, v in id2label.items()}, label2id={v: k for k, v in id2label.items()}
    )
    if n == 1:
        cfg["problem_type"] = "regression"
    return cfg


def export_hf(
    model: BertClassifier,
    folder: str | Path,
    id2label=None,
    *,
    layout: str = "dense",
    head_mask=None,
    ffn_mask=None,
    tokenizer_from: str | Path | None = None,
) -> BertClassifier:
    """Write a folder the family's HF `...ForSequenceClassification.from_pretrained` loads; returns
    the model written (pruned first when masks are given).

    `id2label`: label names as a list or {index: name}; `tokenizer_from`: a model folder whose
    tokenizer files (vocab.txt, tokenizer.json, ...) are copied along, where present.
    """
    model = apply_masks(model, head_mask, ffn_mask)
    folder = Path(folder)
    config = hf_config(model, id2label, layout)  # validates id2label before anything is written
    write_safetensors(folder / WEIGHTS, hf_state(model, layout), metadata={"format": "pt"})
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, folder)
    write_json(folder / CONFIG, config)  # last: a folder with config.json is complete
    return model


def load_hf_classifier(folder: str | Path, remove_zeros: bool = False) -> tuple[BertClassifier, dict]:
    """(model, config.json) of a Hugging Face sequence-classification folder, either layout (or a
    model pruned by transformers 4.x); `remove_zeros` removes zero-filled heads and FFN blocks."""
    config, encoder, _, folder = load_pretrained_parts(folder, remove_zeros)
    cfg = read_config(folder)
    family = family_of(cfg.get("model_type"), f"{folder}/config.json") if cfg.get("format") != "st" else None
    raw, source = read_tensors(folder)
    with torch.device("meta"):  # the head's tensors for this config (ModernBERT's biases are optional)
        ours = {f"pooler.{k}" for k in Pooler.for_config(config).state_dict()} | {
            "classifier.out.weight",
            "classifier.out.bias",
        }
    table = {k: v for k, v in family.head_table.items() if k in ours} if family else {}
    missing = [k for k in table.values() if k not in raw] if family else ["config.json model_type"]
    if missing:
        raise UserError(
            f"{folder} is not a Hugging Face sequence-classification folder (no {missing[0]}); "
            f"for st checkpoints use load_checkpoint"
        )
    top = {ours: raw[hf].float() for ours, hf in table.items()}  # pooler.*, classifier.*
    dropout = cfg.get(family.head_dropout_field)
    model = BertClassifier(
        build_encoder(config),
        top["classifier.out.weight"].shape[0],
        # BERT's head drops out at hidden_dropout_prob when classifier_dropout is null; ModernBERT always writes it
        getattr(config, "hidden_dropout", 0.0) if dropout is None else dropout,
    )
    model.encoder.load_state_dict(encoder)
    for name, module in (("pooler.", model.pooler), ("classifier.", model.classifier)):
        module.load_state_dict({k.removeprefix(name): v for k, v in top.items() if k.startswith(name)})
    return model, cfg


# ---- st's own folder, and all three from a checkpoint -------------------------------------------


def export_st(model: BertClassifier, folder: str | Path, *, head_mask=None, ffn_mask=None, **meta) -> BertClassifier:
    """Write `model` (pruned first when masks are given) as our checkpoint; returns what was written.

    The config records kept_heads / ffn_sizes, so `load_checkpoint(folder)` and
    `load_pretrained(folder)` rebuild the small model; `meta` goes into config.json as given.
    """
    model = apply_masks(model, head_mask, ffn_mask)
    save_checkpoint(folder, model, **meta)
    return model


def _refuse_existing(outputs: dict[str, str | Path]) -> None:
    seen = {}
    for option, path in outputs.items():
        path = Path(path)
        if path.resolve() in seen:
            raise UserError(f"{option} and {seen[path.resolve()]} name the same path {path}; give each export its own")
        seen[path.resolve()] = option
        is_file = option == "--onnx"
        if is_file and path.suffix != ".onnx":
            raise UserError(f"--onnx {path}: name the file *.onnx")
        if path.exists() if is_file else path.is_file() or (path.is_dir() and any(path.iterdir())):
            raise UserError(f"{path} already exists and is kept ({option}); choose a new path or delete it first")
        check_writable(path.parent)


def export_checkpoint(
    checkpoint: str | Path,
    ticket: Ticket | None = None,
    out: str | Path | None = None,
    hf_out: str | Path | None = None,
    onnx_out: str | Path | None = None,
    hf_layout: str = "dense",
    quantize: str | None = None,
    check: Callable[[Path, Path], dict] | None = None,
) -> dict:
    """`st export`: a fine-tuned checkpoint, pruned physically to `ticket` when given, as our folder
    (`out`), a Hugging Face folder (`hf_out`, in `hf_layout`) and/or an ONNX file (`onnx_out`).

    Nothing is overwritten: an existing file or non-empty folder is refused before anything is
    written, and the outputs are written all or none (`st.io.staged_outputs`). `quantize="int8"`
    makes the ONNX file int8 (`st.onnx_export.quantize_int8`); `check(fp32 file, int8 file)` (for
    `st export`, `st.onnx_accuracy.AccuracyCheck`) runs before the file is kept and may refuse it.
    Returns the parameter count of the exported model, its share of the checkpoint's and, for int8,
    what the check measured.
    """
    outputs = {k: v for k, v in (("--out", out), ("--hf", hf_out), ("--onnx", onnx_out)) if v}
    if not outputs:
        raise UserError("nothing to export: pass --out DIR (st), --hf DIR (Hugging Face) and/or --onnx FILE")
    if hf_layout not in HF_LAYOUTS:
        raise UserError(f"unknown Hugging Face layout {hf_layout!r}; choose one of: {', '.join(HF_LAYOUTS)}")
    if quantize is not None and (quantize not in QUANTIZE or not onnx_out or check is None):
        raise UserError(
            f"--quantize {quantize}: only {', '.join(QUANTIZE)}, of an --onnx FILE export, with its dev accuracy check"
        )
    _refuse_existing(outputs)
    if onnx_out:
        require_onnx()  # before anything is written
    model, cfg = load_checkpoint(checkpoint)
    model.eval()
    meta = {k: v for k, v in cfg.items() if k not in ("format", "encoder", "head")}
    small = model
    if ticket is not None:
        ticket.check_matches(model.encoder.config)
        small = apply_masks(model, ticket.head_mask_tensor(), ticket.ffn_mask_tensor())
        meta["ticket"] = ticket.to_json()
    labels = cfg.get("labels") or None
    hf_config(small, labels, hf_layout)  # a bad label list fails here, before anything is written
    checked = None
    with staged_outputs([Path(p) for p in outputs.values()]) as staged:  # all of them, or none
        paths = dict(zip(outputs, staged))
        if out:
            copy_tokenizer(checkpoint, paths["--out"])
            export_st(small, paths["--out"], **meta)
        if hf_out:
            export_hf(small, paths["--hf"], labels, layout=hf_layout, tokenizer_from=checkpoint)
        if onnx_out and quantize:
            checked = _export_int8(small, paths["--onnx"], labels, check)
        elif onnx_out:
            export_onnx(small, paths["--onnx"], labels)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    return {"parameters": count(small), "percent": 100.0 * count(small) / count(model), "int8": checked}


def _export_int8(model: BertClassifier, path: Path, labels, check: Callable[[Path, Path], dict]) -> dict:
    """The int8 file at `path` (a staging path: a refused file is removed with the other outputs)
    from an fp32 export written beside it and deleted after the check compared the two on dev."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".st-fp32-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(model, fp32, labels)
        quantize_int8(fp32, path)
        return check(fp32, path)
