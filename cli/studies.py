"""The `st` commands of the paper's studies: the phase-transition sweep and its report, multi-task
learning with ticket sharing, domain adaptation and task importance. Each turns options into one
library call.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
from rich.console import Console

from cli.app import (
    cli,
    console,
    device_option,
    log_to_option,
    overwrite_option,
    task_options,
    tracking_for,
    train_options,
)
from cli.params import (
    NAMES,
    NUMBERS,
    TaskNames,
    for_tasks,
    only_listed,
    pairs_option,
    ratios_for_tasks,
    sizes_for_tasks,
)
from st.errors import UserError


@cli.command("share")
@click.option(
    "--tasks",
    "names",
    required=True,
    type=TaskNames(),
    help="Comma-separated task names, or glue for the nine GLUE tasks.",
)
@click.option(
    "--data-dir",
    "data_dirs",
    multiple=True,
    callback=pairs_option,
    help="TASK=DIR, for each task that needs one (GLUE: $GLUE_DIR/<Task> by default, or the hub's parquet layout).",
)
@click.option(
    "--dataset",
    "hub_datasets",
    multiple=True,
    callback=pairs_option,
    metavar="TASK=HUB_ID[:CONFIG]",
    help="A Hugging Face dataset for that task instead of --data-dir, e.g. rte=nyu-mll/glue (repeat).",
)
@click.option(
    "--tickets",
    multiple=True,
    help="Per task (repeat, or separate with commas): TASK=PATH, or paths in --tasks order. "
    "A ticket.json / super_ticket.json, or an `st sweep` folder (with --ratios: scores.json, or a folder holding it).",
)
@click.option(
    "--ratios",
    type=NUMBERS,
    default=None,
    help="Comma-separated: make winning tickets at these ratios (one for all, or one per task) "
    "from the --tickets scores.",
)
@click.option("--no-tickets", is_flag=True, help="Plain MT-DNN: every task uses and updates every weight.")
@click.option(
    "--train-sizes",
    multiple=True,
    callback=pairs_option,
    help="TASK=N: that task's training sample (repeat); others take --train-size.",
)
@click.option(
    "--max-length",
    type=click.IntRange(8, 512),
    help="Tokens per example. Default: 128, or the model's positions where fewer.",
)
@train_options
@device_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumes if interrupted).")
@log_to_option
def share_command(
    names, data_dirs, hub_datasets, tickets, ratios, no_tickets, train_sizes, out, device, log_to, **options
):
    """Multi-task training with ticket sharing (Algorithm 1), or plain MT-DNN with --no-tickets."""
    from cli.progress import training_progress
    from st import dist
    from st.pipeline import share_tickets
    from st.report_mtl import multitask_table
    from st.share_run import run_share
    from st.specs import run_spec

    if no_tickets == bool(tickets) or (no_tickets and ratios):
        raise UserError("pass --tickets (one per task, optionally with --ratios) or --no-tickets, not both or neither")
    data_dirs, sizes = only_listed(names, data_dirs, "--data-dir"), sizes_for_tasks(names, train_sizes)
    hub, tracking = only_listed(names, hub_datasets, "--dataset"), tracking_for(log_to, out)
    with dist.session():
        size = options.pop("train_size")  # for the tasks --train-sizes leaves out
        where = {n: dict(data_dir=data_dirs.get(n), dataset=hub.get(n), train_size=sizes.get(n, size)) for n in names}
        specs = [run_spec(task=n, **where[n], **options) for n in names]
        chosen = None
        if not no_tickets:
            ratios = ratios and ratios_for_tasks(names, ratios)
            chosen = share_tickets(for_tasks(names, tickets, "--tickets"), options["model"], ratios)
        device = dist.pick_device(device)
        with training_progress(enabled=dist.is_main()) as (on_step, on_epoch):
            result = run_share(specs, chosen, out, device=device, on_step=on_step, on_epoch=on_epoch, tracking=tracking)
        if dist.is_main():
            Console().print(multitask_table(result))
            precision = specs[0].train.precision
            console.print(f"average dev {result['average']:.4f} ({precision}), report -> {Path(out) / 'report.md'}")


# ---- sweep and report -------------------------------------------------------------------------


@cli.command("sweep")
@task_options(required=False)
@train_options
@device_option
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Sweep folder; the same command again resumes it."
)
@click.option("--ratios", type=NUMBERS, help="Comma-separated pruning ratios in [0, 1)  [default: 0.1,0.2,...,0.8]")
@click.option("--kinds", type=NAMES, help="Comma-separated ticket kinds. Default: winning,random,losing.")
@click.option(
    "--control-ratios",
    type=NUMBERS,
    help="Ratios of the random and losing tickets, the controls (a few save time). Default: --ratios.",
)
@click.option("--seeds", type=int, help="How many seeds: --seed, --seed+1, ...  [default: 3]")
@click.option(
    "--score-examples",
    type=click.IntRange(1),
    help="Importance over a seeded sample of N training examples (default: all).",
)
@click.option(
    "--jobs", type=int, help="Runs at once: processes on CPU, at most one per GPU (default 1; the main job: 2)."
)
@click.option(
    "--ray",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Every run a Ray task (pip install 'st[ray]'): alone, a local Ray instance; auto, the cluster this node "
    "is in; HOST:PORT, that cluster's head. One CPU or one GPU per run; --out must be on storage every node sees.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A one-minute smoke test (claims no super ticket): 1 seed, ratios 0.3,0.6, all three kinds, "
    "192 examples, 2 epochs.",
)
@click.pass_context
@click.option(
    "--min-speedup",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Also choose a deploy ticket: the most accurate one whose measured speed-up is at least this "
    "(deploy_ticket.json).",
)
@click.option(
    "--keep-weights",
    type=click.Choice(["best", "all", "none"]),
    default="best",
    show_default=True,
    help="Whose weights stay once the sweep is done: the full model's and the super ticket's, every run's, or none.",
)
@log_to_option
def sweep_command(ctx, out, device, ray, keep_weights, min_speedup, log_to, **options):
    """Phase transition: the full model and winning/random/losing tickets at every ratio and seed; the super ticket.

    Without --task: the main job, rotten_tomatoes on minilm-l6 with 512 training examples, 2 epochs,
    batch 16, lr 2e-4, max length 64, 400 dev examples, winning tickets at 0.1 ... 0.5, random and losing
    at 0.1,0.3,0.5, 2 processes (about 13 minutes on 2 CPU cores); --quick: a one-minute smoke test.
    Defaults shown below are for a --task of your own; an option you give always wins.
    """
    from cli.progress import log_level
    from st import dist
    from st.sweep import check_finished, run_sweep
    from st.sweep_config import plan

    quiet = not ctx.find_root().params.get("verbose")  # the table says which runs had finished earlier
    with dist.session(), log_level(logging.WARNING if quiet else None):
        cfg, jobs = plan(ray=ray, **options)
        printer, started = _progress_lines(cfg, out)
        device = device if ray else dist.pick_device(device)  # a Ray cluster's GPUs are on its nodes, not here
        doc = run_sweep(
            cfg,
            out,
            jobs=jobs,
            device=device,
            ray=ray,
            keep_weights=keep_weights,
            on_result=printer,
            on_start=started,
            measure_speed=True,
            min_speedup=min_speedup,
            tracking=tracking_for(log_to, out),
        )
        if dist.is_main():
            show_report(out, min_speedup)
            check_finished(doc)


def _progress_lines(cfg, out):
    """What `st sweep` prints: one line once its input is checked (`on_start`), one per finished run."""
    from st.pipeline import build_task
    from st.progress import RunPrinter

    grid = f"{cfg.seeds} seed(s) x (full model + {len(cfg.grid)} tickets)"
    what = f"sweep of {cfg.spec.data.task} on {cfg.spec.model.name} in {cfg.spec.train.precision}: {grid}"
    printer = RunPrinter(console, build_task(cfg.spec.data).main_metric, cfg.run_ratios)
    return printer, lambda n: console.print(f"{what}, {n} run(s) at a time -> {out}")


@cli.command("report")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option(
    "--measure-speed",
    is_flag=True,
    help="Measure each winning ticket's inference speed-up on this machine first (about a minute for 8 tickets of "
    "MiniLM-L6; loads torch).",
)
@click.option(
    "--min-speedup",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Also choose a deploy ticket: the most accurate one whose measured speed-up is at least this "
    "(deploy_ticket.json).",
)
def report_command(folder, measure_speed, min_speedup):
    """Re-render a sweep's report.md, phase.png and super_ticket.json from its results.json."""
    if measure_speed:
        from st.speed import measure_sweep  # torch: only when asked, rendering stays torch-free

        speed = measure_sweep(folder)["speed"]
        console.print(f"speed-ups measured in {speed['runtime']} on {speed['cpu']}")
    show_report(folder, min_speedup)


