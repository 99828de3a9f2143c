"""Task registry: a dict, a decorator that refuses duplicates, and an auto-import of this package.

A task is anything that satisfies the `Task` protocol; `@register_task("name")` registers a class
(or factory) whose constructor takes `data_dir` and task-specific keyword options.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from st.errors import UserError


@dataclass(frozen=True)
class Example:
    """One input: a sentence or a sentence pair, its label (None on unlabelled test splits) and an id."""

    text_a: str
    text_b: str | None
    label: int | float | None
    guid: str


class Task(Protocol):
    name: str
    labels: tuple[str, ...]  # label names in index order; empty for regression
    metrics: tuple[str, ...]  # names computed by `compute_metrics`, e.g. ("accuracy", "f1")
    main_metric: str  # the one used to choose epochs and tickets
    head_dropout: float  # dropout before the task layer (paper: MNLI 0.2, CoLA 0.05, else 0.1)
    dev_splits: tuple[str, ...]  # e.g. ("dev",) or MNLI's ("dev_matched", "dev_mismatched")
    test_splits: tuple[str, ...]

    @property
    def num_labels(self) -> int: ...  # 1 for regression

    def load(self, split: str) -> list[Example]: ...

    def compute_metrics(self, predictions: Sequence, labels: Sequence) -> dict[str, float]: ...

    def write_predictions(self, split: str, examples: Sequence[Example], predictions: Sequence, path: Path) -> None: ...


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    """Register a task class or factory under `name`; registering a name twice is an error."""

    def decorator(factory):
        if name in TASKS:
            raise UserError(
                f"task {name!r} is already registered (by {getattr(TASKS[name], '__module__', '?')}); "
                "give your task another name"
            )
        TASKS[name] = factory
        return factory

    return decorator


def get_task(name: str, **options) -> Task:
    """Build the task `name` with its options (e.g. data_dir); an unknown name lists close ones."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(f"unknown task {name!r}.{hint} Run `st tasks` to list all tasks.")
    factory = TASKS[name]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        params = {}
    if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [key for key in options if key not in params]
        if unknown:  # e.g. --text-columns with a GLUE task: a one-line refusal, not a TypeError traceback
            raise UserError(f"task {name} takes no --{unknown[0].replace('_', '-')}; drop it for this task")
    return factory(**options)


def import_user_dir(path: str | Path) -> None:
    """Import a user's module or package so that its @register_task tasks become usable (`st --user-dir`)."""
    path = Path(path).resolve()
    if not path.exists():
        raise UserError(f"--user-dir {path} does not exist; pass a .py file or a folder with __init__.py")
    if path.is_file():
        if path.suffix != ".py":
            raise UserError(f"--user-dir {path} is not a Python file; pass a .py file or a folder with __init__.py")
        module_name = f"st_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
    else:
        init = path / "__init__.py"
        if not init.exists():
            raise UserError(f"--user-dir {path} is a folder without __init__.py; add one or pass the .py file")
        module_name = f"st_user_{path.name}"
        spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=[str(path)])
    if module_name in sys.modules:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:  # a half-imported module would pass for a loaded one next time
        del sys.modules[module_name]
        raise


def _import_all_tasks() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all_tasks()
