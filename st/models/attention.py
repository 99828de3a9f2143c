"""Attention and dropout kernels the encoders share: `attend` (SDPA, or its math path where that is
faster), a cheaper dropout for bf16/fp16 on CPU, and MPNet's T5-style relative-position buckets.

Dimensions: B batch, T tokens, H heads, Dh head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float) -> Tensor:  # 3 × B,H,T,Dh
    """softmax(q·kᵀ/√Dh + mask) · v, probabilities dropped out with probability `dropout`. `mask`
    broadcasts to B,H,T,T: boolean (True = attend; padding keys, B,1,1,T) or additive (a relative-position
    bias with -inf at padding keys, or the lowest float there). SDPA's fused kernels, except in bf16/fp16
    training on CPU: there SDPA takes its math path anyway (no fused CPU kernel has dropout), and its
    bernoulli_ draw over B·H·T² probabilities took a third of a bf16 training step; this is that math
    path, with the softmax in fp32 and the cheaper mask of `drop`."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # SDPA wants an additive mask in the query's dtype
    if dropout == 0 or q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # B,H,T,T
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.float()
    return drop(scores.softmax(-1).to(q.dtype), dropout) @ v  # B,H,T,Dh


class Dropout(nn.Dropout):
    """nn.Dropout with `drop`'s cheaper mask in bf16/fp16 on CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return drop(x, self.p) if self.training and self.p > 0 else x


def drop(x: Tensor, p: float) -> Tensor:
    """Dropout (training): F.dropout, except in bf16/fp16 on CPU, where the keep mask comes from 16-bit
    slices of 64-bit random integers: one draw per four elements, 6× cheaper than bernoulli_. The
    drop probability is p rounded to a multiple of 1/65536, and the kept values are scaled to match."""
    if x.device.type != "cpu" or x.dtype == torch.float32:
        return F.dropout(x, p, training=True)
    cut = round(p * 65536)  # P(drop) = cut / 65536
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    bits = draws.random_(-(2**63), 2**63 - 1).view(torch.int16)[: x.numel()].view(x.shape)  # uniform over int16
    return x * (bits >= cut - 32768) * (65536 / (65536 - cut))


def relative_buckets(T: int, buckets: int, device: torch.device, max_distance: int = 128) -> Tensor:  # T,T
    """The bucket of each (query, key) offset, T5-style and bidirectional, as MPNet computes it: half the
    buckets for keys after the query, half for keys before (or at) it; within a half, offsets below a
    quarter of the buckets get one bucket each, longer ones share logarithmically wider buckets up to
    `max_distance`, beyond which all fall in the last."""
    position = torch.arange(T, device=device)
    n = position[:, None] - position[None, :]  # T,T: query minus key
    half = buckets // 2
    bucket = (n < 0).long() * half  # T,T: keys after the query use the upper half
    n = n.abs()
    exact = half // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway
    log = torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    large = (exact + log.long()).clamp(max=half - 1)  # .long() truncates towards zero, as HF's .to(torch.long)
    return bucket + torch.where(n < exact, n, large)
