"""Evaluate a fine-tuned checkpoint on a task's splits and write predictions."""

from __future__ import annotations

from pathlib import Path

from st import dist
from st.errors import UserError
from st.pipeline import checkpoint_spec, load_split
from st.train import predict_set


def evaluate_checkpoint(checkpoint, task_name, data_dir, split, predictions, batch_size, device, precision) -> dict:
    """{split: metrics} for `split` ("dev", "test" or an exact split name); metrics are empty for
    unlabelled test splits, whose predictions go to `predictions` (one file per split)."""
    model, _, task, tokenizer = checkpoint_spec(checkpoint, task_name, data_dir)
    if model.num_labels != task.num_labels:
        raise UserError(f"{checkpoint} has {model.num_labels} outputs but task {task.name} needs {task.num_labels}; pass the task it was fine-tuned on")
    splits = {"dev": task.dev_splits, "test": task.test_splits}.get(split, (split,))
    model.to(device)
    results = {}
    for name in splits:
        examples, data = load_split(task, tokenizer, name)
        preds = predict_set(model, data, tokenizer.pad_id, device=device, precision=precision, batch_size=batch_size)
        results[name] = task.compute_metrics(preds, data.labels) if data.labels is not None else {}
        if predictions and dist.is_main():
            path = Path(predictions)
            if len(splits) > 1:
                path = path.with_name(f"{path.stem}.{name}{path.suffix}")
            task.write_predictions(name, examples, preds, path)
    return results
