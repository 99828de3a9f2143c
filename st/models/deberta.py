"""A DeBERTa-v2/v3 encoder (He et al. 2021, 2023) with differentiable head and FFN masks, readable top to bottom.

Dimensions: B batch, T tokens, D hidden, E embedding width, H heads (of this layer), Dh head dim, F FFN width,
L layers, H0 heads per layer in the pre-trained model (masks are always indexed by those), R relative-position
rows in use (at most 2·span).

The layers are BERT's post-LN layers; attention is disentangled: besides content-to-content q_i·k_j, a head
scores content-to-position q_i·pk[δ(i, j)] (c2p) and position-to-content k_j·pq[δ(j, i)] (p2c), where δ is
the bucketed relative position i − j shifted into the rows of one relative-embedding table shared by all
layers (pk, pq: that table through the layer's key/query projection, or its own pos_key/pos_query ones).
Every term is divided by sqrt(Dh · (1 + number of position terms)). The position terms become one additive
attention mask per layer, so the scores still go through F.scaled_dot_product_attention.

Masks and packing are as in `st.models.bert`: head_mask (L, H0) or (B, L, H0) multiplies each head's context
before the output projection, ffn_mask (L,) or (B, L) the FFN output before residual + LayerNorm; per-token
work runs on the N real tokens. A pruned head loses its rows of Q/K/V (and of the positional projections)
and its output-projection columns; the relative-embedding table stays whole (it belongs to no head).
Semantics follow transformers 4.57.6's modeling_deberta_v2.py; options it has and this file does not
(the v2-xlarge convolution, other activations) are refused by the config, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from st.errors import UserError
from st.models.attention import Dropout, attend
from st.models.bert import FeedForward, check_allocatable, init_weights
from st.models.packing import Packing, pack_batch, scale_tokens
from st.models.units import LayerSizes, Place, UnitLayout

POSITION_TERMS = ("c2p", "p2c")


@dataclass(frozen=True)
class DebertaV2Config(LayerSizes):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # H0: heads per layer before pruning; fixes the head dim D / H0
    intermediate_size: int  # F0: FFN width before pruning
    max_position_embeddings: int = 512
    type_vocab_size: int = 0  # 0: no token types (v3)
    layer_norm_eps: float = 1e-7
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    model_type: str = "deberta-v2"
    embedding_size: int | None = None  # E != D: word embeddings of width E, projected to D (no bias) before the norm
    position_biased_input: bool = True  # absolute position embeddings added to the input (False in v3)
    relative_attention: bool = False  # the disentangled c2p/p2c terms (True in v2 and v3)
    position_buckets: int = -1  # > 0: log-bucketed relative positions, 2·buckets table rows (256 in v3)
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    pos_att_type: tuple[str, ...] = ()  # of POSITION_TERMS
    share_att_key: bool = False  # positions through the content query/key projections (v3) or their own
    norm_rel_ebd: str = "none"  # "layer_norm": the relative table is LayerNormed before use (v3)
    pooler_hidden_act: str = "gelu"  # the classification pooler's activation
    kept_heads: tuple[tuple[int, ...], ...] | None = None  # after pruning: original indices of each layer's heads
    ffn_sizes: tuple[int, ...] | None = None  # after pruning: each layer's FFN width (0 = removed)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:  # a hand-edited config.json: strings, negatives, floats
                raise UserError(f"the model config's {name} must be a positive whole number, got {value!r}")
        for name in ("max_position_embeddings", "position_buckets", "max_relative_positions"):
            if type(getattr(self, name)) is not int:
                raise UserError(f"the model config's {name} must be a whole number, got {getattr(self, name)!r}")
        for name in ("layer_norm_eps", "hidden_dropout", "attention_dropout", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UserError(f"the model config's {name} must be a non-negative number, got {value!r}")
        if not self.hidden_dropout < 1 or not self.attention_dropout < 1:
            raise UserError("the model config's dropout probabilities must be below 1")
        for name in ("type_vocab_size", "pad_token_id"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise UserError(f"the model config's {name} must be a whole number >= 0, got {value!r}")
        if self.embedding_size is not None and (type(self.embedding_size) is not int or self.embedding_size < 1):
            raise UserError(
                f"the model config's embedding_size must be a positive whole number, got {self.embedding_size!r}"
            )
        for name in ("position_biased_input", "relative_attention", "share_att_key"):
            if type(getattr(self, name)) is not bool:
                raise UserError(f"the model config's {name} must be true or false, got {getattr(self, name)!r}")
        if not set(self.pos_att_type) <= set(POSITION_TERMS) or len(set(self.pos_att_type)) != len(self.pos_att_type):
            raise UserError(f"the model config's pos_att_type must name c2p and/or p2c once, got {self.pos_att_type!r}")
        if self.norm_rel_ebd not in ("none", "layer_norm"):
            raise UserError(
                f"the model config's norm_rel_ebd must be 'none' or 'layer_norm', got {self.norm_rel_ebd!r}"
            )
        if self.pooler_hidden_act not in ("gelu", "tanh", "relu"):
            raise UserError(
                f"the model config's pooler_hidden_act must be gelu, tanh or relu, got {self.pooler_hidden_act!r}"
            )
        if self.max_position_embeddings < 1 and (self.position_biased_input or self.max_relative_positions < 1):
            raise UserError(
                f"the model config's max_position_embeddings must be positive, got {self.max_position_embeddings}"
            )
        check_allocatable(self)
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"the model config's hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        self.check_layer_sizes()

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @property
    def span(self) -> int:
        """Relative positions the table covers on each side (its rows: 2·span)."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def positional_projections(self) -> tuple[str, ...]:
        """The layers' own positional projections: pos_k for c2p, pos_q for p2c, unless shared with Q/K."""
        if not self.relative_attention or self.share_att_key:
            return ()
        return tuple(name for term, name in (("c2p", "pos_k"), ("p2c", "pos_q")) if term in self.pos_att_type)

    def units(self) -> UnitLayout:
        """BERT's layout (fused Q|K|V rows, output columns, FFN rows/columns), plus each head's rows of the
        positional projections when the layers have their own."""
        positional = tuple(Place(f"attention.{p}.{w}") for p in self.positional_projections for w in ("weight", "bias"))
        return UnitLayout(
            heads=(
                Place("attention.qkv.weight", 0, 3),
                Place("attention.qkv.bias", 0, 3),
                Place("attention.out.weight", 1),
                *positional,
            ),
            ffn=(Place("ffn.up.weight"), Place("ffn.up.bias"), Place("ffn.down.weight", 1)),
            ffn_block="ffn.",
            ffn_silent=("ffn.down.weight", "ffn.down.bias"),
            head_silencers=((("attention.out.weight", 0),), (("attention.qkv.weight", 2), ("attention.qkv.bias", 2))),
        )

    def with_dropout(self, p: float) -> "DebertaV2Config":
        """This config with every dropout of the encoder at `p` (a run's --dropout)."""
        return replace(self, hidden_dropout=p, attention_dropout=p)

    @classmethod
    def from_dict(cls, d: dict) -> "DebertaV2Config":
        if isinstance(d.get("pos_att_type"), list):
            d = {**d, "pos_att_type": tuple(d["pos_att_type"])}
        return super().from_dict(d)


