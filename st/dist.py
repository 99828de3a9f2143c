"""torch.distributed in a few lines: every helper is a no-op (or the obvious answer) on one process.

A leaf module: nothing here imports the rest of `st`. Process-group set-up from the torchrun
environment belongs here too (setup / cleanup); only `cli/` decides when to call it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as td

from st.errors import UserError  # a leaf too


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_distributed() else 0


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only the main process writes files and prints."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returned for convenience."""
    if is_distributed():
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        td.barrier()


# ---- process group from the torchrun environment ---------------------------------------------


@contextmanager
def session():
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU); a no-op otherwise."""
    if "RANK" not in os.environ or is_distributed():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    td.init_process_group(backend)
    try:
        yield
    finally:
        td.destroy_process_group()


def pick_device(requested: str | None) -> str:
    """The device for this process: the requested one, else this rank's GPU, else the CPU."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        kind = torch.device(requested).type
    except RuntimeError:
        raise UserError(f"--device {requested} is not a device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return requested


def wrap(model: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
    """DistributedDataParallel under torchrun; the model itself on one process. `find_unused`: a
    forward pass may leave some parameters out (a multi-task step uses one task's head)."""
    if not is_distributed():
        return model
    device_ids = [next(model.parameters()).device.index] if next(model.parameters()).is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def gather_dicts(mine: dict) -> dict:
    """Merge every rank's dict (e.g. example index -> prediction) on every rank."""
    if not is_distributed():
        return mine
    parts = [None] * world_size()
    td.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}
