"""Tickets: which heads and FFN blocks a subnetwork keeps (1) or prunes (0), made from importance scores.

At ratio r a ticket prunes round(r·L·H0) heads and round(r·L) FFN blocks (Liang et al. 2021):
  winning: the lowest normalised head scores, ranked over the whole network, and the lowest FFN scores;
  losing:  the highest;
  random:  a seeded random order instead of the scores.
Every layer keeps at least one head: when the next head in the order is the last of its layer, it
is skipped and the walk goes on. The order does not depend on r and the walk only ever adds heads,
so tickets at increasing r are nested, for every kind. "round" is round-half-up, floor(x + 0.5),
not Python's banker's rounding, so that 4.5 heads means 5 as a reader expects.
"""

from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import torch

from st.errors import UserError
from st.importance import Scores, check_fingerprint
from st.io import read_json, write_json
from st.layout import SCORES, first_seed_scores, full_ticket_json, ticket_json
from st.models.bert import BertConfig
from st.models.families import build_encoder
from st.models.heads import BertClassifier
from st.prune import config_for_masks

KINDS = ("winning", "random", "losing")


@dataclass(frozen=True)
class Ticket:
    head_mask: tuple[tuple[int, ...], ...]  # L,H0: 1 = keep the head
    ffn_mask: tuple[int, ...]  # L: 1 = keep the FFN block
    ratio: float
    kind: str  # winning | random | losing | full
    seed: int = 0
    percent_remaining: dict | None = None  # {"model": %, "encoder": %}, when made with a config
    model_fingerprint: dict | None = None
    source: str | None = field(default=None, compare=False, repr=False)  # the file it came from, for messages

    def __post_init__(self):
        hm, fm = self.head_mask, self.ffn_mask
        if not isinstance(hm, (list, tuple)) or not hm or not all(isinstance(r, (list, tuple)) for r in hm):
            raise UserError("head_mask must be a non-empty list of per-layer lists")
        if not isinstance(fm, (list, tuple)):
            raise UserError("ffn_mask must be a list")
        for v in (*fm, *(v for r in hm for v in r)):
            if type(v) is not int or v not in (0, 1):  # bools and 1.0 are refused: a mask file holds 0/1
                raise UserError(f"mask entries must be 0 or 1, got {v!r}")
        if len({len(r) for r in hm}) != 1 or not hm[0]:
            raise UserError("head_mask rows must all have the same, non-zero number of heads")
        if len(fm) != len(hm):
            raise UserError(f"head_mask has {len(hm)} layers but ffn_mask has {len(fm)}")
        empty = [i for i, r in enumerate(hm) if not any(r)]
        if empty:
            raise UserError(f"every layer must keep at least one head; layer(s) {empty} keep none")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0 <= self.ratio < 1:
            raise UserError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        if self.kind not in (*KINDS, "full"):
            raise UserError(f"kind must be one of {', '.join((*KINDS, 'full'))}, got {self.kind!r}")
        if type(self.seed) is not int:
            raise UserError(f"seed must be an integer, got {self.seed!r}")
        for name, d in (("percent_remaining", self.percent_remaining), ("model_fingerprint", self.model_fingerprint)):
            if d is not None and not isinstance(d, dict):
                raise UserError(f"{name} must be an object or null")
        object.__setattr__(self, "head_mask", tuple(tuple(r) for r in hm))
        object.__setattr__(self, "ffn_mask", tuple(fm))
        object.__setattr__(self, "ratio", float(self.ratio))

    @property
    def num_layers(self) -> int:
        return len(self.head_mask)

    @property
    def num_heads(self) -> int:
        return len(self.head_mask[0])

    @property
    def heads_pruned(self) -> int:
        return sum(r.count(0) for r in self.head_mask)

    @property
    def ffn_pruned(self) -> int:
        return self.ffn_mask.count(0)

    def head_mask_tensor(self) -> torch.Tensor:  # L,H0
        return torch.tensor(self.head_mask, dtype=torch.float32)

    def ffn_mask_tensor(self) -> torch.Tensor:  # L
        return torch.tensor(self.ffn_mask, dtype=torch.float32)

    def check_matches(self, config: BertConfig) -> None:
        """Raise UserError unless this ticket was made for a model shaped like `config`."""
        name = f"ticket {self.source}" if self.source else "ticket"
        if (self.num_layers, self.num_heads) != (config.num_layers, config.num_heads):
            raise UserError(
                f"{name} has shape {self.num_layers}×{self.num_heads} for a model with "
                f"{config.num_layers}×{config.num_heads} (layers × heads); "
                "make the ticket from this model's scores"
            )
        check_fingerprint(name, self.model_fingerprint, config)

    def to_json(self) -> dict:
        return ticket_json(
            self.head_mask,
            self.ffn_mask,
            self.ratio,
            self.kind,
            self.seed,
            self.percent_remaining,
            self.model_fingerprint,
        )

    @classmethod
    def from_json(cls, d: dict, source: str | None = None) -> "Ticket":
        if not isinstance(d, dict):
            raise UserError("expected a JSON object")
        missing = [k for k in ("head_mask", "ffn_mask", "ratio", "kind") if k not in d]
        if missing:
            raise UserError(f"missing keys {missing}")
        return cls(
            d["head_mask"],
            d["ffn_mask"],
            d["ratio"],
            d["kind"],
            d.get("seed", 0),
            d.get("percent_remaining"),
            d.get("model_fingerprint"),
            source,
        )

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Ticket":
        try:
            return cls.from_json(read_json(path), source=str(path))
        except FileNotFoundError:
            raise UserError(f"ticket file {path} not found") from None
        except (ValueError, TypeError) as e:  # JSONDecodeError and UserError are ValueErrors
            raise UserError(f"{path} is not a valid ticket: {e}") from None

    @classmethod
    def full(cls, config: BertConfig) -> "Ticket":
        """The unpruned network (ratio 0): the r = 0 point of a sweep."""
        return cls.from_json(full_ticket_json(config.to_dict(), seed=0))


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _prune_order(scores: Scores, kind: str, seed: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Heads (layer, head) and FFN layers in the order they are pruned; independent of the ratio."""
    L, H0 = scores.num_layers, scores.num_heads
    heads = [(l, h) for l in range(L) for h in range(H0)]
    layers = list(range(L))
    if kind == "random":
        rng = random.Random(seed)  # Python's generator: the same permutation on every platform and torch version
        rng.shuffle(heads)
        rng.shuffle(layers)
        return heads, layers
    sign = 1 if kind == "winning" else -1  # losing: highest first
    # sorted() is stable and the lists start in (layer, head) order, so ties go to the lower index.
    heads.sort(key=lambda lh: sign * scores.head[lh[0]][lh[1]])
    layers.sort(key=lambda l: sign * scores.ffn[l])
    return heads, layers


def make_ticket(
    scores: Scores,
    ratio: float,
    kind: str = "winning",
    seed: int = 0,
    config: BertConfig | None = None,
    num_labels: int = 2,
) -> Ticket:
    """The ticket pruning a fraction `ratio` of heads and FFN blocks; see the module docstring.

    With `config`, the scores are checked against it and percent_remaining is filled in.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise UserError(f"--ratio must be in [0, 1), got {ratio}")
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if config is not None:
        scores.check_matches(config)
    L, H0 = scores.num_layers, scores.num_heads
    # At most H0 - 1 heads can go from each layer; a high ratio on few heads per layer can ask for more.
    n_heads = min(round_half_up(ratio * L * H0), L * (H0 - 1))
    n_ffn = round_half_up(ratio * L)
    head_order, ffn_order = _prune_order(scores, kind, seed)

    head_mask = [[1] * H0 for _ in range(L)]
    kept = [H0] * L
    pruned = 0
    for l, h in head_order:
        if pruned == n_heads:
            break
        if kept[l] == 1:  # the last head of its layer stays; try the next one in the order
            continue
        head_mask[l][h], kept[l], pruned = 0, kept[l] - 1, pruned + 1
    ffn_mask = [1] * L
    for l in ffn_order[:n_ffn]:
        ffn_mask[l] = 0

    ticket = Ticket(
        tuple(map(tuple, head_mask)),
        tuple(ffn_mask),
        float(ratio),
        kind,
        seed,
        None,
        dict(scores.model_fingerprint) or None,
    )
    if config is not None:
        ticket = replace(ticket, percent_remaining=percent_remaining(config, ticket, num_labels))
    return ticket


def pruned_config(config: BertConfig, ticket: Ticket) -> BertConfig:
    """The config of the physically pruned model: original indices of the kept heads, FFN width or 0."""
    if config.kept_heads is not None or config.ffn_sizes is not None:
        raise UserError("the model is already pruned: apply tickets to the full model's config")
    ticket.check_matches(config)
    return config_for_masks(config, ticket.head_mask_tensor(), ticket.ffn_mask_tensor())


def percent_remaining(config: BertConfig, ticket: Ticket, num_labels: int = 2) -> dict[str, float]:
    """Percent of weights left, for the whole classifier and for the encoder (embeddings included).

    Counted from the parameter tensors the pruned model actually has, built on the meta device
    (shapes only, no memory), so the count can never disagree with what pruning produces.
    """

    def numel(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    small = pruned_config(config, ticket)
    with torch.device("meta"):
        dense = BertClassifier(build_encoder(config), num_labels)
        pruned = BertClassifier(build_encoder(small), num_labels)
    return {
        "model": 100.0 * numel(pruned) / numel(dense),
        "encoder": 100.0 * numel(pruned.encoder) / numel(dense.encoder),
    }


class Pruner:
    """Tickets from one set of scores: `Pruner(scores).tickets([0.1, 0.2, ...])`."""

    def __init__(self, scores: Scores):
        self.scores = scores

    def ticket(
        self, ratio: float, kind: str = "winning", seed: int = 0, config: BertConfig | None = None, num_labels: int = 2
    ) -> Ticket:
        return make_ticket(self.scores, ratio, kind, seed, config, num_labels)

    def tickets(
        self, ratios, kind: str = "winning", seed: int = 0, config: BertConfig | None = None, num_labels: int = 2
    ) -> list[Ticket]:
        return [self.ticket(r, kind, seed, config, num_labels) for r in ratios]


# ---- tickets named by users: files, sweep folders, or scores and a ratio ---------------------------


def tickets_for_tasks(
    paths: Mapping[str, Path],
    config: BertConfig,
    ratios: Mapping[str, float] | None = None,
    num_labels: Mapping[str, int] | None = None,
) -> dict[str, Ticket]:
    """One ticket per task from `paths` ({task: path}).

    A path is a ticket JSON file (ticket.json, super_ticket.json) or a folder holding
    super_ticket.json (an `st sweep` output) or ticket.json. With `ratios` ({task: ratio}) tickets
    are made instead from importance scores: a scores.json file, or a folder holding one, and the
    winning ticket at the task's ratio is taken. Tickets are checked against `config` (shape and
    model fingerprint).
    """
    tickets = {}
    for name, path in paths.items():
        path = Path(path)
        if ratios is None:
            ticket = _load_ticket(path, name)
        else:
            scores = _load_scores(path, name)
            scores.check_matches(config, source=f"scores {path}")
            ticket = make_ticket(
                scores, ratios[name], "winning", config=config, num_labels=(num_labels or {}).get(name, 2)
            )
            ticket = replace(ticket, source=str(path))
        ticket.check_matches(config)
        tickets[name] = ticket
    return tickets


def _load_ticket(path: Path, task: str) -> Ticket:
    if path.is_dir():
        found = next((path / f for f in ("super_ticket.json", "ticket.json") if (path / f).is_file()), None)
        if found is None:
            raise UserError(
                f"{path} holds neither super_ticket.json nor ticket.json; pass a ticket file or an `st sweep` "
                f"folder for task {task}"
            )
        path = found
    if not path.exists():
        raise UserError(f"ticket {path} for task {task} does not exist")
    data = _read(path)
    if "head_raw" in data:
        raise UserError(f"{path} holds importance scores, not a ticket; add --ratios to make tickets from scores")
    if "head_mask" not in data and isinstance(data.get("ticket"), dict):  # a record with the ticket inside
        data = {**data["ticket"], "task": data.get("task")}
    recorded = data.get("task")
    if isinstance(recorded, str) and recorded != task:
        raise UserError(f"ticket {path} was made for task {recorded}, not {task}; check the order of --tickets")
    try:
        return Ticket.from_json(data, source=str(path))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is not a valid ticket file: {e}") from None


def _load_scores(path: Path, task: str) -> Scores:
    if path.is_dir():  # a folder holding scores.json, or an `st sweep` folder: its first seed's seed<s>/scores.json
        first = first_seed_scores(path)
        path = path / SCORES if (path / SCORES).is_file() or first is None else first
    if not path.is_file():
        raise UserError(
            f"--ratios makes tickets from importance scores: {path} does not exist (task {task}); "
            "pass scores.json from `st score` or a folder holding it"
        )
    data = _read(path)
    if "head_raw" not in data:
        raise UserError(f"{path} is not a scores file (task {task}); with --ratios pass scores.json from `st score`")
    try:
        return Scores.from_json(data)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is not a valid scores file: {e}") from None


def _read(path: Path) -> dict:
    try:
        data = read_json(path)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data
