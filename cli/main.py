"""The `st` command line: each command turns options into one library call.

Only this package reads argv and the environment. User errors (`st.errors.UserError`) become one
line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import logging
import signal
from pathlib import Path

import click
from rich.console import Console

from cli.params import NAMES, NUMBERS, TICKET, TaskNames, for_tasks, pairs_option, ratios_for_tasks, sizes_for_tasks
from st.errors import UserError

console = Console(stderr=True, soft_wrap=True)  # never break paths across lines


class Group(click.Group):
    """Every failure a user can cause or fix is one line on stderr (exit 1), never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except click.UsageError as e:  # click's own checks of option values: one line, not a usage block
            command = f"st {e.ctx.info_name} --help" if e.ctx and e.ctx.parent else "st --help"
            raise click.ClickException(f"{e.format_message()} (see `{command}`)") from None
        except OSError as e:  # the environment: a full disk, a read-only or vanished folder
            where = f" ({e.filename})" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}; fix that and rerun the same command: "
                                       "finished work is kept and resumed") from None
        except KeyboardInterrupt:
            console.print("interrupted: finished runs and epochs are kept; the same command resumes from them")
            ctx.exit(130)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, kill) ends a command as cleanly as Ctrl-C


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
# Options left out are None: the library fills in its defaults (and, for `st sweep`, the main job's).


def _options(*options):
    return lambda f: functools.reduce(lambda g, o: o(g), reversed(options), f)


def task_options(required: bool = True):
    """--task and the options that locate and describe its data."""
    task_help = "Task name (see `st tasks`)." + ("" if required else " Without it, the main job: rotten_tomatoes on minilm-l6.")
    return _options(
        click.option("--task", required=required, help=task_help),
        click.option("--data-dir", type=click.Path(), default=None, help="Task data folder (GLUE: the task folder or the GLUE root; default $GLUE_DIR)."),
        click.option("--text-columns", default=None, help="csv/jsonl tasks: text column, or two comma-separated for pairs."),
        click.option("--label-column", default=None, help="csv/jsonl tasks: label column."),
        click.option("--labels", default=None, help="csv/jsonl tasks: comma-separated label set (default: from train)."),
        click.option("--regression", is_flag=True, default=None, help="csv/jsonl tasks: a real-valued label."),
        click.option("--max-length", type=click.IntRange(8, 512), help="Tokens per example. Default: 128, or the model's positions where fewer."),
    )


train_options = _options(
    click.option("--model", help="Folder, alias (minilm-l6) or cached hub id. Default: minilm-l6."),
    click.option("--epochs", type=click.IntRange(1), help="Default: 3."),
    click.option("--batch-size", type=click.IntRange(1), help="Default: 32."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True),
                 help="Default: the paper's 5e-5 for BERT-base and larger, 2e-4 for smaller encoders (hidden < 768)."),
    click.option("--warmup", type=click.FloatRange(0, 1), help="Fraction of steps with linear warm-up. Default: 0.1."),
    click.option("--weight-decay", type=click.FloatRange(0), help="Default: 0.0."),
    click.option("--clip", type=click.FloatRange(min=0, min_open=True), help="Gradient-norm clipping. Default: 1.0."),
    click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), help="Default: 0.1."),
    click.option("--head-dropout", type=click.FloatRange(0, 1, max_open=True), help="Default: the task's (MNLI 0.2, CoLA 0.05, else 0.1)."),
    click.option("--grad-accum", type=click.IntRange(1), help="Gradient accumulation steps. Default: 1."),
    click.option("--seed", type=click.IntRange(0, 2**32 - 1), help="Default: 0."),
    click.option("--train-size", type=click.IntRange(1), help="Use N training examples, sampled with the seed."),
    click.option("--train-fraction", type=float, help="Use this fraction (0, 1] of the training set."),
    click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Autocast on CUDA. Default: fp32."),
    click.option("--report-split", help="Also evaluate this labelled split (e.g. test) once, on the weights dev chose; "
                                        "a sweep then chooses on all of its dev sample."),
    click.option("--select-fraction", type=float, help="Part of the dev sample that chooses the epoch (and a sweep's ticket); "
                                                       "the rest is evaluated once on the chosen weights. Default: all of it (a sweep: 0.5)."),
    click.option("--dev-size", type=click.IntRange(1), help="A seeded sample of N dev examples (default: all; the main job: 400)."),
)
device_option = click.option("--device", default=None, help="cpu or cuda (default: cuda when available; under torchrun, this rank's GPU).")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output of the same kind.")
precision_option = click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True, help="Autocast on CUDA.")


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
@task_options()
@train_options
@device_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumes if interrupted).")
@click.option("--ticket", type=TICKET, help="ticket.json: rewind and fine-tune the subnetwork.")
@click.option("--init", type=click.Path(exists=True, file_okay=False), help="Continue from a fine-tuned checkpoint folder.")
def finetune_command(out, device, **options):
    """Fine-tune a pre-trained BERT on one task (ST-DNN), optionally a ticket's subnetwork."""
    from st import dist
    from st.pipeline import run_finetune
    from st.specs import run_spec
    from cli.progress import training_progress

    with dist.session():
        spec, device = run_spec(**options), dist.pick_device(device)
        with training_progress(enabled=dist.is_main()) as (on_step, on_epoch):
            result = run_finetune(spec, out, device=device, on_step=on_step, on_epoch=on_epoch)
        if dist.is_main():
            shown = lambda metrics: ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())  # noqa: E731
            report = f", {spec.held_out.report_split or 'report part'} {shown(result['report'])}" if result.get("report") else ""
            console.print(f"[bold]{result['task']}[/]: best epoch {result['best_epoch']}, dev {shown(result['dev'])}{report} -> {out}")


