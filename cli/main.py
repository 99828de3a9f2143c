"""The `st` command line: each command turns options into one library call.

Only this package reads argv and the environment. User errors (`st.errors.UserError`) become one
line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import click
from rich.console import Console

from st.errors import UserError

console = Console(stderr=True, soft_wrap=True)  # never break paths across lines


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=Group)
@click.option("--user-dir", type=click.Path(), help="A .py file or package whose @register_task tasks to add.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
def cli(user_dir, verbose):
    """st: find super tickets in pre-trained BERT models (Liang et al., ACL 2021)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if user_dir:
        from st.tasks import import_user_dir

        import_user_dir(user_dir)


# ---- shared options ---------------------------------------------------------------------------


def task_options(f):
    """--task and the options that locate and describe its data."""
    options = [
        click.option("--task", required=True, help="Task name (see `st tasks`)."),
        click.option("--data-dir", type=click.Path(), default=None, help="Task data folder (GLUE: defaults to $GLUE_DIR/<Task>)."),
        click.option("--text-columns", default=None, help="csv/jsonl tasks: text column, or two comma-separated for pairs."),
        click.option("--label-column", default=None, help="csv/jsonl tasks: label column."),
        click.option("--labels", "label_set", default=None, help="csv/jsonl tasks: comma-separated label set (default: from train)."),
        click.option("--regression", is_flag=True, default=None, help="csv/jsonl tasks: a real-valued label."),
        click.option("--max-length", default=128, show_default=True, type=click.IntRange(8, 512), help="Tokens per example."),
    ]
    return functools.reduce(lambda g, o: o(g), reversed(options), f)


def train_options(f):
    """The paper's fine-tuning defaults, each overridable."""
    options = [
        click.option("--model", default="minilm-l6", show_default=True, help="Folder, alias (minilm-l6) or cached hub id."),
        click.option("--epochs", default=3, show_default=True, type=click.IntRange(1)),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1)),
        click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="Default: the paper's 5e-5 for BERT-base and larger, 2e-4 for smaller encoders (hidden < 768)."),
        click.option("--warmup", default=0.1, show_default=True, type=click.FloatRange(0, 1), help="Fraction of steps with linear warm-up."),
        click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(0)),
        click.option("--clip", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Gradient-norm clipping."),
        click.option("--dropout", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True)),
        click.option("--head-dropout", default=None, type=click.FloatRange(0, 1, max_open=True), help="Default: the task's (MNLI 0.2, CoLA 0.05, else 0.1)."),
        click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(1), help="Gradient accumulation steps."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--train-size", default=None, type=click.IntRange(1), help="Use N training examples, sampled with the seed."),
        click.option("--train-fraction", default=None, type=float, help="Use this fraction (0, 1] of the training set."),
    ]
    return functools.reduce(lambda g, o: o(g), reversed(options), device_options(f))


def device_options(f):
    f = click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True, help="Autocast on CUDA.")(f)
    return click.option("--device", default=None, help="cpu or cuda (default: cuda when available; under torchrun, this rank's GPU).")(f)


def make_task_options(text_columns, label_column, label_set, regression) -> tuple:
    given = {"text_columns": text_columns, "label_column": label_column, "labels": label_set, "regression": regression}
    return tuple((k, v) for k, v in given.items() if v is not None)


def make_job(kw: dict, **extra):
    from st.pipeline import Job
    from st.train import TrainConfig, default_lr

    from st import dist

    if kw["train_fraction"] is not None and not 0 < kw["train_fraction"] <= 1:
        raise UserError(f"--train-fraction must be in (0, 1], got {kw['train_fraction']}")
    train = TrainConfig(
        epochs=kw["epochs"], batch_size=kw["batch_size"], lr=kw["lr"] or default_lr(kw["model"]), warmup=kw["warmup"],
        weight_decay=kw["weight_decay"], clip=kw["clip"], grad_accum=kw["grad_accum"], seed=kw["seed"],
        device=dist.pick_device(kw["device"]), precision=kw["precision"],
    )
    return Job(
        task=kw["task"], model=kw["model"], data_dir=kw["data_dir"],
        task_options=make_task_options(kw["text_columns"], kw["label_column"], kw["label_set"], kw["regression"]),
        train_size=kw["train_size"], train_fraction=kw["train_fraction"], max_length=kw["max_length"],
        dropout=kw["dropout"], head_dropout=kw["head_dropout"], train=train, **extra,
    )


