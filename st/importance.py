"""Head and FFN importance scores (Michel et al. 2019), as used by Liang et al. 2021.

I(ξ[l,h]) = E_x |∂L(x)/∂ξ[l,h]| and I(ν[l]) = E_x |∂L(x)/∂ν[l]|: the training-set average of the
absolute sensitivity of each example's loss to each mask, on the fine-tuned model, dropout off.

The absolute value is taken per example, so a batch-level gradient (a sum over examples) is not
enough; a per-example backward would be B times slower. Instead the masks get a batch dimension
(B, L, H0) filled with ones: example b only ever touches row b, so the gradient of the summed loss
with respect to row b is exactly ∂L(x_b)/∂mask, and one backward per batch gives all of them.

Head scores are normalised per layer (each row divided by its L2 norm over heads); FFN scores are
ranked as they are. Under DDP the sums and the example count are all-reduced, so every rank ends
with the same scores and therefore derives the same ticket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor

from st import dist
from st.errors import UserError
from st.io import atomic_path, read_json, write_json
from st.layout import FINGERPRINT_KEYS
from st.models.bert import BertConfig
from st.models.heads import BertClassifier, per_example_loss  # noqa: F401  (re-exported: the default loss)
from st.precision import DTYPES, check_precision, compute_copy


def fingerprint(config: BertConfig) -> dict:
    """What a score file or ticket remembers about its model, to refuse being applied to another."""
    return {k: getattr(config, k) for k in FINGERPRINT_KEYS}


def check_fingerprint(what: str, recorded: dict | None, config: BertConfig) -> None:
    """Raise UserError when `recorded` (from a scores/ticket file) disagrees with `config`."""
    if not recorded:
        return
    wrong = [
        f"{k} {recorded[k]} vs {getattr(config, k)}"
        for k in FINGERPRINT_KEYS
        if k in recorded and recorded[k] != getattr(config, k)
    ]
    if wrong:
        raise UserError(
            f"{what} was made for a different model ({', '.join(wrong)}: file vs this model); "
            "compute the scores on this model"
        )


def _normalise(row: tuple[float, ...]) -> tuple[float, ...]:
    # math.hypot scales internally: the norm of scores at 1e-170 (whose squares underflow to 0) or at
    # 1e170 (whose squares overflow) is right, so the ticket does not depend on the scores' scale.
    norm = math.hypot(*row)
    # An all-zero row (no gradient reached the layer) stays zero rather than becoming NaN.
    return tuple(x / norm for x in row) if norm > 0 else tuple(0.0 for _ in row)


@dataclass(frozen=True)
class Scores:
    """Importance scores of one model. `head` and `ffn` are derived from the raw values, never stored state."""

    head_raw: tuple[tuple[float, ...], ...]  # L,H0: E_x |∂L/∂ξ|
    ffn_raw: tuple[float, ...]  # L: E_x |∂L/∂ν|
    num_examples: int
    model_fingerprint: dict = field(default_factory=dict)
    precision: str = "fp32"  # the compute dtype of the pass that made them (st.precision)
    head: tuple[tuple[float, ...], ...] = field(init=False)  # L,H0: each row / its L2 norm
    ffn: tuple[float, ...] = field(init=False)  # L: = ffn_raw (the paper ranks FFN scores as they are)

    def __post_init__(self):
        # Accept tensors or nested lists; store plain tuples so the dataclass stays immutable and JSON-ready.
        head_raw = _as_rows(self.head_raw, "head_raw")
        ffn_raw = _as_row(self.ffn_raw, "ffn_raw")
        L = len(head_raw)
        if L == 0 or len(ffn_raw) != L:
            raise UserError(f"head_raw has {L} layers but ffn_raw has {len(ffn_raw)}")
        if len({len(r) for r in head_raw}) != 1 or len(head_raw[0]) == 0:
            raise UserError("head_raw rows must all have the same, non-zero number of heads")
        if not all(math.isfinite(x) and x >= 0 for x in (*ffn_raw, *(x for r in head_raw for x in r))):
            raise UserError("scores must be finite and non-negative")
        if isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int) or self.num_examples < 1:
            raise UserError(f"num_examples must be a positive integer, got {self.num_examples!r}")
        if self.precision not in DTYPES:
            raise UserError(f"precision must be one of {', '.join(DTYPES)}, got {self.precision!r}")
        fp = dict(self.model_fingerprint or {})
        if fp.get("num_layers", L) != L or fp.get("num_heads", len(head_raw[0])) != len(head_raw[0]):
            raise UserError(
                f"scores are {L}×{len(head_raw[0])} but model_fingerprint says "
                f"{fp.get('num_layers')}×{fp.get('num_heads')}"
            )
        object.__setattr__(self, "head_raw", head_raw)
        object.__setattr__(self, "ffn_raw", ffn_raw)
        object.__setattr__(self, "model_fingerprint", fp)
        object.__setattr__(self, "head", tuple(_normalise(r) for r in head_raw))
        object.__setattr__(self, "ffn", ffn_raw)

    @property
    def num_layers(self) -> int:
        return len(self.head_raw)

    @property
    def num_heads(self) -> int:
        return len(self.head_raw[0])

    def check_matches(self, config: BertConfig, source: str = "scores") -> None:
        if (config.num_layers, config.num_heads) != (self.num_layers, self.num_heads):
            raise UserError(
                f"{source} have shape {self.num_layers}×{self.num_heads} for a model with "
                f"{config.num_layers}×{config.num_heads} (layers × heads)"
            )
        check_fingerprint(source, self.model_fingerprint, config)

    def to_json(self) -> dict:
        # The normalised values are written for people reading the file; loading recomputes them from raw.
        return {
            "num_examples": self.num_examples,
            "model_fingerprint": self.model_fingerprint,
            "precision": self.precision,
            "head": [list(r) for r in self.head],
            "ffn": list(self.ffn),
            "head_raw": [list(r) for r in self.head_raw],
            "ffn_raw": list(self.ffn_raw),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Scores":
        if not isinstance(d, dict):
            raise UserError("expected a JSON object")
        missing = [k for k in ("head_raw", "ffn_raw", "num_examples", "model_fingerprint") if k not in d]
        if missing:
            raise UserError(f"missing keys {missing}")
        if not isinstance(d["model_fingerprint"], dict):
            raise UserError("model_fingerprint must be an object")
        return cls(d["head_raw"], d["ffn_raw"], d["num_examples"], d["model_fingerprint"], d.get("precision", "fp32"))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        if Path(path).is_dir():
            raise UserError(f"{path} is a folder; pass the scores.json file that `st score` wrote")
        try:
            return cls.from_json(read_json(path))
        except FileNotFoundError:
            raise UserError(f"scores file {path} not found") from None
        except (ValueError, TypeError) as e:  # JSONDecodeError and UserError are ValueErrors
            raise UserError(f"{path} is not a valid scores file: {e}") from None


def _as_row(values, name: str) -> tuple[float, ...]:
    if isinstance(values, Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or not all(_is_number(x) for x in values):
        raise UserError(f"{name} must be a list of numbers")
    return tuple(float(x) for x in values)


def _as_rows(values, name: str) -> tuple[tuple[float, ...], ...]:
    if isinstance(values, Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{name} must be a list of lists of numbers")
    return tuple(_as_row(r, name) for r in values)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compute_importance(
    model: BertClassifier,
    batches: Iterable[dict],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = per_example_loss,
    *,
    device: str | torch.device = "cpu",
    max_examples: int | None = None,
    precision: str = "fp32",
) -> Scores:
    """Average |∂L(x)/∂mask| over the examples in `batches` (this process's share under DDP).

    `batches` yield dicts with input_ids, attention_mask, labels and optionally token_type_ids.
    `loss_fn(logits, labels)` returns one loss per example. `max_examples` caps the examples this
    process scores. `precision`: the compute dtype (`st.precision`); masks, their gradients and the
    sums stay fp32. The model is moved to `device` and left there; its train/eval mode and its
    parameters' requires_grad flags are restored.
    """
    config = model.encoder.config
    if config.kept_heads is not None or config.ffn_sizes is not None:
        raise UserError("this model is physically pruned: score the full fine-tuned model")
    device = torch.device(device)
    check_precision(precision, device)
    model.to(device)
    L, H0 = config.num_layers, config.num_heads
    head_sum = torch.zeros(L, H0, dtype=torch.float64, device=device)
    ffn_sum = torch.zeros(L, dtype=torch.float64, device=device)
    count = 0

    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()  # dropout off: the scores describe the deterministic fine-tuned network
    for p, _ in flags:  # only mask gradients are needed; frozen weights save their backward matmuls
        p.requires_grad_(False)
    compute = compute_copy(model, precision)  # frozen too
    try:
        for batch in batches:
            if max_examples is not None and count >= max_examples:
                break
            B = batch["input_ids"].shape[0]
            if max_examples is not None and count + B > max_examples:
                B = max_examples - count
                batch = {k: v[:B] for k, v in batch.items()}
            batch = {k: v.to(device) for k, v in batch.items()}
            head_mask = torch.ones(B, L, H0, device=device, requires_grad=True)
            ffn_mask = torch.ones(B, L, device=device, requires_grad=True)
            logits = compute(
                batch["input_ids"],
                batch.get("token_type_ids"),
                batch.get("attention_mask"),
                head_mask=head_mask,
                ffn_mask=ffn_mask,
            )  # B,C
            # A SUM of per-example losses: then ∂loss/∂mask[b] = ∂L(x_b)/∂mask exactly (a mean would scale by 1/B).
            loss = loss_fn(logits.float(), batch["labels"]).sum()
            g_head, g_ffn = torch.autograd.grad(loss, [head_mask, ffn_mask])  # B,L,H0 and B,L
            head_sum += g_head.abs().sum(0).double()
            ffn_sum += g_ffn.abs().sum(0).double()
            count += B
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)

    # One collective for everything, so ranks cannot drift out of step between several calls.
    n = torch.tensor([float(count)], dtype=torch.float64, device=device)
    packed = torch.cat([head_sum.flatten(), ffn_sum, n])
    dist.all_reduce_sum(packed)
    total = int(packed[-1].item())
    if total == 0:
        raise UserError("no examples to score: the training data is empty")
    head = (packed[: L * H0] / total).view(L, H0)
    ffn = packed[L * H0 : L * H0 + L] / total
    return Scores(head.cpu(), ffn.cpu(), total, fingerprint(config), precision)


def plot_heatmap(scores: Scores, path: str | Path) -> None:
    """PNG heatmap: normalised head scores (layers × heads) and, beside it, the FFN score per layer."""
    # The object API, not pyplot: no global backend switch and no figure registry in a library call.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L, H0 = scores.num_layers, scores.num_heads
    fig = Figure(figsize=(2.0 + 0.45 * H0 + 1.6, 1.0 + 0.4 * L), layout="constrained")
    FigureCanvasAgg(fig)
    ax_h, ax_f = fig.subplots(1, 2, gridspec_kw={"width_ratios": [H0, 1]})
    im = ax_h.imshow(scores.head, aspect="auto", cmap="viridis", interpolation="nearest")
    ax_h.set(xlabel="head", ylabel="layer", title="head importance (normalised per layer)")
    ax_h.set_xticks(range(H0))
    ax_h.set_yticks(range(L))
    fig.colorbar(im, ax=ax_h)
    # FFN scores are on their own scale (not normalised), so they get their own colour bar.
    im_f = ax_f.imshow([[v] for v in scores.ffn], aspect="auto", cmap="magma", interpolation="nearest")
    ax_f.set(title="FFN", xticks=[])
    ax_f.set_yticks(range(L))
    fig.colorbar(im_f, ax=ax_f)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def task_importance(scores_by_task: dict[str, Scores]) -> dict:
    """Importance across tasks (Liang et al. 2021, Figure 6): per head and per FFN block, the mean
    over tasks of the normalised importance and each task's share of the summed importance.

    Head scores are the per-layer normalised `Scores.head`; FFN scores are divided by each task's
    largest FFN score so tasks with differently scaled losses weigh alike. A share is 0 where no
    task gave the unit any importance. All tasks must have the same layers × heads (UserError).
    """
    if not scores_by_task:
        raise UserError("no scores given; pass --scores TASK=scores.json at least once")
    names = list(scores_by_task)
    first = scores_by_task[names[0]]
    for name in names[1:]:
        s = scores_by_task[name]
        if (s.num_layers, s.num_heads) != (first.num_layers, first.num_heads):
            raise UserError(
                f"scores of {name} are {s.num_layers}×{s.num_heads} but {names[0]}'s are "
                f"{first.num_layers}×{first.num_heads} (layers × heads); score all tasks on one model"
            )
    head = torch.tensor([scores_by_task[n].head for n in names], dtype=torch.float64)  # T,L,H
    ffn = torch.tensor([scores_by_task[n].ffn for n in names], dtype=torch.float64)  # T,L
    ffn = ffn / ffn.amax(1, keepdim=True).clamp_min(1e-300)  # each task's FFN scores on [0, 1]

    def shares(x: Tensor) -> Tensor:  # T,... -> each task's fraction of the sum over tasks
        total = x.sum(0, keepdim=True)
        return torch.where(total > 0, x / total.clamp_min(1e-300), torch.zeros_like(x))

    layer_head = head.sum(2)  # T,L: each task's summed head importance per layer
    return {
        "tasks": names,
        "head_mean": head.mean(0).tolist(),
        "ffn_mean": ffn.mean(0).tolist(),
        "head_share": shares(head).tolist(),
        "ffn_share": shares(ffn).tolist(),
        "layer_head_share": shares(layer_head).tolist(),
    }


def plot_task_importance(scores_by_task: dict[str, Scores], path: str | Path) -> dict:
    """PNG in the shape of the paper's Figure 6: per layer, stacked bars of each task's share of the
    summed head importance and of the FFN importance; beside them a heatmap of the mean normalised
    head importance over tasks (layers × heads) with the mean FFN importance. Returns the numbers
    (`task_importance`)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = task_importance(scores_by_task)
    names = data["tasks"]
    first = scores_by_task[names[0]]
    L, H0 = first.num_layers, first.num_heads
    fig = Figure(figsize=(6.0 + 0.45 * H0 + 2.0, 1.5 + 0.4 * max(L, 4)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_hs, ax_fs, ax_hm, ax_fm = fig.subplots(1, 4, gridspec_kw={"width_ratios": [3, 3, H0, 1]})
    layers = list(range(L))
    colours = [colormaps["tab20"](i % 20) for i in range(len(names))]
    for ax, key, title in (
        (ax_hs, "layer_head_share", "share of head importance"),
        (ax_fs, "ffn_share", "share of FFN importance"),
    ):
        left = [0.0] * L
        for t, name in enumerate(names):
            width = data[key][t]
            ax.barh(layers, width, left=left, color=colours[t], label=name)
            left = [a + b for a, b in zip(left, width)]
        ax.set(xlim=(0, 1), xlabel="fraction", ylabel="layer", title=title)
        ax.set_yticks(layers)
        ax.invert_yaxis()
    ax_hs.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0, 1.08), ncol=min(len(names), 5), frameon=False)
    im = ax_hm.imshow(data["head_mean"], aspect="auto", cmap="viridis", interpolation="nearest")
    ax_hm.set(xlabel="head", ylabel="layer", title=f"mean head importance ({len(names)} tasks)")
    ax_hm.set_xticks(range(H0))
    ax_hm.set_yticks(layers)
    fig.colorbar(im, ax=ax_hm)
    im_f = ax_fm.imshow([[v] for v in data["ffn_mean"]], aspect="auto", cmap="magma", interpolation="nearest")
    ax_fm.set(title="mean FFN", xticks=[])
    ax_fm.set_yticks(layers)
    fig.colorbar(im_f, ax=ax_fm)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return data
