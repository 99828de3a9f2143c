"""ONNX export of a (physically pruned) classifier, checked in ONNX Runtime before it is kept.

The graph is the pruned network itself: each layer has its own number of heads, removed FFN blocks
are absent. Inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, batch × sequence, both
axes dynamic) -> `logits` (batch × labels); label names and the encoder config are in the model's
metadata (`id2label`, `st_config`, JSON). Needs the optional extra: pip install 'st[onnx]'.
`inference_session` opens a file with the CPU settings the README's benchmark uses; `quantize_int8`
writes its int8 copy with ONNX Runtime's own quantizer (`st.onnx_accuracy` checks that copy on dev).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from st.errors import UserError
from st.io import atomic_path
from st.models.heads import BertClassifier

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOLERANCE = 1e-4  # max |logit difference| ONNX Runtime may show against st before the file is refused
INSTALL = "the ONNX export needs the onnx extra: pip install 'st[onnx]' (onnx, onnxscript, onnxruntime)"


def require_onnx() -> None:
    """Raise a one-line UserError saying how to install the extra when a package is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None


class OnnxClassifier(nn.Module):
    """`model` as a graph with the input order and names ONNX users expect; no masks, no packing."""

    def __init__(self, model: BertClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:  # B,T each -> B,C
        # packed=False: no packing, whose nonzero() would give the graph a data-dependent shape
        return self.model(input_ids, token_type_ids, attention_mask, packed=False)  # B,C


def example_batch(config, batch: int = 3, length: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """A padded batch of sentence pairs: [CLS] a [SEP] b [SEP] [PAD]..., lengths differing by row."""
    g = torch.Generator().manual_seed(seed)
    length = min(length, config.max_tokens)
    ids = torch.randint(1, config.vocab_size, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    types = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = length - (b * length) // (2 * batch)  # the first row full, later rows shorter
        mask[b, :n] = 1
        types[b, n // 2 : n] = 1 if config.type_vocab_size > 1 else 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


def export_onnx(model: BertClassifier, path: str | Path, id2label=None) -> float:
    """Write `model` (as it is: prune it first) to `path` as ONNX, after checking the file in ONNX
    Runtime on a padded batch of pairs; returns the largest logit difference from `model`'s."""
    require_onnx()
    import onnx

    n = model.num_labels
    if isinstance(id2label, dict):
        id2label = [id2label[k] for k in sorted(id2label, key=int)]
    labels = list(id2label) if id2label is not None else [f"LABEL_{i}" for i in range(n)]
    if len(labels) != n:
        raise UserError(f"{len(labels)} label names for a model with {n} outputs; pass one name per output")
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        wrapper = OnnxClassifier(model).eval()
        example = example_batch(model.encoder.config, batch=2)
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=model.encoder.config.max_tokens)
        axes = {name: {0: batch, 1: sequence} for name in INPUTS}
        # no_grad: a trained attention bias (MPNet's) would otherwise send SDPA down a path the exporter cannot convert
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                tuple(example[k] for k in INPUTS),
                dynamo=True,
                input_names=list(INPUTS),
                output_names=["logits"],
                dynamic_shapes=axes,
                verbose=False,
            )
        with atomic_path(path) as tmp:
            program.save(str(tmp), external_data=False)
            proto = onnx.load(str(tmp))
            meta = {
                "id2label": json.dumps({str(i): str(v) for i, v in enumerate(labels)}),
                "st_config": json.dumps(model.encoder.config.to_dict()),
                "producer": "st",
            }
            onnx.helper.set_model_props(proto, meta)
            onnx.save(proto, str(tmp))
            error = verify_onnx(tmp, model)  # a file that does not match st's logits is never kept
    finally:
        model.train(was_training)
    return error


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """Write `src`'s int8 copy to `dst`: ONNX Runtime's dynamic quantization, per-channel int8 weights.

    Dynamic, not static (calibrated on training examples): measured on a fine-tuned MiniLM-L6
    (rotten_tomatoes, bench/bench_quantize_modes.py), static QDQ int8 ran slower than dynamic
    and lost more dev accuracy (README, "Deploying the ticket"). The label names and config metadata
    are copied over: the quantizer drops them.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = onnx.load(str(src))
    with _quiet():
        quantize_dynamic(source, str(dst), per_channel=True, weight_type=QuantType.QInt8)
    proto = onnx.load(str(dst))
    onnx.helper.set_model_props(proto, {p.key: p.value for p in source.metadata_props} | {"st_quantized": "int8"})
    onnx.save(proto, str(dst))


def metadata(path: str | Path) -> dict[str, str]:
    """An exported file's metadata (id2label, st_config, ...), as ONNX Runtime reads it."""
    require_onnx()
    import onnxruntime as ort

    return dict(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map)


def inference_session(path: str | Path, threads: int | None = None, fuse_skip_layer_norm: bool = False):
    """An ONNX Runtime CPU session for an exported file, with the settings the README's numbers use.

    ORT's SkipLayerNormFusion (residual add + LayerNorm in one kernel) is off by default here: on CPU
    (onnxruntime 1.31, measured by bench/bench_onnx.py) the fused kernel was slower than the plain
    Add and LayerNormalization it replaces, and a pruned model keeps all its LayerNorms, so it paid
    the most. `threads`: intra-op threads (None: ORT's default, one per core).
    """
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    disabled = [] if fuse_skip_layer_norm else ["SkipLayerNormFusion"]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def verify_onnx(path: str | Path, model: BertClassifier) -> float:
    """Largest |logit| difference between ONNX Runtime on `path` and `model`, on a padded batch of
    pairs and on a single example; raises when it passes TOLERANCE."""
    import onnxruntime as ort

    session = inference_session(path)
    error = 0.0
    for batch in (
        example_batch(model.encoder.config, batch=4, length=19, seed=1),
        example_batch(model.encoder.config, batch=1, seed=2),
    ):
        with torch.no_grad():
            expected = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        (got,) = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})
        error = max(error, (torch.from_numpy(got) - expected).abs().max().item())
    if not error <= TOLERANCE:
        raise RuntimeError(
            f"the ONNX graph's logits differ from st's by {error:.2e} (> {TOLERANCE:g}) in onnxruntime "
            f"{ort.__version__}; nothing was written. Please report this with your torch and onnxruntime versions"
        )
    return error


@contextlib.contextmanager
def _quiet():
    """torch.onnx logs a warning per missing optional package (torchvision ops), onnxscript and
    onnx_ir log every graph rewrite at INFO (which `st` shows), ORT's quantizer every tensor it leaves
    in fp32, and their dependencies emit deprecation warnings: noise to an `st export` user, silenced
    for the export and quantize calls only."""
    # the root logger too: onnxruntime.quantization logs each tensor it skips through logging.info()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir", "")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
