"""Multi-task learning with ticket sharing (Liang et al. 2021, Algorithm 1) on the MT-DNN model of
`st.multitask`.

A step of multi-task training is the one training step of every run (`st.train.TrainingStep`), with
one task's batches and this module's masked update (`MaskedUpdate`); the run itself is `st.share_run`.

Ticket sharing: task t has a ticket M_t (head_mask L×H0, ffn_mask L). A batch of task t runs
forward through M_t and updates only θ ⊙ M_t:
  - a weight chosen by no task is removed physically: the shared encoder is pruned to the union of
    the tickets (`MultiTask`);
  - "only" is exact: after a task-t step every parameter element outside M_t is bit-identical,
    its optimizer state (exp_avg, exp_inf / exp_avg_sq, ...) too. Masking the gradient is not
    enough (momentum and weight decay move weights whose gradient is zero), so the update is
    masked: parameters wholly outside M_t lose their gradient (the optimizer skips them), and
    those partly inside are snapshotted before `optimizer.step()` and their outside elements
    restored after it with `torch.where`.

What belongs to M_t (element level), as the architecture's `units()` places it:
  - head h of layer l, where M_t keeps it: its entries (for BERT, its Dh rows in each of the Q, K
    and V blocks of the fused `attention.qkv`, weight rows and bias entries, and its Dh input
    columns of `attention.out.weight`);
  - FFN block l, where M_t keeps it: every parameter of the block (for BERT `ffn.up` and `ffn.down`,
    down's bias included: ν multiplies the whole FFN output);
  - shared by every task, so updated by every step: embeddings, norms, the output projection's
    bias (a masked head's projection still adds it), shared position tables, the pooler;
  - task t's head; the other tasks' heads are never touched by a task-t step.
Per-tensor scalars of the optimizer (Adam's `step` counter) cannot be split by element: they
count the steps that touched the tensor. Gradient clipping uses the norm of task t's gradient.
Without tickets (`--no-tickets`) every task's mask is all ones: plain MT-DNN.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from st.data import EncodedSet
from st.errors import UserError
from st.models.bert import Bert
from st.models.units import layer_param, unit_mask
from st.multitask import MultiTask, MultiTaskModel, union_masks
from st.prune import prune_encoder
from st.specs import TrainConfig
from st.tickets import Ticket
from st.train import Group, TrainingStep, predict_set

# An update mask per parameter: True = wholly the task's, False = not at all, or a bool tensor
# that broadcasts to the parameter's shape (element-wise).
UpdateMask = bool | Tensor


def update_masks(model: MultiTaskModel, task: int, ticket: Ticket) -> list[tuple[str, UpdateMask]]:
    """Which elements of each parameter of `model` a step of task `task` (with `ticket`) may change.

    See the module docstring for what belongs to a head or an FFN block. Heads are located by their
    original index in each layer's kept heads, so this is right for the union-pruned encoder.
    """
    c = model.encoder.config
    units, heads, ffn = c.units(), ticket.head_mask, ticket.ffn_mask
    masks = []
    for name, p in model.named_parameters():
        mask: UpdateMask = True
        where = layer_param(name.removeprefix("encoder.")) if name.startswith("encoder.") else None
        if name.startswith("heads."):
            mask = int(name.split(".")[1]) == task
        elif where is not None:
            i, rest = where
            found = units.place(rest)
            if rest.startswith(units.ffn_block):
                mask = bool(ffn[i])
            elif found is not None and found[1] == "heads":
                keep = torch.tensor([bool(heads[i][h]) for h in c.layer_heads(i)])  # H: this layer's heads
                if not keep.all():
                    mask = unit_mask(found[0], keep, c.head_dim, p.dim())
        masks.append((name, mask.to(p.device) if isinstance(mask, Tensor) else mask))
    return masks


def masked_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[tuple[nn.Parameter, UpdateMask]],
    step: Callable[[], object] | None = None,
) -> None:
    """`optimizer.step()` that changes only the elements inside each parameter's update mask.

    Wholly outside: the gradient is dropped, so the optimizer skips the tensor (no weight decay, no
    momentum, state untouched). Partly inside: the outside elements of the parameter and of every
    optimizer state tensor shaped like it are restored after the step (state created by this
    step is restored to zeros, the value optimizers start from).
    """
    saved = []
    for p, mask in params:
        if mask is False:
            p.grad = None
        elif mask is not True and p.grad is not None:
            state = {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
            saved.append((p, mask, p.detach().clone(), state))
    (step or optimizer.step)()
    with torch.no_grad():
        for p, mask, old, old_state in saved:
            p.copy_(torch.where(mask, p, old))
            for k, v in optimizer.state[p].items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.copy_(torch.where(mask, v, old_state[k] if k in old_state else torch.zeros_like(v)))


class MaskedUpdate:
    """What a step of one task may change (`st.train.Update`): the elements inside each parameter's
    update mask. Its gradient is dropped (wholly outside) or zeroed (partly) before clipping, so the
    clip norm is task t's own; the optimizer step itself is `masked_step`."""

    def __init__(self, params: Sequence[tuple[nn.Parameter, UpdateMask]]):
        self.params = list(params)

    @torch.no_grad()
    def mask_gradients(self) -> list[nn.Parameter]:
        for p, mask in self.params:
            if p.grad is None:
                continue
            if mask is False:
                p.grad = None
            elif mask is not True:
                p.grad.masked_fill_(~mask, 0)  # zero already in exact arithmetic; keeps the clip norm task t's own
        return [p for p, _ in self.params if p.grad is not None]

    def apply(self, optimizer: torch.optim.Optimizer, optimizer_step: Callable[[], object]) -> None:
        masked_step(optimizer, self.params, optimizer_step)


