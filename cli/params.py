"""Click parameter types and parsers: command-line strings in, the plain values the library takes out.

A bad value raises `UserError`, which the `st` group turns into one line (click's own parameter
errors print a usage block instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import click

from st.errors import UserError


class CommaList(click.ParamType):
    """ "0.1,0.2,0.3" -> [0.1, 0.2, 0.3]: comma-separated values, each converted by `item`."""

    name = "list"

    def __init__(self, item: Callable = str, example: str = "a,b"):
        self.item, self.example = item, example

    def convert(self, value, param, ctx) -> list:
        if not isinstance(value, str):  # a default given as a list
            return list(value)
        try:
            return [self.item(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise UserError(
                f"{param.opts[0]} takes comma-separated numbers, e.g. {self.example}; got {value!r}"
            ) from None


NUMBERS = CommaList(float, "0.1,0.2,0.3")
NAMES = CommaList(str, "winning,random")


class TaskNames(click.ParamType):
    """ "a,b,c" -> [a, b, c]; "glue" -> the nine GLUE tasks. A task listed twice is refused."""

    name = "tasks"

    def convert(self, value, param, ctx) -> list[str]:
        from st.tasks.glue import GLUE_TASKS

        names = (
            list(GLUE_TASKS) if value.strip().lower() == "glue" else [n.strip() for n in value.split(",") if n.strip()]
        )
        if not names:
            raise UserError("--tasks is empty; pass comma-separated task names, or glue")
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice:
            raise UserError(f"task {twice} is listed twice in --tasks; list each task once")
        return names


def task_pairs(values: Sequence[str], option: str) -> dict[str, str]:
    """["a=x", "b=y"] -> {a: x, b: y}; a task given twice is refused."""
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"{option} {value!r} must be TASK=PATH")
        if name.strip() in pairs:
            raise UserError(f"task {name.strip()} has two {option} values; give one per task")
        pairs[name.strip()] = path.strip()
    return pairs


def pairs_option(ctx, param, values) -> dict[str, str]:
    """A click callback for a repeated TASK=PATH option."""
    return task_pairs(values, param.opts[0])


def for_tasks(names: Sequence[str], values: Sequence[str], option: str) -> dict[str, str]:
    """Per-task values of a repeated option: all TASK=VALUE pairs, or bare values in the order of
    --tasks (each may hold several, comma-separated). No other task may appear; a task left out is the
    caller's to refuse (`st share` names the task without a ticket)."""
    values = [v for value in values for v in value.split(",") if v.strip()]
    named = ["=" in v for v in values]
    if any(named) and not all(named):
        raise UserError(f"{option} mixes TASK=PATH pairs and bare paths; use one form")
    if all(named) and values:
        pairs = task_pairs(values, option)
        unknown = [n for n in pairs if n not in names]
        if unknown:
            raise UserError(f"{option} names task {unknown[0]}, which is not in --tasks ({', '.join(names)})")
    else:
        if len(values) != len(names):
            raise UserError(
                f"{option} has {len(values)} paths for {len(names)} tasks; give one per task, "
                "in the order of --tasks, or TASK=PATH pairs"
            )
        pairs = dict(zip(names, values))
    return pairs


def ratios_for_tasks(names: Sequence[str], ratios: Sequence[float]) -> dict[str, float]:
    """--ratios: one for every task, or one per task in the order of --tasks."""
    if len(ratios) not in (1, len(names)):
        raise UserError(f"--ratios has {len(ratios)} values for {len(names)} tasks; give one, or one per task")
    return dict(zip(names, list(ratios) * len(names) if len(ratios) == 1 else ratios))


def only_listed(names: Sequence[str], pairs: dict[str, str], option: str) -> dict[str, str]:
    """The {task: value} pairs of a TASK=VALUE option, refused when one names a task not in --tasks."""
    unknown = [name for name in pairs if name not in names]
    if unknown:
        raise UserError(f"{option} names task {unknown[0]}, which is not in --tasks")
    return pairs


def sizes_for_tasks(names: Sequence[str], pairs: dict[str, str]) -> dict[str, int]:
    """--train-sizes TASK=N pairs as {task: N}."""
    only_listed(names, pairs, "--train-sizes")
    bad = next((f"{name}={n}" for name, n in pairs.items() if not n.strip().isdigit() or int(n) < 1), None)
    if bad:
        raise UserError(f"--train-sizes {bad}: N must be a positive whole number of training examples")
    return {name: int(n) for name, n in pairs.items()}


class TicketFile(click.ParamType):
    """A ticket.json path -> the `Ticket` it holds (a run is identified by the ticket, not its path)."""

    name = "ticket"

    def convert(self, value, param, ctx):
        from st.tickets import Ticket

        return value if isinstance(value, Ticket) else Ticket.load(Path(value))


TICKET = TicketFile()
