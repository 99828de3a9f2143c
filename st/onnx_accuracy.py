"""An int8 ONNX export checked on the task's dev data against the fp32 export, before it is kept.

Logits within a tolerance say little about int8: every logit moves a little, and what matters is
how many dev examples change class. So `st export --onnx F --quantize int8` runs both graphs in ONNX
Runtime over the checkpoint's dev split and refuses the int8 file when its main metric drops by more
than `max_drop` points (×100, as reports show it), unless `force`. Built before anything is written
(`AccuracyCheck.from_checkpoint` loads and encodes dev), so a bad task or data folder costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from st.data import EncodedSet, eval_shards
from st.errors import UserError
from st.models.heads import predict
from st.onnx_export import INPUTS, inference_session
from st.pipeline import checkpoint_spec, load_split
from st.tasks import Task

DEFAULT_MAX_DROP = 1.0  # points of the main metric the int8 file may lose against the fp32 export


def onnx_predictions(path: str | Path, data: EncodedSet, pad_id: int, batch_size: int = 64) -> list:
    """Predictions (class ids, or values for regression) of an ONNX export for every row of `data`."""
    session, found = inference_session(path), {}
    for indices, batch in eval_shards(data, batch_size, pad_id):
        (logits,) = session.run(["logits"], {k: batch[k].numpy() for k in INPUTS})
        found.update(zip(indices, predict(torch.from_numpy(logits)).tolist()))
    return [found[i] for i in range(len(data))]


def onnx_metric(path: str | Path, data: EncodedSet, task: Task, pad_id: int) -> float:
    """The task's main metric of an ONNX export on `data` (labelled)."""
    return task.compute_metrics(onnx_predictions(path, data, pad_id), data.labels)[task.main_metric]


@dataclass(frozen=True)
class AccuracyCheck:
    """Calling it with (fp32 file, int8 file) returns what it measured, or raises one UserError line
    giving both numbers when the int8 file loses more than `max_drop` points and `force` is off."""

    task: Task
    dev: EncodedSet
    split: str
    pad_id: int
    max_drop: float = DEFAULT_MAX_DROP
    force: bool = False

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, max_drop: float = DEFAULT_MAX_DROP, force: bool = False):
        if not (math.isfinite(max_drop) and max_drop >= 0):
            raise UserError(f"--max-drop {max_drop}: give the points of accuracy int8 may lose, a number >= 0")
        _, _, task, tokenizer = checkpoint_spec(checkpoint)
        split = task.dev_splits[0]
        dev = load_split(task, tokenizer, split)[1]
        if dev.labels is None:
            raise UserError(f"the {split} split of task {task.name} has no labels to check the int8 export on")
        return cls(task, dev, split, tokenizer.pad_id, max_drop, force)

    def __call__(self, fp32: str | Path, int8: str | Path) -> dict:
        metric = self.task.main_metric
        full, small = (onnx_metric(p, self.dev, self.task, self.pad_id) for p in (fp32, int8))
        drop = 100 * (full - small)
        measured = {
            "metric": metric,
            "split": self.split,
            "examples": len(self.dev),
            "fp32": full,
            "int8": small,
            "drop_points": drop,
            "max_drop": self.max_drop,
            "forced": False,
        }
        if not drop <= self.max_drop:  # NaN (an undefined metric) is refused too
            if not self.force:
                raise UserError(
                    f"the int8 export's {metric} on {self.task.name} {self.split} is {100 * small:.2f} against the "
                    f"fp32 export's {100 * full:.2f}: a drop of {drop:.2f} points > --max-drop {self.max_drop:g}; "
                    "nothing was written (raise --max-drop, pass --force to keep it anyway, or drop --quantize)"
                )
            measured["forced"] = True
        return measured
