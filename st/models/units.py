"""Where each head and each FFN unit lives in a layer's weights: the per-architecture contract.

Every architecture's config answers `units()` with a `UnitLayout`: which parameters of a layer
hold entries that belong to one head (fused Q|K|V rows, an output projection's columns, DeBERTa's
positional projections) or to one FFN unit (an up projection's row, GLU's rows j and F+j, a down
projection's column). Physical pruning, the dense Hugging Face export, finding silent heads in a
zero-filled export and ticket sharing's update masks read this description alone, so none of them
names an architecture.

Within a parameter, along `dim`, entries are `groups` equal blocks, each [unit 0 | unit 1 | ...]
with `per_unit` entries per unit: Dh for a head, 1 for an FFN unit. A layer's units are counted in
its current order (after pruning, its kept heads; an FFN block's first `width` units).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


class LayerSizes:
    """What every architecture's config says alike about its layers' sizes: each layer's kept heads
    (original indices) and FFN width after physical pruning, None before. A base of the frozen config
    dataclasses, whose fields include num_layers, num_heads, hidden_size, intermediate_size,
    kept_heads and ffn_sizes."""

    def check_layer_sizes(self) -> None:
        for name, per_layer in (("kept_heads", self.kept_heads), ("ffn_sizes", self.ffn_sizes)):
            if per_layer is not None and len(per_layer) != self.num_layers:
                raise ValueError(f"{name} has {len(per_layer)} entries for {self.num_layers} layers")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_heads(self, layer: int) -> tuple[int, ...]:
        return tuple(range(self.num_heads)) if self.kept_heads is None else self.kept_heads[layer]

    def layer_ffn_size(self, layer: int) -> int:
        return self.intermediate_size if self.ffn_sizes is None else self.ffn_sizes[layer]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The config of a config.json's dict: JSON's lists back to the tuples a frozen config holds."""
        d = dict(d)
        if d.get("kept_heads") is not None:
            d["kept_heads"] = tuple(tuple(h) for h in d["kept_heads"])
        if d.get("ffn_sizes") is not None:
            d["ffn_sizes"] = tuple(d["ffn_sizes"])
        return cls(**d)


@dataclass(frozen=True)
class Place:
    """The entries of one layer parameter that belong to units."""

    param: str  # its name under `layers.{i}.`, e.g. "attention.qkv.weight"
    dim: int = 0  # 0: rows (output features, or a bias), 1: columns (input features)
    groups: int = 1  # Q|K|V: 3; a GLU's input|gate halves: 2


@dataclass(frozen=True)
class UnitLayout:
    heads: tuple[Place, ...]  # head h's entries: head_dim per group
    ffn: tuple[Place, ...]  # FFN unit j's entries: one per group
    ffn_block: str  # the module that holds the whole FFN block, e.g. "ffn.": gone when a layer's width is 0
    ffn_silent: tuple[str, ...]  # parameters that, all zero, make the whole FFN block add nothing
    # Ways a head can add exactly nothing: its entries in every (parameter, group) of one set are zero
    # (its output-projection columns; or its value rows and value bias: softmax(QKᵀ)·0 = 0).
    head_silencers: tuple[tuple[tuple[str, int], ...], ...] = ()

    def place(self, rest: str) -> tuple[Place, str] | None:
        """(the place of parameter `rest` of a layer, "heads" or "ffn"), or None when no unit owns entries there."""
        for kind, places in (("heads", self.heads), ("ffn", self.ffn)):
            for p in places:
                if p.param == rest:
                    return p, kind
        return None


def layer_param(name: str) -> tuple[int, str] | None:
    """("layers.3.attention.qkv.weight" ->) (3, "attention.qkv.weight"); None outside the layers."""
    if not name.startswith("layers."):
        return None
    _, i, rest = name.split(".", 2)
    return int(i), rest


def entries(place: Place, positions, units: int, per_unit: int) -> Tensor:
    """Indices along `place.dim` of the units at `positions`, in a parameter holding `units` units."""
    offsets = torch.tensor(list(positions), dtype=torch.long)[:, None] * per_unit + torch.arange(per_unit)  # P,per
    blocks = torch.arange(place.groups)[:, None] * units * per_unit  # groups,1
    return (blocks + offsets.reshape(1, -1)).reshape(-1)  # groups·P·per


def take(tensor: Tensor, place: Place, positions, units: int, per_unit: int, group: int | None = None) -> Tensor:
    """The entries of the units at `positions` (in that order; in one group, if given), the others dropped."""
    index = entries(place, positions, units, per_unit)
    if group is not None:
        index = index.view(place.groups, -1)[group]
    return tensor.index_select(place.dim, index.to(tensor.device))


def silent_head(layout: UnitLayout, tensors: dict[str, Tensor], position: int, heads: int, head_dim: int) -> bool:
    """Whether the head at `position` (of `heads`) in a layer's `tensors` (named under the layer) adds
    exactly nothing: its entries in every part of one of the layout's `head_silencers` are zero."""
    places = {p.param: p for p in layout.heads}

    def zero(param: str, group: int) -> bool:
        tensor = tensors.get(param)  # an optional bias that is absent adds nothing
        return tensor is None or not take(tensor, places[param], [position], heads, head_dim, group).any()

    return any(all(zero(*part) for part in parts) for parts in layout.head_silencers)


def put(tensor: Tensor, place: Place, slots, total: int, per_unit: int) -> Tensor:
    """`tensor`'s units placed at `slots` of a parameter with `total` units; zeros elsewhere."""
    shape = list(tensor.shape)
    shape[place.dim] = place.groups * total * per_unit
    index = entries(place, slots, total, per_unit).to(tensor.device)
    return tensor.new_zeros(shape).index_copy(place.dim, index, tensor)


def unit_mask(place: Place, keep: Tensor, per_unit: int, ndim: int) -> Tensor:
    """A bool mask broadcasting to the parameter: True on the entries of the units `keep` marks."""
    along = keep.repeat_interleave(per_unit).repeat(place.groups)  # groups·n·per
    if ndim == 1:
        return along
    return along[:, None] if place.dim == 0 else along[None, :]


def per_unit(config, kind: str) -> int:
    return config.head_dim if kind == "heads" else 1