# ---- commands ---------------------------------------------------------------------------------


@cli.command("tasks")
def tasks_command():
    """List the registered tasks and their metrics."""
    from rich.table import Table

    from st.tasks import TASKS

    table = Table("task", "metrics", "main metric", title="tasks")
    for name in sorted(TASKS):
        cls = TASKS[name]
        table.add_row(name, ", ".join(getattr(cls, "metrics", ()) or ("(set by options)",)), getattr(cls, "main_metric", "") or "")
    Console().print(table)


@cli.command("finetune")
@task_options
@train_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumes if interrupted).")
@click.option("--ticket", type=click.Path(exists=True, dir_okay=False), help="ticket.json: rewind and fine-tune the subnetwork.")
@click.option("--init", type=click.Path(exists=True, file_okay=False), help="Continue from a fine-tuned checkpoint folder.")
def finetune_command(out, ticket, init, **kw):
    """Fine-tune a pre-trained BERT on one task (ST-DNN), optionally a ticket's subnetwork."""
    from st import dist
    from st.pipeline import run_finetune
    from cli.progress import training_progress

    with dist.session():
        job = make_job(kw, ticket=ticket, init=init)
        with training_progress(enabled=dist.is_main()) as (on_step, on_epoch):
            result = run_finetune(job, out, on_step=on_step, on_epoch=on_epoch)
        if dist.is_main():
            dev = ", ".join(f"{k} {v:.4f}" for k, v in result["dev"].items())
            console.print(f"[bold]{result['task']}[/]: best epoch {result['best_epoch']}, dev {dev} -> {out}")


@cli.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="A folder written by `st finetune`.")
@click.option("--task", default=None, help="Default: the checkpoint's task.")
@click.option("--data-dir", type=click.Path(), default=None)
@click.option("--split", default="dev", show_default=True, help="dev or test (or a task's split name, e.g. dev_mismatched).")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None, help="Write predictions here (GLUE submission format).")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@device_options
def eval_command(checkpoint, task, data_dir, split, predictions, batch_size, device, precision):
    """Evaluate a fine-tuned checkpoint on a split; write predictions."""
    from st import dist
    from st.evaluate import evaluate_checkpoint

    with dist.session():
        metrics = evaluate_checkpoint(checkpoint, task, data_dir, split, predictions, batch_size, dist.pick_device(device), precision)
        if dist.is_main():
            for name, values in metrics.items():
                shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items()) or "predictions written"
                console.print(f"[bold]{name}[/]: {shown}")