def show_report(folder, min_speedup: float | None = None) -> None:
    """Render a sweep's report files from its results.json; print its table and what it concludes."""
    from st.report import load_results, phase_table, render_all, summary_lines
    from st.report_speed import deploy_lines

    selection, deploy = render_all(folder, min_speedup)
    Console().print(phase_table(load_results(folder), selection))
    for line in summary_lines(selection) + (deploy_lines(deploy) if deploy else []):
        console.print(line)
    written = "super_ticket.json" + (", deploy_ticket.json" if deploy else "")
    console.print(f"-> {Path(folder) / 'report.md'}, phase.png, {written}, results.json")


@cli.command("adapt")
@task_options()
@train_options
@device_option
@click.option(
    "--from",
    "sources",
    multiple=True,
    callback=pairs_option,
    help="NAME=MODEL: a pre-trained model, a fine-tuned or a multi-task (`st share`) folder. Repeat. Default: --model.",
)
@click.option(
    "--fractions",
    type=NUMBERS,
    default="0.001,0.01,0.1,1",
    show_default=True,
    help="Comma-separated fractions of the training set.",
)
@click.option(
    "--seeds",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="How many seeds per fraction: --seed, --seed+1, ...",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumes if interrupted).")
@log_to_option
def adapt_command(sources, fractions, seeds, out, device, log_to, **options):
    """Domain adaptation: fine-tune on a new task with 0.1%, 1%, 10%, 100% of its data (Table 4)."""
    from st import dist
    from st.adapt import run_adapt
    from st.specs import run_spec

    base = run_spec(**options)
    first = base.seed
    result = run_adapt(
        base,
        sources or {"pretrained": base.model.name},
        fractions,
        range(first, first + seeds),
        out,
        device=dist.pick_device(device),
        tracking=tracking_for(log_to, out),
    )
    console.print(f"{len(result['rows'])} runs -> {Path(out) / 'report.md'}")
    Console().print(Path(out, "report.md").read_text())


@cli.command("task-importance")
@click.option(
    "--scores",
    "pairs",
    multiple=True,
    required=True,
    callback=pairs_option,
    help="TASK=scores.json from `st score` (repeat, one per task).",
)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="PNG to write; the numbers go beside it as .json."
)
@overwrite_option
def task_importance_command(pairs, out, overwrite):
    """Importance across tasks (the paper's Figure 6): each task's share per layer, mean head importance."""
    from st.importance import Scores, plot_task_importance
    from st.io import check_output, is_json_with, is_png, staged_outputs, write_json

    check_output(out, "a task-importance figure", (".png",), is_png, overwrite)
    check_output(
        Path(out).with_suffix(".json"),
        "task-importance numbers",
        (".json",),
        is_json_with("layer_head_share"),
        overwrite,
    )

    scores = {name: Scores.load(path) for name, path in pairs.items()}
    with staged_outputs([Path(out), Path(out).with_suffix(".json")]) as (png_path, json_path):
        write_json(json_path, plot_task_importance(scores, png_path))
    console.print(f"{len(scores)} tasks -> {out}, {Path(out).with_suffix('.json')}")
