"""A BERT encoder with differentiable head and FFN masks, readable top to bottom.

Dimensions: B batch, T tokens, D hidden, H heads (of this layer), Dh head dim, F FFN width,
L layers, H0 heads per layer in the pre-trained model (masks are always indexed by those).

Masks are forward arguments, never module state (Michel et al. 2019; Liang et al. 2021):
  head_mask (L, H0) or (B, L, H0) multiplies each head's context before the output projection;
  ffn_mask  (L,)    or (B, L)     multiplies the FFN output before residual + LayerNorm.
Attention runs through F.scaled_dot_product_attention, so a mask never forces a slow path (the one
exception, bf16/fp16 training on CPU, is `attend`'s).
A padded batch is packed to its N real tokens for everything but attention (projections, FFN,
LayerNorm): padding then costs no matmul work; outputs at padding positions are zeros.
A physically pruned model keeps, per layer, the original indices of its surviving heads, so a
mask or ticket made for the full model applies to it unchanged. MPNet's relative-position bias is one
(buckets, H0) table for all layers: it stays whole when heads are pruned, and each layer takes its kept
heads' columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from st.errors import UserError
from st.models.attention import Dropout, attend, relative_buckets
from st.models.packing import Packing, pack_batch, scale_tokens
from st.models.units import LayerSizes, Place, UnitLayout


@dataclass(frozen=True)
class BertConfig(LayerSizes):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # H0: heads per layer before pruning; fixes the head dim D / H0
    intermediate_size: int  # F0: FFN width before pruning
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 1: one token type (RoBERTa, XLM-R), given ids are ignored; 0: none (DistilBERT)
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # The family (config.json model_type) and its embedding rule; the defaults are BERT's.
    model_type: str = "bert"
    embedding_size: int | None = None  # ELECTRA: embedding width E != D, projected to D after the LayerNorm
    positions_after_padding: bool = False  # RoBERTa/XLM-R: position ids start at pad_token_id + 1
    sinusoidal_positions: bool = False  # DistilBERT option: a fixed sinusoidal position table, never trained
    # MPNet: a learned bias per head and relative-position bucket (T5-style, bidirectional), added to every
    # layer's attention scores; 0 = none.
    relative_attention_buckets: int = 0
    # After physical pruning: the original indices of each layer's kept heads, and each layer's
    # FFN width (0 = FFN removed). None means "all heads" / "full width".
    kept_heads: tuple[tuple[int, ...], ...] | None = None
    ffn_sizes: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:  # a hand-edited config.json: strings, negatives, floats
                raise UserError(f"the model config's {name} must be a positive whole number, got {value!r}")
        for name in ("layer_norm_eps", "hidden_dropout", "attention_dropout", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UserError(f"the model config's {name} must be a non-negative number, got {value!r}")
        if not self.hidden_dropout < 1 or not self.attention_dropout < 1:
            raise UserError("the model config's dropout probabilities must be below 1")
        for name in ("type_vocab_size", "pad_token_id", "relative_attention_buckets"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise UserError(f"the model config's {name} must be a whole number >= 0, got {value!r}")
        if self.relative_attention_buckets and (
            self.relative_attention_buckets < 4 or self.relative_attention_buckets % 2
        ):
            raise UserError(  # two halves (keys before / after), each of exact and logarithmic buckets
                f"the model config's relative_attention_buckets must be 0 or an even number >= 4, "
                f"got {self.relative_attention_buckets!r}"
            )
        if self.embedding_size is not None and (type(self.embedding_size) is not int or self.embedding_size < 1):
            raise UserError(
                f"the model config's embedding_size must be a positive whole number, got {self.embedding_size!r}"
            )
        check_allocatable(self)
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"the model config's hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        self.check_layer_sizes()

    @property
    def max_tokens(self) -> int:
        """The longest input the position table covers (RoBERTa spends pad_token_id + 1 rows before it)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.positions_after_padding else 0)

    def units(self) -> UnitLayout:
        """Where each head and FFN unit lives in a layer's weights (the contract of `st.models.units`)."""
        return BERT_UNITS

    def with_dropout(self, p: float) -> "BertConfig":
        """This config with every dropout of the encoder at `p` (a run's --dropout)."""
        return replace(self, hidden_dropout=p, attention_dropout=p)