def epoch_plan(num_batches: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The task of each step of one epoch: task t appears num_batches[t] times, in a seeded shuffle.

    Every batch of every task is used once, and at any point a task is drawn in proportion to its
    training-set size (MT-DNN). Depends on (seed, epoch) only, so a resumed run sees the same order.
    """
    plan = [t for t, n in enumerate(num_batches) for _ in range(n)]
    random.Random(f"share:{seed}:{epoch}").shuffle(plan)  # str seeds are hashed with sha512: stable
    return plan


# ---- ticket sharing -------------------------------------------------------------------------------


class TicketSharer(MultiTask):
    """The multi-task model trained by Algorithm 1: `TicketSharer.create(encoder, tasks, tickets)` from
    a pre-trained encoder (tickets None: MT-DNN), `.step(...)` one masked step, `.train(...)` the
    epochs, `.evaluate(...)`; saving, loading and per-task views come from `MultiTask`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._updates: dict[tuple[int, str], MaskedUpdate] = {}

    @classmethod
    def create(
        cls,
        encoder: Bert,
        tasks: Sequence,
        tickets: Sequence[Ticket] | None = None,
        *,
        head_dropouts: Sequence[float] | None = None,
        pooler: Mapping[str, Tensor] | None = None,
        seed: int = 0,
    ) -> "TicketSharer":
        """The multi-task model on a full pre-trained `encoder`: pruned to the union of `tickets`
        (one per task, in task order; None = all ones), a pooler (pre-trained if given) and one
        task head per task, initialised from `seed`."""
        config = encoder.config
        if config.kept_heads is not None or config.ffn_sizes is not None:
            raise UserError(
                "the encoder is physically pruned already; start ticket sharing from the full pre-trained model"
            )
        names = [t.name for t in tasks]
        if tickets is None:
            tickets = [Ticket.full(config)] * len(tasks)  # plain MT-DNN
        if len(tickets) != len(tasks):
            raise UserError(f"{len(tickets)} tickets for {len(tasks)} tasks; give one ticket per task")
        for ticket in tickets:
            ticket.check_matches(config)
        head_mask, ffn_mask = union_masks(tickets)
        union = prune_encoder(encoder, head_mask, ffn_mask)
        dropouts = list(head_dropouts) if head_dropouts is not None else [t.head_dropout for t in tasks]
        torch.manual_seed(seed)  # the same seed gives the same heads, with or without tickets
        model = MultiTaskModel(union, [(t.num_labels, p) for t, p in zip(tasks, dropouts)])
        if pooler is not None:  # BERT's pre-trained pooler; MiniLM-style checkpoints may lack one
            model.pooler.load_state_dict(pooler)
        return cls(model, names, tickets, dict(zip(names, tasks)))

    def update(self, name: str) -> "MaskedUpdate":
        """Algorithm 1's update for a step of task `name`, made once per task and device."""
        index = self.index(name)
        key = (index, str(next(self.model.parameters()).device))
        if key not in self._updates:
            params = dict(self.model.named_parameters())
            self._updates[key] = MaskedUpdate(
                [(params[n], m) for n, m in update_masks(self.model, index, self.tickets[index])]
            )
        return self._updates[key]

    def group(self, name: str, batches: Sequence[Mapping[str, Tensor]]) -> Group:
        """One optimizer step of task `name` for `st.train.TrainingStep`: its batches go forward through
        its ticket and head, and the update changes only θ ⊙ M_t (and its head)."""
        view = self.view(name)
        return Group(
            list(batches),
            f"a step of task {name}",
            lambda module, batch: view(**batch, through=module),
            self.update(name),
        )

    def step(self, name: str, batch: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> float:
        """One step of Algorithm 1 on a batch of task `name`, outside the epoch loop: the same
        `TrainingStep` that `train` takes. Returns the loss."""
        device = next(self.model.parameters()).device
        return TrainingStep(self.model, optimizer, cfg, device, find_unused=True)(self.group(name, [batch]))

    def evaluate(
        self, dev: Mapping[str, EncodedSet], pad_id: int, precision: str = "fp32"
    ) -> dict[str, dict[str, float]]:
        """{task: dev metrics}, each task through its own ticket and head."""
        results = {}
        for name, data in dev.items():
            if name not in self.tasks:
                raise UserError(f"no task object for {name!r}: pass tasks to TicketSharer to compute metrics")
            device = next(self.model.parameters()).device
            predictions = predict_set(self.view(name), data, pad_id, device=device, precision=precision)
            results[name] = self.tasks[name].compute_metrics(predictions, data.labels)
        return results

    def average(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        """The mean over tasks of each task's main metric. An undefined metric (NaN or None: a
        correlation of constant predictions, e.g. STS-B's Pearson early on) counts as 0, no
        correlation, so one such task neither poisons the average nor the choice of epoch."""
        return sum(_or_zero(metrics[n][self.tasks[n].main_metric]) for n in metrics) / len(metrics)


def _or_zero(x) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else x