@cli.command("score")
@click.option("--checkpoint", required=True, type=click.Path(), help="A folder written by `st finetune` (the full model).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="scores.json to write; a heatmap PNG goes beside it.")
@click.option("--num-examples", default=None, type=click.IntRange(1), help="Score a seeded sample of N training examples.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@device_options
def score_command(checkpoint, out, num_examples, batch_size, seed, device, precision):
    """Importance of every head and FFN block: E_x |dL/d mask| over the training set."""
    from st import dist
    from st.importance import plot_heatmap
    from st.pipeline import score_checkpoint

    with dist.session():
        scores = score_checkpoint(checkpoint, num_examples=num_examples, batch_size=batch_size, device=dist.pick_device(device), seed=seed)
        if dist.is_main():
            scores.save(out)
            plot_heatmap(scores, Path(out).with_suffix(".png"))
            console.print(f"scored {scores.num_examples} examples -> {out} (+ {Path(out).with_suffix('.png').name})")


@cli.command("prune")
@click.option("--scores", "scores_path", required=True, type=click.Path(), help="scores.json from `st score`.")
@click.option("--ratio", required=True, type=float, help="Fraction of heads and FFN blocks to prune, in [0, 1).")
@click.option("--kind", type=click.Choice(["winning", "random", "losing"]), default="winning", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int, help="For random tickets.")
@click.option("--checkpoint", type=click.Path(), default=None, help="The scored checkpoint: checks the scores and counts weights remaining.")
@click.option("--model", default=None, help="Or the pre-trained model, to count weights remaining (default: the scores' model).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ticket.json to write.")
def prune_command(scores_path, ratio, kind, seed, checkpoint, model, out):
    """Make a ticket: prune round(r*L*H) heads and round(r*L) FFN blocks by importance."""
    from st.importance import Scores
    from st.tickets import Pruner

    from st.models import load_checkpoint, load_pretrained

    scores = Scores.load(scores_path)
    config, num_labels = None, 2
    if checkpoint:
        classifier, _ = load_checkpoint(checkpoint)
        config, num_labels = classifier.encoder.config, classifier.num_labels
    elif model:
        config = load_pretrained(model).config
    ticket = Pruner(scores).ticket(ratio, kind, seed, config=config, num_labels=num_labels)
    ticket.save(out)
    remaining = ticket.percent_remaining
    shown = f", {remaining['model']:.1f}% of weights remain ({remaining['encoder']:.1f}% of the encoder)" if remaining else ""
    console.print(f"{kind} ticket at r={ratio}: {ticket.heads_pruned} heads and {ticket.ffn_pruned} FFN blocks pruned{shown} -> {out}")


@cli.command("export")
@click.option("--checkpoint", required=True, type=click.Path(), help="A folder written by `st finetune`.")
@click.option("--ticket", type=click.Path(exists=True, dir_okay=False), default=None, help="Prune to this ticket first.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the physically pruned model.")
@click.option("--hf", "hf_out", type=click.Path(file_okay=False), default=None, help="Also write a Hugging Face BertForSequenceClassification folder here.")
def export_command(checkpoint, ticket, out, hf_out):
    """Write a physically smaller model (fewer heads, FFN blocks removed) that loads back anywhere."""
    from st.pipeline import export_checkpoint

    stats = export_checkpoint(checkpoint, ticket, out, hf_out)
    console.print(f"exported {stats['parameters']:,} parameters ({stats['percent']:.1f}% of the checkpoint's) -> {out}" + (f" and {hf_out}" if hf_out else ""))


@cli.command("share")
@click.option("--tasks", "task_list", required=True, help="Comma-separated task names, or glue for the nine GLUE tasks.")
@click.option("--data-dir", "data_dirs", multiple=True, help="TASK=DIR, for each task that needs one (GLUE: $GLUE_DIR/<Task> by default).")
@click.option("--tickets", multiple=True, help="Per task (repeat, or separate with commas): TASK=PATH, or paths in --tasks order. "
              "A ticket.json / super_ticket.json, or an `st sweep` folder (with --ratios: scores.json, or a folder holding it).")
@click.option("--ratios", default=None, help="Comma-separated: make winning tickets at these ratios (one for all, or one per task) from the --tickets scores.")
@click.option("--no-tickets", is_flag=True, help="Plain MT-DNN: every task uses and updates every weight.")
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(8, 512), help="Tokens per example.")
@train_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumes if interrupted).")
def share_command(task_list, data_dirs, tickets, ratios, no_tickets, max_length, out, **kw):
    """Multi-task training with ticket sharing (Algorithm 1), or plain MT-DNN with --no-tickets."""
    from st import dist
    from st.models import load_pretrained
    from st.share import parse_pairs, parse_tasks, report_table, resolve_tickets, run_share
    from cli.progress import training_progress

    names = parse_tasks(task_list)
    if no_tickets == bool(tickets) or (no_tickets and ratios):
        raise UserError("pass --tickets (one per task, optionally with --ratios) or --no-tickets, not both or neither")
    dirs = parse_pairs(data_dirs, "--data-dir")
    unknown = [name for name in dirs if name not in names]
    if unknown:
        raise UserError(f"--data-dir names task {unknown[0]}, which is not in --tasks")
    try:
        ratio_values = [float(r) for r in ratios.split(",")] if ratios else None
    except ValueError:
        raise UserError(f"--ratios takes comma-separated numbers in [0, 1), got {ratios!r}") from None
    with dist.session():
        chosen = None if no_tickets else resolve_tickets(names, tickets, load_pretrained(kw["model"]).config, ratio_values)
        options = {"data_dir": None, "text_columns": None, "label_column": None, "label_set": None, "regression": None, "max_length": max_length}
        jobs = [make_job({**kw, **options, "task": name, "data_dir": dirs.get(name)}) for name in names]
        with training_progress(enabled=dist.is_main()) as (on_step, on_epoch):
            result = run_share(jobs, chosen, out, on_step=on_step, on_epoch=on_epoch)
        if dist.is_main():
            Console().print(report_table(result))
            console.print(f"average dev {result['average']:.4f}, report -> {Path(out) / 'report.md'}")