# Q, K and V are one fused projection: head h owns Dh rows of each of its three blocks and Dh input
# columns of the output projection. FFN unit j owns a row of `up` and a column of `down`.
BERT_UNITS = UnitLayout(
    heads=(Place("attention.qkv.weight", 0, 3), Place("attention.qkv.bias", 0, 3), Place("attention.out.weight", 1)),
    ffn=(Place("ffn.up.weight"), Place("ffn.up.bias"), Place("ffn.down.weight", 1)),
    ffn_block="ffn.",
    ffn_silent=("ffn.down.weight", "ffn.down.bias"),
    head_silencers=((("attention.out.weight", 0),), (("attention.qkv.weight", 2), ("attention.qkv.bias", 2))),
)


def check_allocatable(c: BertConfig) -> None:
    """Refuse, before any tensor is built, a config whose fp32 weights would not fit in this machine's
    memory (a hand-edited size: hidden_size 4,000,000 asks for 192 TB), naming its largest part."""
    E = getattr(c, "embedding_size", None) or c.hidden_size  # any architecture's config: ELECTRA's E, else D
    parts = {  # parameters, by the fields that size them
        "vocab_size": c.vocab_size * E,
        "max_position_embeddings": c.max_position_embeddings * E,
        "hidden_size": c.num_layers * 4 * c.hidden_size * c.hidden_size,
        "intermediate_size": c.num_layers * 2 * c.hidden_size * c.intermediate_size,
    }
    need = 4 * sum(parts.values())  # bytes of fp32 weights, before gradients and optimizer state
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: nothing to compare against
        return
    if need > have:
        field = max(parts, key=parts.get)
        raise UserError(
            f"the model config's {field} = {getattr(c, field):,} makes weights of {need / 2**30:,.0f} GiB, more than "
            f"this machine's {have / 2**30:,.0f} GiB of memory: is config.json damaged?"
        )


