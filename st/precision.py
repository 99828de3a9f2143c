"""Mixed precision the same way on every device: fp32 master weights and optimizer state, bf16 or
fp16 compute.

The compute runs on a copy of the model cast to the compute dtype (`compute_copy`), not under
autocast: on CPU, autocast re-casts activations around every LayerNorm and softmax and ate the
whole gain (a bf16 forward under CPU autocast ran 1.6× slower than fp32; the cast copy 2-4× faster,
on AMX). The copy's weights are cast once per optimizer step (`sync_weights`), its gradients added
into the fp32 master gradients after every micro-batch (`accumulate_grads`). What needs fp32 gets it
inside the kernels or explicitly: LayerNorm statistics and softmax accumulate in fp32, the loss is
computed on fp32 logits, importance sums are fp32. fp16 adds a gradient scaler (`st.train`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from st.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: str | torch.device) -> torch.dtype:
    """The compute dtype of `precision` on `device`; one line when the device cannot do it."""
    if precision not in DTYPES:
        raise UserError(f"--precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise UserError(f"--precision bf16: the GPU {name} has no bf16 arithmetic; use --precision fp16 (or fp32)")
    return DTYPES[precision]


def has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (Sapphire Rapids and later): where bf16 GEMMs are fast."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def compute_copy(model: nn.Module, precision: str) -> nn.Module:
    """The module that computes in `precision`: `model` itself for fp32, else a copy cast to bf16 or
    fp16 (integer buffers, such as kept head indices, stay as they are)."""
    if precision == "fp32":
        return model
    return copy.deepcopy(model).to(DTYPES[precision]).train(model.training)


def accumulate_grads(master: nn.Module, compute: nn.Module) -> None:
    """Add the compute copy's gradients into the master's, in fp32, and clear them."""
    if compute is master:
        return
    with torch.no_grad():
        for p, c in zip(master.parameters(), compute.parameters()):
            if c.grad is None:
                continue
            if p.grad is None:
                p.grad = c.grad.float()
            else:
                p.grad.add_(c.grad)
            c.grad = None


def sync_weights(master: nn.Module, compute: nn.Module) -> None:
    """Cast the master weights into the compute copy (after an optimizer step, or after resuming)."""
    if compute is master:
        return
    with torch.no_grad():
        for p, c in zip(master.parameters(), compute.parameters()):
            c.copy_(p)
