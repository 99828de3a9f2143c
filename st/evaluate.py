"""Evaluate a fine-tuned checkpoint on a task's splits and write predictions."""

from __future__ import annotations

from pathlib import Path

from st import dist
from st.errors import UserError
from st.io import check_output, read_json, staged_outputs, starts_with
from st.layout import CONFIG
from st.pipeline import checkpoint_spec, load_split
from st.train import predict_set


def evaluate_checkpoint(
    checkpoint,
    task_name,
    data_dir,
    split,
    predictions,
    batch_size,
    device,
    precision,
    *,
    overwrite: bool = False,
    dataset: str | None = None,
) -> dict:
    """{split: metrics} for `split` ("dev", "test" or an exact split name); metrics are empty for
    unlabelled test splits, whose predictions go to `predictions` (one file per split). Existing
    prediction files are refused before any work, unless `overwrite` (and they are predictions)."""
    model, spec, task, tokenizer = checkpoint_spec(checkpoint, task_name, data_dir, dataset)
    precision = precision or spec.train.precision  # None: the precision it was fine-tuned in
    if model.num_labels != task.num_labels:
        raise UserError(
            f"{checkpoint} has {model.num_labels} outputs but task {task.name} needs {task.num_labels}; pass "
            "the task it was fine-tuned on"
        )
    trained = read_json(Path(checkpoint) / CONFIG).get("labels") or []
    if trained and list(task.labels) and list(trained) != list(task.labels):  # output i must mean the same label
        raise UserError(
            f"{checkpoint} was trained with labels {trained} but task {task.name} has {list(task.labels)}; "
            "pass --labels in the checkpoint's order, or evaluate on the task it was fine-tuned on"
        )
    splits = {"dev": task.dev_splits, "test": task.test_splits}.get(split, (split,))
    paths = {}
    if predictions:
        for name in splits:
            path = Path(predictions)
            path = path.with_name(f"{path.stem}.{name}{path.suffix}") if len(splits) > 1 else path
            paths[name] = check_output(path, "predictions", (".tsv",), starts_with("index\tprediction"), overwrite)
    model.to(device)
    results, written = {}, {}
    for name in splits:
        examples, data = load_split(task, tokenizer, name)
        preds = predict_set(model, data, tokenizer.pad_id, device=device, precision=precision, batch_size=batch_size)
        results[name] = task.compute_metrics(preds, data.labels) if data.labels is not None else {}
        written[name] = examples, preds
    if paths and dist.is_main():
        with staged_outputs(list(paths.values())) as staged:  # every split's file, or none
            for (name, _), tmp in zip(paths.items(), staged):
                task.write_predictions(name, *written[name], tmp)
    return results