class Embeddings(nn.Module):
    """word + position (+ token type), LayerNorm, dropout (+ ELECTRA's projection), with each family's
    rule: see the BertConfig fields model_type to sinusoidal_positions. E = embedding width (D unless ELECTRA)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        E = c.embedding_size or c.hidden_size
        self.pad, self.after_padding = c.pad_token_id, c.positions_after_padding
        self.word = nn.Embedding(c.vocab_size, E, padding_idx=c.pad_token_id)
        # RoBERTa's position row pad_token_id belongs to pad tokens only; HF keeps it zero and untrained.
        self.position = nn.Embedding(
            c.max_position_embeddings, E, padding_idx=c.pad_token_id if self.after_padding else None
        )
        if c.sinusoidal_positions:  # HF DistilBERT freezes the table; so do we (the optimizer skips it)
            self.position.weight.requires_grad_(False)
        self.token_type = nn.Embedding(c.type_vocab_size, E) if c.type_vocab_size else None
        self.norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)
        self.project = nn.Linear(E, c.hidden_size) if E != c.hidden_size else None

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:  # B,T -> B,T,D
        if self.after_padding:  # as HF: counted over input_ids != pad (not the attention mask); pads get pad
            real = input_ids.ne(self.pad).long()  # B,T
            positions = torch.cumsum(real, dim=1) * real + self.pad  # B,T
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # T
        x = self.word(input_ids) + self.position(positions)  # B,T,E
        if self.token_type is not None and self.token_type.num_embeddings == 1:
            # One token type: HF's RoBERTa tokenizers pass none, so the model always adds type 0,
            # whatever ids a pair template (or a BERT-style collate) produced.
            x = x + self.token_type.weight[0]
        elif self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        x = self.dropout(self.norm(x))
        return x if self.project is None else self.project(x)  # B,T,D


class Attention(nn.Module):
    def __init__(self, c: BertConfig, layer: int):
        super().__init__()
        heads = c.layer_heads(layer)
        self.n_heads, self.head_dim = len(heads), c.head_dim
        inner = self.n_heads * self.head_dim
        # One fused projection for Q, K and V: one matmul instead of three, forward and backward.
        self.qkv = nn.Linear(c.hidden_size, 3 * inner)  # rows: [Q heads | K heads | V heads]
        self.out = nn.Linear(inner, c.hidden_size)
        self.dropout_p = c.attention_dropout
        # Original head indices, to pick this layer's entries out of a full-size (.., H0) mask.
        full = heads == tuple(range(c.num_heads))
        self.register_buffer("kept", None if full else torch.tensor(heads, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor, pack: Packing | None, head_mask: Tensor | None, bias: Tensor | None = None) -> Tensor:
        qkv = self.qkv(x)  # B,T,3·H·Dh or, packed, N,3·H·Dh
        dropout = self.dropout_p if self.training else 0.0
        if pack is not None and bias is None and use_varlen(qkv, dropout):  # varlen_attn takes no bias
            return self.out(self.varlen(qkv, pack, head_mask))  # N,D
        if pack is not None:
            qkv = pack.unpack(qkv)  # B,T,3·H·Dh
        B, T, _ = qkv.shape
        # Unbind along the Q/K/V axis, then transpose: in backward the three gradients stack straight
        # into qkv's layout (a permute first would cost an extra copy of the whole tensor).
        q, k, v = (t.transpose(1, 2) for t in qkv.view(B, T, 3, self.n_heads, self.head_dim).unbind(2))  # 3 × B,H,T,Dh
        if bias is not None:  # 1,H0,T,T or B,H0,T,T, padding included: this layer's heads' part
            mask = bias if self.kept is None else bias[:, self.kept]
        else:
            mask = None if pack is None else pack.key_padding
        ctx = attend(q, k, v, mask, dropout)  # B,H,T,Dh
        if head_mask is not None:  # (H0,) or (B, H0)
            if self.kept is not None:
                head_mask = head_mask[..., self.kept]
            ctx = ctx * head_mask.reshape(-1, self.n_heads, 1, 1).to(ctx.dtype)
        ctx = ctx.transpose(1, 2).reshape(B, T, -1)  # B,T,H·Dh
        return self.out(ctx if pack is None else pack.pack(ctx))  # B,T,D or N,D

    def varlen(self, qkv: Tensor, pack: Packing, head_mask: Tensor | None) -> Tensor:  # N,3·H·Dh -> N,H·Dh
        """Flash attention over the N real tokens (CUDA): padding costs nothing, in attention too."""
        from torch.nn.attention.varlen import varlen_attn

        N = qkv.shape[0]
        q, k, v = qkv.view(N, 3, self.n_heads, self.head_dim).unbind(1)  # 3 × N,H,Dh
        offsets, longest = pack.offsets()
        ctx = varlen_attn(q, k, v, offsets, offsets, longest, longest)  # N,H,Dh
        if head_mask is not None:  # (H0,) or (B, H0)
            if self.kept is not None:
                head_mask = head_mask[..., self.kept]
            per_token = head_mask if head_mask.dim() == 1 else pack.per_token(head_mask)  # H or N,H
            ctx = ctx * per_token.reshape(-1, self.n_heads, 1).to(ctx.dtype)
        return ctx.reshape(N, -1)


class FeedForward(nn.Module):
    def __init__(self, c: BertConfig, width: int):
        super().__init__()
        self.up = nn.Linear(c.hidden_size, width)  # D -> F
        self.down = nn.Linear(width, c.hidden_size)  # F -> D

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))  # exact (erf) GELU, as BERT's "gelu"


class Layer(nn.Module):
    def __init__(self, c: BertConfig, layer: int):
        super().__init__()
        self.attention = Attention(c, layer)
        self.attention_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        width = c.layer_ffn_size(layer)
        # A removed FFN block keeps its LayerNorm: the layer then computes LayerNorm(attention_out).
        self.ffn = FeedForward(c, width) if width > 0 else None
        self.ffn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)

    def forward(self, x, pack, head_mask, ffn_mask, bias=None):
        a = self.attention_norm(x + self.dropout(self.attention(x, pack, head_mask, bias)))  # B,T,D or N,D
        if self.ffn is None:
            return self.ffn_norm(a)
        f = scale_tokens(self.dropout(self.ffn(a)), ffn_mask, pack)  # B,T,D or N,D; ffn_mask () or (B,)
        return self.ffn_norm(a + f)


class Bert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_layers))
        buckets = config.relative_attention_buckets
        self.relative_bias = nn.Embedding(buckets, config.num_heads) if buckets else None  # buckets,H0
        self.apply(lambda m: init_weights(m, config.initializer_range))
        if config.sinusoidal_positions:
            with torch.no_grad():
                self.embeddings.position.weight.copy_(sinusoidal_table(*self.embeddings.position.weight.shape))

    def forward(
        self,
        input_ids: Tensor,  # B,T
        token_type_ids: Tensor | None = None,  # B,T
        attention_mask: Tensor | None = None,  # B,T: 1 for real tokens, 0 for padding
        head_mask: Tensor | None = None,  # L,H0 or B,L,H0
        ffn_mask: Tensor | None = None,  # L or B,L
        packed: bool = True,  # False: keep B,T and only mask attention (graphs without data-dependent shapes)
    ) -> Tensor:  # B,T,D
        x = self.embeddings(input_ids, token_type_ids)  # B,T,D
        x, pack = pack_batch(x, attention_mask, packed)  # N,D: padding costs nothing outside attention
        bias = None if self.relative_bias is None else self.position_bias(input_ids.shape[1], pack)
        for i, layer in enumerate(self.layers):
            x = layer(x, pack, _layer_slice(head_mask, i, 2), _layer_slice(ffn_mask, i, 1), bias)
        return x if pack is None else pack.unpack(x)  # B,T,D, zeros at padding

    def position_bias(self, T: int, pack: Packing | None) -> Tensor:  # 1,H0,T,T or B,H0,T,T
        """MPNet's relative-position bias, once per forward for all layers, with padding keys at -inf
        (or Padded's additive mask): one additive attention mask, as SDPA takes it."""
        buckets = relative_buckets(T, self.relative_bias.num_embeddings, self.relative_bias.weight.device)  # T,T
        bias = self.relative_bias(buckets).permute(2, 0, 1)[None]  # 1,H0,T,T
        if pack is None:
            return bias
        if pack.key_padding.dtype == torch.bool:  # B,1,1,T: True = attend
            return bias.masked_fill(~pack.key_padding, float("-inf"))
        return bias + pack.key_padding


VARLEN = True  # tests switch it off to compare against the padded path


def use_varlen(qkv: Tensor, dropout: float) -> bool:
    """Varlen flash attention runs on CUDA, in bf16/fp16, without dropout (it has none): evaluation,
    importance scoring; training and everything else take SDPA over the padded batch."""
    return VARLEN and dropout == 0 and qkv.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16)


def _layer_slice(mask: Tensor | None, i: int, unbatched_dims: int) -> Tensor | None:
    """Layer i's entries of a mask shaped (L, ...) or, with a batch dimension, (B, L, ...)."""
    if mask is None:
        return None
    return mask[i] if mask.dim() == unbatched_dims else mask[:, i]


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:  # ModernBERT's norms have none unless norm_bias
            nn.init.zeros_(module.bias)


def sinusoidal_table(positions: int, dim: int) -> Tensor:  # P,E
    """DistilBERT's fixed position table: sin on even columns, cos on odd ones (Vaswani et al. 2017)."""
    angle = torch.arange(positions, dtype=torch.float64)[:, None] / torch.pow(
        10000.0, 2 * (torch.arange(dim) // 2) / dim
    )
    table = torch.empty(positions, dim, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angle[:, 0::2]), torch.cos(angle[:, 1::2])
    return table.float()