def log_buckets(relative: Tensor, buckets: int, max_position: int) -> Tensor:  # T,T long
    """HF's make_log_bucket_position, in its arithmetic (float32 logs; ceil decides ties): offsets up to
    `buckets // 2` kept, longer ones sign · (ceil(log(|r|/mid) / log((max_position−1)/mid) · (mid−1)) + mid)."""
    mid = buckets // 2
    sign = torch.sign(relative)
    near = (relative < mid) & (relative > -mid)
    magnitude = torch.where(near, torch.tensor(mid - 1).type_as(relative), relative.abs())
    log = torch.ceil(torch.log(magnitude / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(magnitude <= mid, relative.to(log.dtype), log * sign).long()


class Embeddings(nn.Module):
    """word (+ absolute position) (+ token type), projected E -> D, LayerNorm. HF then zeroes padding
    tokens: no real token attends to them, and packing drops them, so that changes no real output."""

    def __init__(self, c: DebertaV2Config):
        super().__init__()
        E = c.embedding_size or c.hidden_size
        self.word = nn.Embedding(c.vocab_size, E, padding_idx=c.pad_token_id)
        self.position = nn.Embedding(c.max_position_embeddings, E) if c.position_biased_input else None
        self.token_type = nn.Embedding(c.type_vocab_size, E) if c.type_vocab_size else None
        self.project = nn.Linear(E, c.hidden_size, bias=False) if E != c.hidden_size else None
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:  # B,T -> B,T,D
        x = self.word(input_ids)  # B,T,E
        if self.position is not None:
            x = x + self.position(torch.arange(input_ids.shape[1], device=input_ids.device))
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        return self.norm(x if self.project is None else self.project(x))  # B,T,D


class Attention(nn.Module):
    def __init__(self, c: DebertaV2Config, layer: int):
        super().__init__()
        heads = c.layer_heads(layer)
        self.n_heads, self.head_dim = len(heads), c.head_dim
        inner = self.n_heads * self.head_dim
        self.qkv = nn.Linear(c.hidden_size, 3 * inner)  # rows: [Q heads | K heads | V heads], one matmul
        self.out = nn.Linear(inner, c.hidden_size)
        own = c.positional_projections
        self.pos_k = nn.Linear(c.hidden_size, inner) if "pos_k" in own else None  # c2p's keys of positions
        self.pos_q = nn.Linear(c.hidden_size, inner) if "pos_q" in own else None  # p2c's queries of positions
        terms = c.pos_att_type if c.relative_attention else ()
        self.c2p, self.p2c = "c2p" in terms, "p2c" in terms
        # HF counts the terms in pos_att_type even without relative attention; so does this.
        self.shrink = (1 + len(c.pos_att_type)) ** -0.5
        self.scale = self.shrink * self.head_dim**-0.5  # every term's: 1 / sqrt(Dh · (1 + terms))
        self.dropout_p = c.attention_dropout
        self.rel_dropout = Dropout(c.hidden_dropout)  # HF drops out the relative table in every layer
        full = heads == tuple(range(c.num_heads))
        self.register_buffer("kept", None if full else torch.tensor(heads, dtype=torch.long), persistent=False)

    def positions(self, table: Tensor, which: int, own: nn.Linear | None) -> Tensor:  # R,D -> H,R,Dh
        """The relative table through a positional projection: its own, or (shared) the content query
        (which=0) or key (which=1) block of qkv."""
        inner = self.n_heads * self.head_dim
        if own is not None:
            p = own(table)
        else:
            rows = slice(which * inner, (which + 1) * inner)
            p = nn.functional.linear(table, self.qkv.weight[rows], self.qkv.bias[rows])  # R,H·Dh
        return p.view(-1, self.n_heads, self.head_dim).transpose(0, 1)

    def forward(self, x: Tensor, pack: Packing | None, head_mask: Tensor | None, rel) -> Tensor:
        qkv = self.qkv(x)  # B,T,3·H·Dh or, packed, N,3·H·Dh
        if pack is not None:
            qkv = pack.unpack(qkv)  # B,T,3·H·Dh
        B, T, _ = qkv.shape
        q, k, v = (t.transpose(1, 2) for t in qkv.view(B, T, 3, self.n_heads, self.head_dim).unbind(2))  # 3 × B,H,T,Dh
        bias = None
        if rel is not None and (self.c2p or self.p2c):
            table, index = rel  # R,D; T,T: row of δ(i, j) for query i, key j
            table = self.rel_dropout(table)
            bias = 0
            if self.c2p:  # q_i · pk[δ(i, j)]
                pk = self.positions(table, 1, self.pos_k) * self.scale  # H,R,Dh
                bias = (q @ pk.transpose(-1, -2)).gather(-1, index.expand(B, self.n_heads, T, T))  # B,H,T,T
            if self.p2c:  # k_j · pq[δ(j, i)]: position-major for the key, then transposed to (query, key)
                pq = self.positions(table, 0, self.pos_q) * self.scale  # H,R,Dh
                scores = (k @ pq.transpose(-1, -2)).gather(-1, index.mT.expand(B, self.n_heads, T, T))  # B,H,T,T
                bias = bias + scores.transpose(-1, -2)
        if pack is None:
            mask = bias
        elif bias is None:
            mask = pack.key_padding
        elif pack.key_padding.dtype == torch.bool:  # B,1,1,T: True = attend
            mask = bias.masked_fill(~pack.key_padding, float("-inf"))
        else:  # Padded's additive mask
            mask = bias + pack.key_padding
        # attend divides q·kᵀ by sqrt(Dh); the rest of the scale goes into k. (Not into q: c2p reads q too, and
        # ONNX Runtime's MatMulScaleFusion then drops the scaled q from the graph, which the session refuses.)
        ctx = attend(q, k * self.shrink, v, mask, self.dropout_p if self.training else 0.0)  # B,H,T,Dh
        if head_mask is not None:  # (H0,) or (B, H0)
            if self.kept is not None:
                head_mask = head_mask[..., self.kept]
            ctx = ctx * head_mask.reshape(-1, self.n_heads, 1, 1).to(ctx.dtype)
        # One copy, as transpose + reshape; but a reshape here becomes an impossible view in the ONNX exporter's
        # decomposition of SDPA with a full B,H,T,T bias (its output strides differ from the traced kernel's).
        ctx = torch.cat(ctx.unbind(1), dim=-1)  # B,T,H·Dh
        return self.out(ctx if pack is None else pack.pack(ctx))  # B,T,D or N,D


class Layer(nn.Module):
    """BERT's post-LN layer: LayerNorm(x + attention), then LayerNorm(a + FFN); a removed FFN keeps its norm."""

    def __init__(self, c: DebertaV2Config, layer: int):
        super().__init__()
        self.attention = Attention(c, layer)
        self.attention_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        width = c.layer_ffn_size(layer)
        self.ffn = FeedForward(c, width) if width > 0 else None
        self.ffn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)

    def forward(self, x, pack, head_mask, ffn_mask, rel):
        a = self.attention_norm(x + self.dropout(self.attention(x, pack, head_mask, rel)))  # B,T,D or N,D
        if self.ffn is None:
            return self.ffn_norm(a)
        f = scale_tokens(self.dropout(self.ffn(a)), ffn_mask, pack)  # B,T,D or N,D; ffn_mask () or (B,)
        return self.ffn_norm(a + f)


class DebertaV2(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.dropout = Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_layers))
        relative = config.relative_attention
        self.rel_embeddings = nn.Embedding(2 * config.span, config.hidden_size) if relative else None  # 2·span,D
        layer_norm = config.norm_rel_ebd == "layer_norm"  # HF builds it whether relative attention uses it or not
        self.rel_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if layer_norm else None
        self.apply(lambda m: init_weights(m, config.initializer_range))

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
        x = self.dropout(x)
        rel = self.relative(input_ids.shape[1], input_ids.device, trim=packed)
        for i, layer in enumerate(self.layers):
            x = layer(x, pack, _layer_mask(head_mask, i, 2), _layer_mask(ffn_mask, i, 1), rel)
        return x if pack is None else pack.unpack(x)  # B,T,D, zeros at padding

    def relative(self, T: int, device: torch.device, trim: bool) -> tuple[Tensor, Tensor] | None:
        """(the relative table, R,D; for each query i and key j the row of δ(i, j), T,T), once per forward.
        δ(i, j) = clamp(bucket(i − j) + span, 0, 2·span − 1) is monotone in i − j, so the rows a T-token
        batch uses are one contiguous range: `trim` keeps only those (at most 2T − 1 of the 2·span), which
        makes the position terms' matmuls that much cheaper (not in ONNX graphs: the range depends on T)."""
        if self.rel_embeddings is None:
            return None
        c = self.config
        position = torch.arange(T, device=device)
        relative = position[:, None] - position[None, :]  # T,T: query minus key
        max_position = c.max_relative_positions if c.max_relative_positions >= 1 else c.max_position_embeddings
        if c.position_buckets > 0 and max_position > 0:
            relative = log_buckets(relative, c.position_buckets, max_position)
        index = (relative + c.span).clamp(0, 2 * c.span - 1)  # T,T
        table = self.rel_embeddings.weight  # 2·span,D
        if trim:
            first, last = int(index[0, -1]), int(index[-1, 0])  # the smallest and largest row used
            table, index = table[first : last + 1], index - first
        return (table if self.rel_norm is None else self.rel_norm(table)), index


def _layer_mask(mask: Tensor | None, i: int, unbatched_dims: int) -> Tensor | None:
    """Layer i's entries of a mask shaped (L, ...) or, with a batch dimension, (B, L, ...)."""
    if mask is None:
        return None
    return mask[i] if mask.dim() == unbatched_dims else mask[:, i]
