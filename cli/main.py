"""The `st` command line: each command turns options into one library call. Here: the commands of
single runs and models (finetune, eval, score, prune, export); `cli.studies` adds the sweeps,
multi-task runs and adaptation; `cli.app` holds the group and the shared options.
"""

from __future__ import annotations

import signal
from pathlib import Path

import click
from rich.console import Console

from cli import studies  # noqa: F401  (registers its commands on the group)
from cli.app import (
    checkpoint_data_options,
    cli,
    console,
    device_option,
    log_to_option,
    overwrite_option,
    precision_option,
    task_options,
    tracking_for,
    train_options,
)
from cli.params import TICKET
from st.errors import UserError

# ---- commands ---------------------------------------------------------------------------------


@cli.command("tasks")
def tasks_command():
    """List the registered tasks and their metrics."""
    from rich.table import Table

    from st.tasks import TASKS

    table = Table("task", "metrics", "main metric", title="tasks")
    for name in sorted(TASKS):
        cls = TASKS[name]
        table.add_row(
            name, ", ".join(getattr(cls, "metrics", ()) or ("(set by options)",)), getattr(cls, "main_metric", "") or ""
        )
    Console().print(table)


@cli.command("finetune")
@task_options()
@train_options
@device_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumes if interrupted).")
@click.option("--ticket", type=TICKET, help="ticket.json: rewind and fine-tune the subnetwork.")
@click.option(
    "--init", type=click.Path(exists=True, file_okay=False), help="Continue from a fine-tuned checkpoint folder."
)
@log_to_option
def finetune_command(out, device, log_to, **options):
    """Fine-tune a pre-trained BERT on one task (ST-DNN), optionally a ticket's subnetwork."""
    from cli.progress import training_progress
    from st import dist
    from st.pipeline import run_finetune
    from st.specs import run_spec

    with dist.session():
        spec, device, tracking = run_spec(**options), dist.pick_device(device), tracking_for(log_to, out)
        with training_progress(enabled=dist.is_main()) as (on_step, on_epoch):
            result = run_finetune(spec, out, device=device, on_step=on_step, on_epoch=on_epoch, tracking=tracking)
        if dist.is_main():

            def shown(metrics):
                return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

            report = (
                f", {spec.held_out.report_split or 'report part'} {shown(result['report'])}"
                if result.get("report")
                else ""
            )
            console.print(
                f"[bold]{result['task']}[/] ({spec.train.precision}): best epoch {result['best_epoch']}, dev "
                f"{shown(result['dev'])}{report} -> {out}"
            )


@cli.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="A folder written by `st finetune`.")
@click.option("--task", default=None, help="Default: the checkpoint's task.")
@checkpoint_data_options
@click.option(
    "--split", default="dev", show_default=True, help="dev or test (or a task's split name, e.g. dev_mismatched)."
)
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write predictions here (GLUE submission format).",
)
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@device_option
@precision_option
@overwrite_option
def eval_command(
    checkpoint, task, data_dir, dataset, split, predictions, batch_size, device, precision, overwrite, **columns
):
    """Evaluate a fine-tuned checkpoint on a split; write predictions."""
    from st import dist
    from st.evaluate import evaluate_checkpoint

    with dist.session():
        metrics = evaluate_checkpoint(
            checkpoint,
            task,
            data_dir,
            split,
            predictions,
            batch_size,
            dist.pick_device(device),
            precision,
            overwrite=overwrite,
            dataset=dataset,
            options=columns,
        )
        if dist.is_main():
            for name, values in metrics.items():
                shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items()) or "predictions written"
                console.print(f"[bold]{name}[/]: {shown}")


