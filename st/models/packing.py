"""Padded batches without the padding: every architecture packs its B,T batch to the N real tokens.

`Packing` flattens a padded batch to its N real tokens for what works per token (projections, FFN,
norms); attention alone needs the B,T layout back. `Padded` has the same interface without the
packing, for graphs that must not have data-dependent shapes (the ONNX export): it keeps B,T and
only masks attention, with an additive mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class Packing:
    """The real tokens of a padded batch, flattened to N rows. Projections, FFN and LayerNorm work
    per token, so they run on the N real tokens only; attention alone needs the B,T layout."""

    def __init__(self, attention_mask: Tensor):  # B,T: 1 for real tokens
        self.B, self.T = attention_mask.shape
        self.index = attention_mask.flatten().nonzero().squeeze(1)  # N: flat positions of real tokens
        self.example = self.index // self.T  # N: the example each real token belongs to
        self.key_padding = attention_mask.bool()[:, None, None, :]  # B,1,1,T: True = attend
        self._offsets: tuple[Tensor, int] | None = None

    def offsets(self) -> tuple[Tensor, int]:
        """(cumulative token offsets of the examples, B+1 int32; the longest example): varlen attention's input."""
        if self._offsets is None:
            lengths = self.key_padding.flatten(1).sum(1, dtype=torch.int32)  # B
            cumulative = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))  # B+1
            self._offsets = cumulative, int(lengths.max())
        return self._offsets

    def pack(self, x: Tensor) -> Tensor:  # B,T,... -> N,...
        return x.flatten(0, 1)[self.index]  # backward: index_put, far cheaper than index_select's index_add

    def unpack(self, x: Tensor) -> Tensor:  # N,... -> B,T,..., zeros at padding
        out = x.new_zeros(self.B * self.T, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.B, self.T, *x.shape[1:])

    def per_token(self, mask: Tensor) -> Tensor:  # a per-example (B,) mask -> (N,)
        return mask[self.example]


class Padded(Packing):
    """Packing's interface without the packing: nonzero() gives a data-dependent shape, which ONNX
    graphs handle badly, so the exported graph keeps the padded B,T layout and only masks attention."""

    def __init__(self, attention_mask: Tensor, dtype: torch.dtype):  # B,T: 1 for real tokens
        self.B, self.T = attention_mask.shape
        # Additive (0 or the lowest float), not boolean: SDPA's boolean-mask graph adds an IsNaN and a
        # Where over every B,H,T,T score tensor, 15% of a pruned MiniLM's time in ONNX Runtime at batch 1.
        keep = attention_mask[:, None, None, :].to(dtype)  # B,1,1,T
        self.key_padding = (1.0 - keep) * torch.finfo(dtype).min
        self.mask = attention_mask

    def pack(self, x: Tensor) -> Tensor:
        return x

    def unpack(self, x: Tensor) -> Tensor:
        return x

    def per_token(self, mask: Tensor) -> Tensor:  # a per-example (B,) mask, broadcast over B,T
        return mask[:, None]


def pack_batch(x: Tensor, attention_mask: Tensor | None, packed: bool) -> tuple[Tensor, Packing | None]:
    """(x, its packing) for an encoder's layers: a batch with padding as its N real tokens (Packing), or,
    not `packed`, kept B,T with attention masked (Padded); a batch without padding as it is (None)."""
    if attention_mask is None or (packed and bool(attention_mask.all())):
        return x, None  # B,T,D
    if not packed:
        return x, Padded(attention_mask, x.dtype)  # B,T,D
    pack = Packing(attention_mask)
    return pack.pack(x), pack  # N,D


def scale_tokens(x: Tensor, mask: Tensor | None, pack: Packing | None) -> Tensor:  # N,D or B,T,D
    """x times one layer's mask entry: one number () or one per example (B,), spread over its tokens."""
    if mask is None:
        return x
    if pack is not None and mask.dim() == 1:
        mask = pack.per_token(mask)  # N (Padded: B,1)
    return x * mask.reshape(-1, *(1,) * (x.dim() - 1)).to(x.dtype)