@cli.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="A folder written by `st finetune`.")
@click.option("--task", default=None, help="Default: the checkpoint's task.")
@click.option("--data-dir", type=click.Path(), default=None)
@click.option("--split", default="dev", show_default=True, help="dev or test (or a task's split name, e.g. dev_mismatched).")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None, help="Write predictions here (GLUE submission format).")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@device_option
@precision_option
@overwrite_option
def eval_command(checkpoint, task, data_dir, split, predictions, batch_size, device, precision, overwrite):
    """Evaluate a fine-tuned checkpoint on a split; write predictions."""
    from st import dist
    from st.evaluate import evaluate_checkpoint

    with dist.session():
        metrics = evaluate_checkpoint(checkpoint, task, data_dir, split, predictions, batch_size, dist.pick_device(device), precision,
                                      overwrite=overwrite)
        if dist.is_main():
            for name, values in metrics.items():
                shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items()) or "predictions written"
                console.print(f"[bold]{name}[/]: {shown}")


@cli.command("score")
@click.option("--checkpoint", required=True, type=click.Path(), help="A folder written by `st finetune` (the full model).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="scores.json to write; a heatmap PNG goes beside it.")
@click.option("--num-examples", default=None, type=click.IntRange(1), help="Score a seeded sample of N training examples.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@device_option
@overwrite_option
def score_command(checkpoint, out, num_examples, batch_size, seed, device, overwrite):
    """Importance of every head and FFN block: E_x |dL/d mask| over the training set."""
    from st import dist
    from st.importance import plot_heatmap
    from st.io import check_output, is_json_with, is_png
    from st.pipeline import score_checkpoint

    check_output(out, "importance scores", (".json",), is_json_with("head_raw"), overwrite)
    check_output(Path(out).with_suffix(".png"), "an importance heatmap", (".png",), is_png, overwrite)
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
@overwrite_option
def prune_command(scores_path, ratio, kind, seed, checkpoint, model, out, overwrite):
    """Make a ticket: prune round(r*L*H) heads and round(r*L) FFN blocks by importance."""
    from st.io import check_output, is_json_with
    from st.pipeline import ticket_from_scores

    check_output(out, "a ticket", (".json",), is_json_with("head_mask", "ffn_mask"), overwrite)
    ticket = ticket_from_scores(Path(scores_path), ratio, kind, seed, checkpoint=checkpoint, model=model)
    ticket.save(out)
    remaining = ticket.percent_remaining
    shown = f", {remaining['model']:.1f}% of weights remain ({remaining['encoder']:.1f}% of the encoder)" if remaining else ""
    console.print(f"{kind} ticket at r={ratio}: {ticket.heads_pruned} heads and {ticket.ffn_pruned} FFN blocks pruned{shown} -> {out}")


@cli.command("export")
@click.option("--checkpoint", required=True, type=click.Path(), help="A folder written by `st finetune`.")
@click.option("--ticket", type=TICKET, default=None, help="Prune to this ticket first.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder for the physically pruned model in st's format.")
@click.option("--hf", "hf_out", type=click.Path(file_okay=False), default=None,
              help="Folder for the family's Hugging Face ...ForSequenceClassification (from_pretrained in transformers 4.x and 5.x).")
@click.option("--hf-layout", type=click.Choice(["dense", "pruned-heads"]), default="dense", show_default=True,
              help="dense: full-size matrices, pruned heads and FFN blocks zero-filled (exact; any transformers). "
                   "pruned-heads: smaller matrices through the config's pruned_heads (transformers 4.x only).")
@click.option("--onnx", "onnx_out", type=click.Path(dir_okay=False), default=None,
              help="ONNX file of the pruned network, checked in onnxruntime (needs pip install 'st[onnx]').")
def export_command(checkpoint, ticket, out, hf_out, hf_layout, onnx_out):
    """Write a physically smaller model (fewer heads, FFN blocks removed) for st, transformers and/or ONNX Runtime."""
    from st.export import export_checkpoint

    stats = export_checkpoint(checkpoint, ticket, out, hf_out, onnx_out, hf_layout)
    written = " and ".join(str(p) for p in (out, hf_out, onnx_out) if p)
    console.print(f"exported {stats['parameters']:,} parameters ({stats['percent']:.1f}% of the checkpoint's) -> {written}")


@cli.command("share")
@click.option("--tasks", "names", required=True, type=TaskNames(), help="Comma-separated task names, or glue for the nine GLUE tasks.")
@click.option("--data-dir", "data_dirs", multiple=True, callback=pairs_option, help="TASK=DIR, for each task that needs one (GLUE: $GLUE_DIR/<Task> by default).")
@click.option("--tickets", multiple=True, help="Per task (repeat, or separate with commas): TASK=PATH, or paths in --tasks order. "
              "A ticket.json / super_ticket.json, or an `st sweep` folder (with --ratios: scores.json, or a folder holding it).")
@click.option("--ratios", type=NUMBERS, default=None, help="Comma-separated: make winning tickets at these ratios (one for all, or one per task) from the --tickets scores.")
@click.option("--no-tickets", is_flag=True, help="Plain MT-DNN: every task uses and updates every weight.")
@click.option("--train-sizes", multiple=True, callback=pairs_option, help="TASK=N: that task's training sample (repeat); others take --train-size.")
@click.option("--max-length", type=click.IntRange(8, 512), help="Tokens per example. Default: 128, or the model's positions where fewer.")
@train_options
@device_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumes if interrupted).")
def share_command(names, data_dirs, tickets, ratios, no_tickets, train_sizes, out, device, **options):
    """Multi-task training with ticket sharing (Algorithm 1), or plain MT-DNN with --no-tickets."""
    from st import dist
    from st.pipeline import share_tickets
    from st.report import multitask_table
    from st.share import run_share
    from st.specs import run_spec
    from cli.progress import training_progress

    if no_tickets == bool(tickets) or (no_tickets and ratios):
        raise UserError("pass --tickets (one per task, optionally with --ratios) or --no-tickets, not both or neither")
    for option, given in (("--data-dir", data_dirs), ("--train-sizes", train_sizes)):
        unknown = [name for name in given if name not in names]
        if unknown:
            raise UserError(f"{option} names task {unknown[0]}, which is not in --tasks")
    sizes = sizes_for_tasks(train_sizes)
    with dist.session():
        specs = [run_spec(task=name, data_dir=data_dirs.get(name), **{**options, "train_size": sizes.get(name, options["train_size"])})
                 for name in names]
        chosen = None if no_tickets else share_tickets(for_tasks(names, tickets, "--tickets"), options["model"],
                                                        ratios and ratios_for_tasks(names, ratios))
        device = dist.pick_device(device)
        with training_progress(enabled=dist.is_main()) as (on_step, on_epoch):
            result = run_share(specs, chosen, out, device=device, on_step=on_step, on_epoch=on_epoch)
        if dist.is_main():
            Console().print(multitask_table(result))
            console.print(f"average dev {result['average']:.4f}, report -> {Path(out) / 'report.md'}")


# ---- sweep and report -------------------------------------------------------------------------


@cli.command("sweep")
@task_options(required=False)
@train_options
@device_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep folder; the same command again resumes it.")
@click.option("--ratios", type=NUMBERS, help="Comma-separated pruning ratios in [0, 1)  [default: 0.1,0.2,...,0.8]")
@click.option("--kinds", type=NAMES, help="Comma-separated ticket kinds. Default: winning,random,losing.")
@click.option("--control-ratios", type=NUMBERS, help="Ratios of the random and losing tickets, the controls (a few save time). Default: --ratios.")
@click.option("--seeds", type=int, help="How many seeds: --seed, --seed+1, ...  [default: 3]")
@click.option("--score-examples", type=click.IntRange(1), help="Importance over a seeded sample of N training examples (default: all).")
@click.option("--jobs", type=int, help="Runs at once: processes on CPU, at most one per GPU (default 1; the main job: 2).")
@click.option("--ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Every run a Ray task (pip install 'st[ray]'): alone, a local Ray instance; auto, the cluster this node is in; "
                   "HOST:PORT, that cluster's head. One CPU or one GPU per run; --out must be on storage every node sees.")
@click.option("--quick", is_flag=True, help="A one-minute smoke test (claims no super ticket): 1 seed, ratios 0.3,0.6, all three kinds, 192 examples, 2 epochs.")
@click.pass_context
@click.option("--keep-weights", type=click.Choice(["best", "all", "none"]), default="best", show_default=True,
              help="Whose weights stay once the sweep is done: the full model's and the super ticket's, every run's, or none.")
def sweep_command(ctx, out, device, ray, keep_weights, **options):
    """Phase transition: the full model and winning/random/losing tickets at every ratio and seed; the super ticket.

    Without --task: the main job, rotten_tomatoes on minilm-l6 with 512 training examples, 2 epochs,
    batch 16, lr 2e-4, max length 64, 400 dev examples, winning tickets at 0.1 ... 0.5, random and losing
    at 0.1,0.3,0.5, 2 processes (about 13 minutes on 2 CPU cores); --quick: a one-minute smoke test. Defaults shown below are for a --task of your own; an
    option you give always wins.
    """
    from st import dist
    from st.pipeline import build_task
    from st.progress import RunPrinter
    from st.report import phase_table, render, summary_lines
    from cli.progress import log_level
    from st.sweep import plan, run_sweep

    quiet = not ctx.find_root().params.get("verbose")  # the table says which runs had finished earlier
    with dist.session(), log_level(logging.WARNING if quiet else None):
        cfg, jobs = plan(ray=ray, **options)
        starting = lambda n: console.print(f"sweep of {cfg.spec.data.task} on {cfg.spec.model.name}: {cfg.seeds} seed(s) x (full model + "  # noqa: E731
                                           f"{len(cfg.grid)} tickets), {n} run(s) at a time -> {out}")
        printer = RunPrinter(console, build_task(cfg.spec.data).main_metric, cfg.run_ratios)
        device = device if ray else dist.pick_device(device)  # a Ray cluster's GPUs are on its nodes, not necessarily here
        doc = run_sweep(cfg, out, jobs=jobs, device=device, ray=ray, keep_weights=keep_weights, on_start=starting, on_result=printer)
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
@task_options()
@train_options
@device_option
@click.option("--from", "sources", multiple=True, callback=pairs_option, help="NAME=MODEL: a pre-trained model, a fine-tuned or a multi-task (`st share`) folder. Repeat. Default: --model.")
@click.option("--fractions", type=NUMBERS, default="0.001,0.01,0.1,1", show_default=True, help="Comma-separated fractions of the training set.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1), help="How many seeds per fraction: --seed, --seed+1, ...")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumes if interrupted).")
def adapt_command(sources, fractions, seeds, out, device, **options):
    """Domain adaptation: fine-tune on a new task with 0.1%, 1%, 10%, 100% of its data (Table 4)."""
    from st import dist
    from st.adapt import run_adapt
    from st.specs import run_spec

    base = run_spec(**options)
    first = base.seed
    result = run_adapt(base, sources or {"pretrained": base.model.name}, fractions, range(first, first + seeds), out,
                       device=dist.pick_device(device))
    console.print(f"{len(result['rows'])} runs -> {Path(out) / 'report.md'}")
    Console().print(Path(out, "report.md").read_text())


@cli.command("task-importance")
@click.option("--scores", "pairs", multiple=True, required=True, callback=pairs_option, help="TASK=scores.json from `st score` (repeat, one per task).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write; the numbers go beside it as .json.")
@overwrite_option
def task_importance_command(pairs, out, overwrite):
    """Importance across tasks (the paper's Figure 6): each task's share per layer, mean head importance."""
    from st.importance import Scores, plot_task_importance
    from st.io import check_output, is_json_with, is_png, write_json

    check_output(out, "a task-importance figure", (".png",), is_png, overwrite)
    check_output(Path(out).with_suffix(".json"), "task-importance numbers", (".json",), is_json_with("layer_head_share"), overwrite)

    scores = {name: Scores.load(path) for name, path in pairs.items()}
    data = plot_task_importance(scores, out)
    write_json(Path(out).with_suffix(".json"), data)
    console.print(f"{len(scores)} tasks -> {out}, {Path(out).with_suffix('.json')}")


def main():
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="st")


if __name__ == "__main__":
    main()