@cli.command("score")
@click.option(
    "--checkpoint", required=True, type=click.Path(), help="A folder written by `st finetune` (the full model)."
)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="scores.json to write; a heatmap PNG goes beside it."
)
@click.option(
    "--num-examples", default=None, type=click.IntRange(1), help="Score a seeded sample of N training examples."
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@checkpoint_data_options
@device_option
@precision_option
@overwrite_option
def score_command(checkpoint, out, num_examples, batch_size, seed, device, precision, overwrite, **data):
    """Importance of every head and FFN block: E_x |dL/d mask| over the training set."""
    from st import dist
    from st.importance import plot_heatmap
    from st.io import check_output, is_json_with, is_png, staged_outputs
    from st.pipeline import score_checkpoint

    check_output(out, "importance scores", (".json",), is_json_with("head_raw"), overwrite)
    check_output(Path(out).with_suffix(".png"), "an importance heatmap", (".png",), is_png, overwrite)
    with dist.session():
        device = dist.pick_device(device)
        scores = score_checkpoint(
            checkpoint,
            num_examples=num_examples,
            batch_size=batch_size,
            device=device,
            seed=seed,
            precision=precision,
            data_dir=data.pop("data_dir"),
            dataset=data.pop("dataset"),
            options=data,
        )
        if dist.is_main():
            with staged_outputs([Path(out), Path(out).with_suffix(".png")]) as (json_path, png_path):
                scores.save(json_path)  # both files or neither: an interrupted command leaves nothing to refuse
                plot_heatmap(scores, png_path)
            png = Path(out).with_suffix(".png").name
            console.print(f"scored {scores.num_examples} examples in {scores.precision} -> {out} (+ {png})")


@cli.command("prune")
@click.option("--scores", "scores_path", required=True, type=click.Path(), help="scores.json from `st score`.")
@click.option("--ratio", required=True, type=float, help="Fraction of heads and FFN blocks to prune, in [0, 1).")
@click.option("--kind", type=click.Choice(["winning", "random", "losing"]), default="winning", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int, help="For random tickets.")
@click.option(
    "--checkpoint",
    type=click.Path(),
    default=None,
    help="The scored checkpoint: checks the scores and counts weights remaining.",
)
@click.option(
    "--model", default=None, help="Or the pre-trained model, to count weights remaining (default: the scores' model)."
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ticket.json to write.")
@overwrite_option
def prune_command(scores_path, ratio, kind, seed, checkpoint, model, out, overwrite):
    """Make a ticket: prune round(r*L*H) heads and round(r*L) FFN blocks by importance."""
    from st.io import check_output, is_json_with
    from st.pipeline import ticket_from_scores

    check_output(out, "a ticket", (".json",), is_json_with("head_mask", "ffn_mask"), overwrite)
    ticket = ticket_from_scores(Path(scores_path), ratio, kind, seed, checkpoint=checkpoint, model=model)
    ticket.save(out)
    remaining = ticket.percent_remaining
    shown = (
        f", {remaining['model']:.1f}% of weights remain ({remaining['encoder']:.1f}% of the encoder)"
        if remaining
        else ""
    )
    console.print(
        f"{kind} ticket at r={ratio}: {ticket.heads_pruned} heads and {ticket.ffn_pruned} FFN blocks "
        f"pruned{shown} -> {out}"
    )


@cli.command("export")
@click.option("--checkpoint", required=True, type=click.Path(), help="A folder written by `st finetune`.")
@click.option("--ticket", type=TICKET, default=None, help="Prune to this ticket first.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the physically pruned model in st's format.",
)
@click.option(
    "--hf",
    "hf_out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the family's Hugging Face ...ForSequenceClassification "
    "(from_pretrained in transformers 4.x and 5.x).",
)
@click.option(
    "--hf-layout",
    type=click.Choice(["dense", "pruned-heads"]),
    default="dense",
    show_default=True,
    help="dense: full-size matrices, pruned heads and FFN blocks zero-filled (exact; any transformers). "
    "pruned-heads: smaller matrices through the config's pruned_heads (transformers 4.x only).",
)
@click.option(
    "--onnx",
    "onnx_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="ONNX file of the pruned network, checked in onnxruntime (needs pip install 'st[onnx]').",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="Make the --onnx file int8 (ONNX Runtime's dynamic quantization), kept only if its dev accuracy "
    "is within --max-drop of the fp32 export's.",
)
@click.option(
    "--max-drop",
    type=float,
    default=None,
    help="Points of dev accuracy (main metric ×100) --quantize may lose against fp32.  [default: 1]",
)
@click.option("--force", is_flag=True, help="Keep a --quantize file that lost more than --max-drop, and say so.")
def export_command(checkpoint, ticket, out, hf_out, hf_layout, onnx_out, quantize, max_drop, force):
    """Write a physically smaller model (fewer heads, FFN blocks removed) for st, transformers and/or ONNX Runtime."""
    from st.export import export_checkpoint

    check = None
    if quantize:
        from st.onnx_accuracy import DEFAULT_MAX_DROP, AccuracyCheck

        check = AccuracyCheck.from_checkpoint(checkpoint, DEFAULT_MAX_DROP if max_drop is None else max_drop, force)
    elif max_drop is not None or force:
        raise UserError("--max-drop and --force apply to --quantize int8; add it or drop them")
    stats = export_checkpoint(checkpoint, ticket, out, hf_out, onnx_out, hf_layout, quantize, check)
    written = " and ".join(str(p) for p in (out, hf_out, onnx_out) if p)
    console.print(
        f"exported {stats['parameters']:,} parameters ({stats['percent']:.1f}% of the checkpoint's) -> {written}"
    )
    if stats["int8"]:
        q = stats["int8"]
        console.print(
            f"int8 {q['metric']} on {q['split']} ({q['examples']} examples): {100 * q['int8']:.2f} against the fp32 "
            f"export's {100 * q['fp32']:.2f} ({-q['drop_points']:+.2f} points)"
            + (
                f"; kept anyway (--force) although it lost more than --max-drop {q['max_drop']:g}"
                if q["forced"]
                else ""
            )
        )


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, kill) ends a command as cleanly as Ctrl-C


def main():
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="st")


if __name__ == "__main__":
    main()
