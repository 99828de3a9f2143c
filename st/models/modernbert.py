"""A ModernBERT encoder (Warner et al. 2024) with differentiable head and FFN masks, top to bottom.

Dimensions: B batch, T tokens, N real tokens of a padded batch, D hidden, H heads (of this layer),
Dh head dim, F GLU width (the MLP's `up` has 2·F rows), L layers, H0 heads per layer before pruning.

What differs from `st.models.bert` (the contract is the same: masks, packing, kept head indices):
  - no position or token-type embeddings; rotary embeddings (rotate-half) turn q and k instead, with
    one base for global layers and another for local ones;
  - pre-LN layers, h = h + attn(norm(h)), h = h + mlp(norm(h)); layer 0 has no attention norm, and a
    final norm follows the last layer; norms have a bias only if `norm_bias`;
  - layer i is global when i % global_attn_every_n_layers == 0; other layers attend only to keys
    within local_attention // 2 positions on either side;
  - the MLP is a GeGLU: up = [input | gate], down(act(input) · gate), so FFN unit j is rows j and F+j
    of `up` and column j of `down`.
Masks (Liang et al. 2021): head_mask (L, H0) or (B, L, H0) multiplies each head's context before the
output projection; ffn_mask (L,) or (B, L) multiplies the whole MLP output before the residual add,
so ν = 0 leaves the residual stream as it was (the pre-LN reading of the paper's FFN mask).
A position is a token's index in its row, as in transformers' sdpa/eager path: with right padding,
its index in its own example.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from st.errors import UserError
from st.models.attention import Dropout, attend
from st.models.bert import check_allocatable, init_weights
from st.models.packing import Packing, Padded, pack_batch, scale_tokens
from st.models.units import LayerSizes, Place, UnitLayout

# The activations st implements, by their transformers names (ACT2FN): "gelu" is the exact (erf) one.
# Encoders' MLPs and task heads (`st.models.heads`) alike.
ACTIVATIONS = {
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class ModernBertConfig(LayerSizes):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # H0: heads per layer before pruning; fixes the head dim D / H0
    intermediate_size: int  # F0: GLU width before pruning (the up projection has 2·F0 rows)
    max_position_embeddings: int = 8192  # no table: the longest input the model was trained for
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    global_attn_every_n_layers: int = 3
    local_attention: int = 128  # a local layer's window: local_attention // 2 keys on either side
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0  # attention probabilities, and the attention output (as transformers)
    mlp_dropout: float = 0.0
    hidden_activation: str = "gelu"
    # The classification head (`st.models.heads.Pooler`): pooling, then norm(act(dense(x))).
    classifier_pooling: str = "cls"
    classifier_bias: bool = False  # the dense layer's; the final classifier always has a bias
    classifier_activation: str = "gelu"
    initializer_range: float = 0.02
    pad_token_id: int = 50283
    model_type: str = "modernbert"
    # After physical pruning, as BertConfig: each layer's kept heads (original indices) and GLU width.
    kept_heads: tuple[tuple[int, ...], ...] | None = None
    ffn_sizes: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _check(self, name, lambda v: type(v) is int and v >= 1, "a positive whole number")
        for name in ("max_position_embeddings", "global_attn_every_n_layers", "local_attention"):
            _check(self, name, lambda v: type(v) is int and v >= 1, "a positive whole number")
        _check(self, "pad_token_id", lambda v: type(v) is int and 0 <= v < self.vocab_size, "a token id (< vocab_size)")
        for name in ("norm_eps", "initializer_range", "global_rope_theta", "local_rope_theta"):
            _check(self, name, lambda v: _number(v) and v > 0, "a positive number")
        for name in ("embedding_dropout", "attention_dropout", "mlp_dropout"):
            _check(self, name, lambda v: _number(v) and 0 <= v < 1, "a probability in [0, 1)")
        for name in ("norm_bias", "attention_bias", "mlp_bias", "classifier_bias"):
            _check(self, name, lambda v: isinstance(v, bool), "true or false")
        for name in ("hidden_activation", "classifier_activation"):
            _check(self, name, lambda v: v in ACTIVATIONS, f"one of {', '.join(map(repr, ACTIVATIONS))}")
        _check(self, "classifier_pooling", lambda v: v in POOLINGS, "'cls' or 'mean'")
        check_allocatable(self)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise UserError(
                f"the model config's hidden_size {self.hidden_size} must be num_heads {self.num_heads} times an "
                "even head size (rotary embeddings turn pairs of features)"
            )
        self.check_layer_sizes()

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @property
    def type_vocab_size(self) -> int:
        return 0  # no token types: pairs are told apart by [SEP] alone (ONNX and speed feeds read this)

    def is_global(self, layer: int) -> bool:
        return layer % self.global_attn_every_n_layers == 0

    def units(self) -> UnitLayout:
        """Where each head and FFN unit lives in a layer's weights (the contract of `st.models.units`)."""
        return MODERNBERT_UNITS

    def with_dropout(self, p: float) -> "ModernBertConfig":
        """This config with every dropout of the encoder at `p` (a run's --dropout)."""
        return replace(self, embedding_dropout=p, attention_dropout=p, mlp_dropout=p)


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _check(c: ModernBertConfig, name: str, ok, what: str) -> None:
    value = getattr(c, name)
    if not ok(value):  # a hand-edited config.json: strings, negatives, unknown names
        raise UserError(f"the model config's {name} must be {what}, got {value!r}")


