"""Evaluate a fine-tuned checkpoint on a task's splits and write predictions."""

from __future__ import annotations

from pathlib import Path

from st import dist
from st.io import check_output, staged_outputs, starts_with
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
    options: dict | None = None,
) -> dict:
    """{split: metrics} for `split` ("dev", "test" or an exact split name); metrics are empty for
    unlabelled test splits, whose predictions go to `predictions` (one file per split). Existing
    prediction files are refused before any work, unless `overwrite` (and they are predictions).
    `options`: csv/jsonl/hf task options (text_columns, label_column, labels) replacing the checkpoint's."""
    model, spec, task, tokenizer = checkpoint_spec(checkpoint, task_name, data_dir, dataset, options)
    precision = precision or spec.train.precision  # None: the precision it was fine-tuned in
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