# ---- sweep and report -------------------------------------------------------------------------


def _task_optional(f):
    """After task_options: --task may be left out (`st sweep` then runs the packaged main job)."""
    for param in f.__click_params__:
        if param.name == "task":
            param.required = False
            param.help = "Task name (see `st tasks`); without it, the main job: rotten_tomatoes on minilm-l6."
    return f


def _comma_list(text: str, option: str, convert=str) -> list:
    try:
        return [convert(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated numbers, e.g. 0.1,0.2,0.3; got {text!r}") from None


@contextlib.contextmanager
def _log_level(level):
    logger = logging.getLogger("st")
    before = logger.level
    if level is not None:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@cli.command("sweep")
@_task_optional
@task_options
@train_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep folder; the same command again resumes it.")
@click.option("--ratios", default=None, help="Comma-separated pruning ratios in [0, 1)  [default: 0.1,0.2,...,0.8]")
@click.option("--kinds", default="winning,random,losing", show_default=True, help="Comma-separated ticket kinds.")
@click.option("--seeds", default=None, type=int, help="How many seeds: --seed, --seed+1, ...  [default: 3]")
@click.option("--select-fraction", default=0.5, show_default=True, type=float, help="Part of the dev sample that chooses epochs and the ticket; the rest only reports.")
@click.option("--dev-size", default=None, type=click.IntRange(1), help="A seeded sample of N dev examples (default: all; the main job: 400).")
@click.option("--score-examples", default=None, type=click.IntRange(1), help="Importance over a seeded sample of N training examples (default: all).")
@click.option("--jobs", default=None, type=int, help="Runs at once: processes on CPU, at most one per GPU (default 1; the main job: 2).")
@click.option("--quick", is_flag=True, help="A one-minute look: 1 seed, ratios 0.3,0.6, all three kinds, 192 examples, 2 epochs.")
@click.pass_context
def sweep_command(ctx, out, ratios, kinds, seeds, select_fraction, dev_size, score_examples, jobs, quick, **kw):
    """Phase transition: the full model and winning/random/losing tickets at every ratio and seed; the super ticket.

    Without --task: the main job, rotten_tomatoes on minilm-l6 with 256 training examples, 2 epochs,
    batch 16, lr 5e-4, max length 64, 400 dev examples and 2 processes (about 15 minutes on 2 CPU
    cores); --quick: a one-minute version. Defaults shown below are for a --task of your own; an
    option you give always wins.
    """
    import os

    from click.core import ParameterSource

    from st import dist
    from st.pipeline import build_task
    from st.report import RunPrinter, phase_table, render, summary_lines
    from st.sweep import DEMO, QUICK, RATIOS, SweepConfig, run_sweep

    given = lambda name: ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)  # noqa: E731
    preset = QUICK if quick else DEMO if kw["task"] is None else None
    if preset:  # the packaged defaults, for every option not given on the command line
        for name in ("task", "model", "train_size", "epochs", "batch_size", "lr", "max_length"):
            kw[name] = kw[name] if given(name) else getattr(preset, name)
        dev_size = dev_size if given("dev_size") else preset.dev_size
        seeds = seeds if given("seeds") else preset.seeds
        jobs = jobs if given("jobs") else min(preset.jobs, os.cpu_count() or 1)
    ratio_list = _comma_list(ratios, "--ratios", float) if ratios is not None else list(preset.ratios if preset else RATIOS)
    quiet = not ctx.find_root().params.get("verbose")  # the table says which runs had finished earlier
    with dist.session(), _log_level(logging.WARNING if quiet else None):
        job = make_job(kw)
        cfg = SweepConfig(job, ratios=tuple(ratio_list), kinds=tuple(_comma_list(kinds, "--kinds")), seeds=3 if seeds is None else seeds,
                          select_fraction=select_fraction, dev_size=dev_size, score_examples=score_examples)
        starting = lambda n: console.print(f"sweep of {job.task} on {job.model}: {cfg.seeds} seed(s) x (full model + {len(cfg.kinds)} "  # noqa: E731
                                           f"kinds x {len(cfg.ratios)} ratios), {n} run(s) at a time -> {out}")
        doc = run_sweep(cfg, out, jobs=1 if jobs is None else jobs, on_start=starting, on_result=RunPrinter(console, build_task(job).main_metric))
        if dist.is_main():
            selection = render(out)
            Console().print(phase_table(doc, selection))
            for line in summary_lines(selection):
                console.print(line)
            console.print(f"-> {Path(out) / 'report.md'}, phase.png, super_ticket.json, results.json")
            failed = [r for r in doc["runs"] if r["error"]]
            if failed:
                raise UserError(f"{len(failed)} of {len(doc['runs'])} runs failed (listed above); rerun the same command to retry them")


@cli.command("report")
@click.argument("folder", type=click.Path(file_okay=False))
def report_command(folder):
    """Re-render a sweep's report.md, phase.png and super_ticket.json from its results.json."""
    from st.report import load_results, phase_table, render, summary_lines

    selection = render(folder)
    Console().print(phase_table(load_results(folder), selection))
    for line in summary_lines(selection):
        console.print(line)
    console.print(f"-> {Path(folder) / 'report.md'}, phase.png, super_ticket.json")


@cli.command("adapt")
@task_options
@train_options
@click.option("--from", "sources", multiple=True, help="NAME=MODEL: a pre-trained model, a fine-tuned or a multi-task (`st share`) folder. Repeat. Default: --model.")
@click.option("--fractions", default="0.001,0.01,0.1,1", show_default=True, help="Comma-separated fractions of the training set.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1), help="How many seeds per fraction: --seed, --seed+1, ...")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumes if interrupted).")
def adapt_command(sources, fractions, seeds, out, **kw):
    """Domain adaptation: fine-tune on a new task with 0.1%, 1%, 10%, 100% of its data (Table 4)."""
    from st.adapt import run_adapt
    from st.share import parse_pairs

    try:
        values = [float(f) for f in fractions.split(",") if f.strip()]
    except ValueError:
        raise UserError(f"--fractions takes comma-separated numbers in (0, 1], got {fractions!r}") from None
    named = parse_pairs(sources, "--from") if sources else {"pretrained": kw["model"]}
    result = run_adapt(make_job(kw), named, values, range(kw["seed"], kw["seed"] + seeds), out)
    console.print(f"{len(result['rows'])} runs -> {Path(out) / 'report.md'}")
    Console().print(Path(out, "report.md").read_text())


@cli.command("task-importance")
@click.option("--scores", "pairs", multiple=True, required=True, help="TASK=scores.json from `st score` (repeat, one per task).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write; the numbers go beside it as .json.")
def task_importance_command(pairs, out):
    """Importance across tasks (the paper's Figure 6): each task's share per layer, mean head importance."""
    from st.importance import Scores, plot_task_importance
    from st.io import write_json
    from st.share import parse_pairs

    scores = {name: Scores.load(path) for name, path in parse_pairs(pairs, "--scores").items()}
    data = plot_task_importance(scores, out)
    write_json(Path(out).with_suffix(".json"), data)
    console.print(f"{len(scores)} tasks -> {out}, {Path(out).with_suffix('.json')}")


def main():
    cli(prog_name="st")


if __name__ == "__main__":
    main()