# Wqkv is one fused projection (rows [Q heads | K heads | V heads]): head h owns Dh rows of each block
# and Dh columns of `out`. GLU unit j owns row j of the input half and row F+j of the gate half of `up`,
# and column j of `down`. The MLP's norm is inside the block: a removed block leaves no parameter unused.
MODERNBERT_UNITS = UnitLayout(
    heads=(Place("attention.qkv.weight", 0, 3), Place("attention.qkv.bias", 0, 3), Place("attention.out.weight", 1)),
    ffn=(Place("ffn.up.weight", 0, 2), Place("ffn.up.bias", 0, 2), Place("ffn.down.weight", 1)),
    ffn_block="ffn.",
    ffn_silent=("ffn.down.weight", "ffn.down.bias"),
    head_silencers=((("attention.out.weight", 0),), (("attention.qkv.weight", 2), ("attention.qkv.bias", 2))),
)


def layer_norm(c: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)


def rotary(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:  # T -> 2 × T,1,Dh
    """cos and signed sin of each position's angles, computed in fp32 as transformers does; the two halves
    of the head dim share frequencies (rotate-half). The sin's first half is negated once here, so that
    `rotate` needs no negation per layer: rotate_half(x)·sin = [x2 | x1]·[-sin | sin]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)  # Dh/2
    angles = positions.float()[:, None] * inv_freq  # T,Dh/2
    cos, sin = angles.cos(), angles.sin()
    shape = (-1, 1, head_dim)  # T,1,Dh: broadcast over heads
    return torch.cat((cos, cos), -1).view(shape), torch.cat((-sin, sin), -1).view(shape)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:  # x: B,T,H,Dh (or N,H,Dh): q or k
    # [x2 | x1] is x rolled by half the head dim: one pass, and its backward is one roll too (a chunk
    # and cat cost a zero-filled gradient per half, 8% of a training step).
    return x * cos.to(x.dtype) + x.roll(x.shape[-1] // 2, -1) * signed_sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModernBertConfig, layer: int):
        super().__init__()
        heads = c.layer_heads(layer)
        self.n_heads, self.head_dim = len(heads), c.head_dim
        inner = self.n_heads * self.head_dim
        self.qkv = nn.Linear(c.hidden_size, 3 * inner, bias=c.attention_bias)  # rows: [Q heads | K heads | V heads]
        self.out = nn.Linear(inner, c.hidden_size, bias=c.attention_bias)
        self.dropout_p = c.attention_dropout
        self.out_dropout = Dropout(c.attention_dropout)  # transformers drops the projected output too
        self.is_global = c.is_global(layer)
        self.window = -1 if self.is_global else c.local_attention // 2  # keys on either side
        # Original head indices, to pick this layer's entries out of a full-size (.., H0) mask.
        full = heads == tuple(range(c.num_heads))
        self.register_buffer("kept", None if full else torch.tensor(heads, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor, pack: Packing | None, rope, mask: Tensor | None, head_mask: Tensor | None) -> Tensor:
        qkv = self.qkv(x)  # B,T,3·H·Dh or, packed, N,3·H·Dh
        cos, sin = rope  # T,1,Dh each
        dropout = self.dropout_p if self.training else 0.0
        if pack is not None and not isinstance(pack, Padded) and use_varlen(qkv, dropout):
            return self.out_dropout(self.out(self.varlen(qkv, cos, sin, pack, head_mask)))  # N,D
        if pack is not None:
            qkv = pack.unpack(qkv)  # B,T,3·H·Dh
        B, T, _ = qkv.shape
        # unbind, not slices: its backward stacks the three gradients instead of zero-filling qkv's twice
        q, k, v = qkv.view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # 3 × B,T,H,Dh
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # a position is the index in the row
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # 3 × B,H,T,Dh
        ctx = attend(q, k, v, mask, dropout)  # B,H,T,Dh
        if head_mask is not None:  # (H0,) or (B, H0)
            if self.kept is not None:
                head_mask = head_mask[..., self.kept]
            ctx = ctx * head_mask.reshape(-1, self.n_heads, 1, 1).to(ctx.dtype)
        ctx = ctx.transpose(1, 2).reshape(B, T, -1)  # B,T,H·Dh
        return self.out_dropout(self.out(ctx if pack is None else pack.pack(ctx)))  # B,T,D or N,D

    def varlen(self, qkv: Tensor, cos: Tensor, sin: Tensor, pack: Packing, head_mask: Tensor | None) -> Tensor:
        """Flash attention over the N real tokens (CUDA), a local layer's window as its window_size."""
        from torch.nn.attention.varlen import varlen_attn

        N = qkv.shape[0]
        q, k, v = qkv.view(N, 3, self.n_heads, self.head_dim).unbind(1)  # 3 × N,H,Dh
        at = pack.index % pack.T  # N: each real token's position in its row
        cos, sin = cos[at], sin[at]  # N,1,Dh
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        offsets, longest = pack.offsets()
        window = (self.window, self.window)
        ctx = varlen_attn(q, k, v, offsets, offsets, longest, longest, window_size=window)  # N,H,Dh
        if head_mask is not None:  # (H0,) or (B, H0)
            if self.kept is not None:
                head_mask = head_mask[..., self.kept]
            per_token = head_mask if head_mask.dim() == 1 else pack.per_token(head_mask)  # H or N,H
            ctx = ctx * per_token.reshape(-1, self.n_heads, 1).to(ctx.dtype)
        return ctx.flatten(1)  # N,H·Dh


VARLEN = True  # False: every layer takes the padded path (bert.VARLEN's twin; no test switches this one yet)


def layer_slice(mask: Tensor | None, i: int, unbatched_dims: int) -> Tensor | None:
    """Layer i's entries of a mask shaped (L, ...) or, with a batch dimension, (B, L, ...)."""
    if mask is None:
        return None
    return mask[i] if mask.dim() == unbatched_dims else mask[:, i]


def use_varlen(q: Tensor, dropout: float) -> bool:
    """As `st.models.bert.use_varlen`: CUDA, bf16/fp16, no dropout (evaluation, importance scoring)."""
    return VARLEN and dropout == 0 and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


class FeedForward(nn.Module):
    """The GeGLU block with its pre-norm: down(act(input) · gate), [input | gate] = up(norm(x))."""

    def __init__(self, c: ModernBertConfig, width: int):
        super().__init__()
        self.norm = layer_norm(c)
        self.up = nn.Linear(c.hidden_size, 2 * width, bias=c.mlp_bias)  # D -> 2·F: [input | gate]
        self.down = nn.Linear(width, c.hidden_size, bias=c.mlp_bias)  # F -> D
        self.act = ACTIVATIONS[c.hidden_activation]
        self.dropout = Dropout(c.mlp_dropout)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.up(self.norm(x)).chunk(2, dim=-1)  # 2 × N,F or B,T,F
        return self.down(self.dropout(self.act(value) * gate))  # N,D or B,T,D


class Layer(nn.Module):
    def __init__(self, c: ModernBertConfig, layer: int):
        super().__init__()
        # Layer 0's input is the embedding LayerNorm's output already: no second norm.
        self.attention_norm = layer_norm(c) if layer > 0 else nn.Identity()
        self.attention = Attention(c, layer)
        width = c.layer_ffn_size(layer)
        self.ffn = FeedForward(c, width) if width > 0 else None  # removed: the residual stream passes through

    def forward(self, x, pack, rope, mask, head_mask, ffn_mask):  # N,D or B,T,D
        x = x + self.attention(self.attention_norm(x), pack, rope, mask, head_mask)
        if self.ffn is None:
            return x
        return x + scale_tokens(self.ffn(x), ffn_mask, pack)  # N,D or B,T,D; ffn_mask () or (B,)


class Embeddings(nn.Module):
    """Token embeddings, LayerNorm, dropout: no positions (rotary, in attention) and no token types."""

    def __init__(self, c: ModernBertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.norm = layer_norm(c)
        self.dropout = Dropout(c.embedding_dropout)

    def forward(self, input_ids: Tensor) -> Tensor:  # B,T -> B,T,D
        return self.dropout(self.norm(self.word(input_ids)))


class ModernBert(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_layers))
        self.final_norm = layer_norm(config)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(
        self,
        input_ids: Tensor,  # B,T
        token_type_ids: Tensor | None = None,  # ignored: ModernBERT has no token types
        attention_mask: Tensor | None = None,  # B,T: 1 for real tokens, 0 for padding
        head_mask: Tensor | None = None,  # L,H0 or B,L,H0
        ffn_mask: Tensor | None = None,  # L or B,L
        packed: bool = True,  # False: keep B,T and only mask attention (graphs without data-dependent shapes)
    ) -> Tensor:  # B,T,D
        c, T = self.config, input_ids.shape[1]
        x = self.embeddings(input_ids)  # B,T,D
        positions = torch.arange(T, device=input_ids.device)  # T
        x, pack = pack_batch(x, attention_mask, packed)  # N,D: padding costs nothing outside attention
        ropes = {theta: rotary(positions, c.head_dim, theta) for theta in {c.global_rope_theta, c.local_rope_theta}}
        global_mask = None if pack is None else pack.key_padding  # B,1,1,T
        local = not all(c.is_global(i) for i in range(c.num_layers))
        local_mask = self.local_mask(T, pack, input_ids.device) if local else None
        for i, layer in enumerate(self.layers):
            is_global = layer.attention.is_global
            rope = ropes[c.global_rope_theta if is_global else c.local_rope_theta]
            mask = global_mask if is_global else local_mask
            x = layer(x, pack, rope, mask, layer_slice(head_mask, i, 2), layer_slice(ffn_mask, i, 1))
        x = self.final_norm(x)
        return x if pack is None else pack.unpack(x)  # B,T,D, zeros at padding (Padded: as computed)

    def local_mask(self, T: int, pack: Packing | None, device: torch.device) -> Tensor:  # 1,1,T,T or B,1,T,T
        """Local layers' mask: keys within local_attention // 2 positions of the query, and real. Every
        row keeps its diagonal, so a padding query is never left with no key (softmax would give NaN)."""
        position = torch.arange(T, device=device)
        distance = (position[:, None] - position[None, :]).abs()  # T,T
        band = (distance <= self.config.local_attention // 2)[None, None]  # 1,1,T,T
        if pack is None:
            return band
        if pack.key_padding.dtype == torch.bool:  # Packing: True = attend
            return (pack.key_padding & band) | torch.eye(T, dtype=torch.bool, device=device)
        # Padded (additive): the band's outside at the lowest float, as transformers, never -inf + -inf
        return pack.key_padding.masked_fill(~band, torch.finfo(pack.key_padding.dtype).min)
