"""The multi-task model (MT-DNN, Liu et al. 2019) and its folder format.

One shared encoder, one shared [CLS] pooler (MT-DNN keeps BERT's pooler in the shared layers, as its
`SANBertNetwork` does) and one task layer per task (dropout + linear, `TaskHead`). Each task has a
ticket (head_mask L×H0, ffn_mask L; all ones for plain MT-DNN) and runs forward through it; the
shared encoder is the pre-trained one pruned to the UNION of the tickets, whose masks stay in
original-head coordinates so every task's mask still applies to it. How it is trained (Algorithm 1)
is `st.share`.

Folder (written by `st share`):
  model.safetensors (encoder.* = the union encoder, pooler.*, heads.<i>.*), tickets/<task>.json,
  config.json ({"format": "st-multitask", "encoder", "tasks": [...], ...meta}; written last).
`load_task_model(folder, task)` gives one task's `BertClassifier` (encoder pruned to its ticket).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from st.errors import UserError
from st.io import read_json, write_json, write_safetensors
from st.layout import CONFIG, WEIGHTS
from st.models.bert import Bert, init_weights
from st.models.families import build_encoder, config_from_dict
from st.models.heads import BertClassifier, Pooler, TaskHead
from st.models.weights import read_tensors
from st.prune import prune_encoder
from st.tickets import Ticket, percent_remaining

FORMAT = "st-multitask"


class MultiTaskModel(nn.Module):
    """Shared encoder and pooler, one task head per task (MT-DNN)."""

    def __init__(self, encoder: Bert, heads: Sequence[tuple[int, float]]):  # (num_labels, dropout) per task
        super().__init__()
        d = encoder.config.hidden_size
        self.encoder = encoder
        self.pooler = Pooler.for_config(encoder.config)
        self.heads = nn.ModuleList(TaskHead(d, n, p) for n, p in heads)
        for module in (self.pooler, self.heads):
            module.apply(lambda m: init_weights(m, encoder.config.initializer_range))

    def forward(
        self, task: int, input_ids, token_type_ids=None, attention_mask=None, head_mask=None, ffn_mask=None
    ) -> Tensor:
        hidden = self.encoder(input_ids, token_type_ids, attention_mask, head_mask, ffn_mask)  # B,T,D
        return self.heads[task](self.pooler(hidden, attention_mask))  # B,num_labels


class TaskView(nn.Module):
    """Task t's network inside the multi-task model: its ticket's masks and its head (for `predict_set`)."""

    def __init__(self, model: MultiTaskModel, index: int, head_mask: Tensor | None, ffn_mask: Tensor | None):
        super().__init__()
        self.model, self.index, self.head_mask, self.ffn_mask = model, index, head_mask, ffn_mask

    # A view has no mode of its own: .train()/.eval() reach the shared model, .training reads it.
    @property
    def training(self) -> bool:
        return self.model.training if "model" in self._modules else True

    @training.setter
    def training(self, value: bool) -> None:
        pass

    def forward(
        self, input_ids, token_type_ids=None, attention_mask=None, *, through: nn.Module | None = None
    ) -> Tensor:
        """`through`: the module to call instead of the shared model, its DDP wrapper in training."""
        if self.head_mask is not None and self.head_mask.device != input_ids.device:
            self.head_mask = self.head_mask.to(input_ids.device)
        if self.ffn_mask is not None and self.ffn_mask.device != input_ids.device:
            self.ffn_mask = self.ffn_mask.to(input_ids.device)
        model = self.model if through is None else through
        return model(self.index, input_ids, token_type_ids, attention_mask, self.head_mask, self.ffn_mask)


def union_masks(tickets: Sequence[Ticket]) -> tuple[Tensor, Tensor]:
    """(head_mask L×H0, ffn_mask L): what at least one ticket keeps."""
    heads = torch.stack([t.head_mask_tensor() for t in tickets]).amax(0)
    ffn = torch.stack([t.ffn_mask_tensor() for t in tickets]).amax(0)
    return heads, ffn


class MultiTask:
    """The multi-task model with its tasks' names, tickets and label names: one task's masks, view or
    single-task model, the weights remaining, and the folder format (`save` / `load`)."""

    def __init__(
        self,
        model: MultiTaskModel,
        names: Sequence[str],
        tickets: Sequence[Ticket],
        tasks: Mapping[str, object] | None = None,
        labels: Mapping[str, Sequence[str]] | None = None,
    ):
        if len(set(names)) != len(names):
            twice = next(n for n in names if list(names).count(n) > 1)
            raise UserError(f"task {twice} is listed twice; list each task once")
        self.model, self.names, self.tickets = model, list(names), list(tickets)
        self.tasks = dict(tasks or {})  # name -> Task, needed for metrics
        if labels is None:
            labels = {n: getattr(self.tasks.get(n), "labels", ()) for n in names}
        self.labels = {n: list(labels.get(n, ())) for n in names}  # label names, written to config.json
        self.dense_config = replace(model.encoder.config, kept_heads=None, ffn_sizes=None)
        self._views: dict[str, TaskView] = {}

    # -- per task --

    def index(self, name: str) -> int:
        if name not in self.names:
            raise UserError(f"task {name!r} is not in this multi-task model; it has {', '.join(self.names)}")
        return self.names.index(name)

    def masks(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """Task `name`'s (head_mask, ffn_mask) forward arguments; None for an all-ones mask (the same
        result, without the multiplications)."""
        ticket = self.tickets[self.index(name)]
        head, ffn = ticket.head_mask_tensor(), ticket.ffn_mask_tensor()
        return (None if bool(head.all()) else head), (None if bool(ffn.all()) else ffn)

    def view(self, name: str) -> TaskView:
        """Task `name`'s network as a module taking a batch (shares the model's weights)."""
        if name not in self._views:
            self._views[name] = TaskView(self.model, self.index(name), *self.masks(name))
        return self._views[name]

    def task_model(self, name: str) -> BertClassifier:
        """Task `name` as a single-task model: the shared encoder pruned further to its ticket (so
        exactly its ticket is kept), the shared pooler and its head; weights copied."""
        i = self.index(name)
        ticket = self.tickets[i]
        encoder = prune_encoder(self.model.encoder, ticket.head_mask_tensor(), ticket.ffn_mask_tensor())
        head = self.model.heads[i]
        reference = next(self.model.parameters())
        model = BertClassifier(encoder, head.out.out_features, head.dropout.p).to(
            device=reference.device, dtype=reference.dtype
        )
        model.pooler.load_state_dict(self.model.pooler.state_dict())
        model.classifier.load_state_dict(head.state_dict())
        return model.train(self.model.training)

    # -- weights remaining --

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the union model and of the dense model it came from, counted from tensors."""

        def numel(m):
            return sum(p.numel() for p in m.parameters())

        with torch.device("meta"):
            dense = build_encoder(self.dense_config)
        shared_top = numel(self.model.pooler) + numel(self.model.heads)
        return {
            "encoder": numel(self.model.encoder),
            "dense_encoder": numel(dense),
            "model": numel(self.model),
            "dense_model": numel(dense) + shared_top,
        }

    def percent_remaining(self) -> dict[str, float]:
        n = self.parameter_counts()
        return {"encoder": 100.0 * n["encoder"] / n["dense_encoder"], "model": 100.0 * n["model"] / n["dense_model"]}

    def ticket_stats(self) -> dict[str, dict]:
        """Per task: heads and FFN blocks its ticket keeps, and the percent of the dense encoder that is."""
        stats = {}
        for name, ticket in zip(self.names, self.tickets):
            kept = percent_remaining(self.dense_config, ticket, self.model.heads[self.index(name)].out.out_features)
            stats[name] = {
                "kind": ticket.kind,
                "ratio": ticket.ratio,
                "heads": ticket.num_layers * ticket.num_heads - ticket.heads_pruned,
                "ffn": ticket.num_layers - ticket.ffn_pruned,
                "percent_encoder": kept["encoder"],
            }
        return stats

    # -- files --

    def save(self, folder: str | Path, **meta) -> None:
        """model.safetensors, tickets/<task>.json, config.json (last: its presence means complete)."""
        folder = Path(folder)
        write_safetensors(folder / WEIGHTS, self.model.state_dict())
        tasks = []
        for i, (name, ticket) in enumerate(zip(self.names, self.tickets)):
            ticket.save(folder / "tickets" / f"{name}.json")
            head = self.model.heads[i]
            tasks.append(
                {
                    "name": name,
                    "num_labels": head.out.out_features,
                    "dropout": head.dropout.p,
                    "labels": self.labels.get(name, []),
                    "ticket": f"tickets/{name}.json",
                }
            )
        write_json(
            folder / CONFIG, {"format": FORMAT, "encoder": self.model.encoder.config.to_dict(), "tasks": tasks, **meta}
        )

    @classmethod
    def load(
        cls, folder: str | Path, tasks: Mapping[str, object] | None = None, config: dict | None = None
    ) -> "MultiTask":
        """`config`: the folder's config.json, when the caller has read it already."""
        folder = Path(folder)
        cfg = read_mtl_config(folder) if config is None else config
        entries = cfg["tasks"]
        model = MultiTaskModel(
            build_encoder(config_from_dict(cfg["encoder"])), [(e["num_labels"], e["dropout"]) for e in entries]
        )
        tensors, source = read_tensors(folder)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            key = (missing or unexpected)[0]
            raise UserError(
                f"{source}: {'missing' if missing else 'unknown'} key {key!r}; the model does not match its config.json"
            )
        tickets = [Ticket.load(folder / e["ticket"]) for e in entries]
        return cls(
            model, [e["name"] for e in entries], tickets, tasks, {e["name"]: e.get("labels", []) for e in entries}
        )


def read_mtl_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"{folder} holds no multi-task model (no config.json); pass the --out folder of `st share`")
    cfg = read_json(path)
    if cfg.get("format") != FORMAT:
        raise UserError(
            f'{folder} is not a multi-task model (its config.json lacks "format": "{FORMAT}"); run `st share` first'
        )
    return cfg


def is_multitask_dir(folder: str | Path) -> bool:
    """True for a folder written by `st share` (so `st finetune --init` can pick `load_task_model`)."""
    path = Path(folder) / CONFIG
    try:
        return path.is_file() and read_json(path).get("format") == FORMAT
    except ValueError:
        return False


def load_task_model(mtl_dir: str | Path, task_name: str) -> BertClassifier:
    """Task `task_name` of a multi-task model folder as a single-task BertClassifier: the shared
    encoder pruned further to the task's ticket (the ticket stays kept), the pooler and its head."""
    return MultiTask.load(mtl_dir).task_model(task_name)
