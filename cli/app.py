"""The `st` command group and what its commands share: one-line errors instead of tracebacks, the
options every training command takes, and the terminal console. The commands are in `cli.main`
(single runs and models) and `cli.studies` (sweeps, multi-task runs, adaptation).

Only this package reads argv and the environment. User errors (`st.errors.UserError`) become one
line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import logging

import click
from rich.console import Console

from st.errors import UserError

console = Console(stderr=True, soft_wrap=True)  # never break paths across lines


# Commands whose output is a run folder: a stop keeps every finished epoch and run, and the same
# command resumes. Every other command writes its outputs together at its end (`st.io.staged_outputs`).
RESUMABLE = {"finetune", "sweep", "share", "adapt"}
PRECISIONS = ["fp32", "bf16", "fp16"]  # st.precision.DTYPES' keys (importing it here would load torch for --help)


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
            kept = "finished work is kept and resumed" if resumable(ctx) else "no output was left half-written"
            raise click.ClickException(
                f"{e.strerror or e}{where}; fix that and rerun the same command: {kept}"
            ) from None
        except KeyboardInterrupt:
            if resumable(ctx):
                console.print("interrupted: finished runs and epochs are kept; the same command resumes from them")
            else:
                console.print(
                    "interrupted: no output was left half-written (outputs are written together, at the "
                    "end); rerun the same command"
                )
            ctx.exit(130)


def resumable(ctx) -> bool:
    return ctx.invoked_subcommand in RESUMABLE


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


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(),
    default=None,
    help="Task data folder. GLUE/SNLI/SciTail: the official files (the task folder or the GLUE root; default "
    "$GLUE_DIR) or the hub's parquet layout; csv/jsonl: train/dev/test files; hf: a save_to_disk or parquet folder.",
)
dataset_option = click.option(
    "--dataset",
    default=None,
    metavar="HUB_ID[:CONFIG]",
    help="A Hugging Face dataset instead of --data-dir (pip install 'st[datasets]'), from the local cache when "
    "offline: e.g. nyu-mll/glue with --task rte (the config defaults to the task's), or any with --task hf.",
)
TRACKERS = ("tensorboard", "wandb", "mlflow")


def _trackers(ctx, param, values) -> tuple[str, ...]:
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"--log-to {unknown[0]!r} is not one of {', '.join(TRACKERS)}")
    return tuple(dict.fromkeys(names))


log_to_option = click.option(
    "--log-to",
    multiple=True,
    callback=_trackers,
    metavar="TRACKER[,TRACKER]",
    help="Also log every step and epoch to tensorboard, wandb and/or mlflow (repeat or comma-separate; each "
    "pip install 'st[NAME]'): TensorBoard files in the run folder, W&B's and MLflow's usual settings "
    "(WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI; without it an MLflow file store in the run folder).",
)


column_options = _options(
    click.option(
        "--text-columns", default=None, help="csv/jsonl/hf tasks: text column, or two comma-separated for pairs."
    ),
    click.option("--label-column", default=None, help="csv/jsonl/hf tasks: label column."),
    click.option(
        "--labels",
        default=None,
        help="csv/jsonl/hf tasks: comma-separated label set (default: hf's ClassLabel names, else from train).",
    ),
)
# `st eval` and `st score`: the checkpoint's data, recorded when it was fine-tuned, unless these say otherwise
checkpoint_data_options = _options(
    click.option(
        "--data-dir",
        type=click.Path(),
        default=None,
        help="Where the checkpoint's data is now (as for finetune). Default: where it was fine-tuned from; "
        "--dataset and the csv/jsonl/hf column options likewise default to the checkpoint's.",
    ),
    dataset_option,
    column_options,
)


def task_options(required: bool = True):
    """--task and the options that locate and describe its data."""
    task_help = "Task name (see `st tasks`)." + (
        "" if required else " Without it, the main job: rotten_tomatoes on minilm-l6."
    )
    return _options(
        click.option("--task", required=required, help=task_help),
        data_dir_option,
        dataset_option,
        column_options,
        click.option("--regression", is_flag=True, default=None, help="csv/jsonl/hf tasks: a real-valued label."),
        click.option(
            "--max-length",
            type=click.IntRange(8, 512),
            help="Tokens per example. Default: 128, or the model's positions where fewer.",
        ),
    )


train_options = _options(
    click.option("--model", help="Folder, alias (minilm-l6) or cached hub id. Default: minilm-l6."),
    click.option("--epochs", type=click.IntRange(1), help="Default: 3."),
    click.option("--batch-size", type=click.IntRange(1), help="Default: 32."),
    click.option(
        "--lr",
        type=click.FloatRange(min=0, min_open=True),
        help="Default: the paper's 5e-5 for BERT-base and larger, 2e-4 for smaller encoders (hidden < 768).",
    ),
    click.option("--warmup", type=click.FloatRange(0, 1), help="Fraction of steps with linear warm-up. Default: 0.1."),
    click.option("--weight-decay", type=click.FloatRange(0), help="Default: 0.0."),
    click.option("--clip", type=click.FloatRange(min=0, min_open=True), help="Gradient-norm clipping. Default: 1.0."),
    click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), help="Default: 0.1."),
    click.option(
        "--head-dropout",
        type=click.FloatRange(0, 1, max_open=True),
        help="Default: the task's (MNLI 0.2, CoLA 0.05, else 0.1).",
    ),
    click.option("--grad-accum", type=click.IntRange(1), help="Gradient accumulation steps. Default: 1."),
    click.option("--seed", type=click.IntRange(0, 2**32 - 1), help="Default: 0."),
    click.option("--train-size", type=click.IntRange(1), help="Use N training examples, sampled with the seed."),
    click.option("--train-fraction", type=float, help="Use this fraction (0, 1] of the training set."),
    click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        help="Compute precision, on CPU and GPU alike, with fp32 master weights and optimizer state "
        "(fp16 adds a gradient scaler). Default: fp32.",
    ),
    click.option(
        "--report-split",
        help="Also evaluate this labelled split (e.g. test) once, on the weights dev chose; "
        "a sweep then chooses on all of its dev sample.",
    ),
    click.option(
        "--select-fraction",
        type=float,
        help="Part of the dev sample that chooses the epoch (and a sweep's ticket); "
        "the rest is evaluated once on the chosen weights. Default: all of it (a sweep: 0.5).",
    ),
    click.option(
        "--dev-size",
        type=click.IntRange(1),
        help="A seeded sample of N dev examples (default: all; the main job: 400).",
    ),
)
device_option = click.option(
    "--device", default=None, help="cpu or cuda (default: cuda when available; under torchrun, this rank's GPU)."
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output of the same kind.")
precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Compute precision (bf16/fp16 on CPU and GPU alike). Default: the one the checkpoint was fine-tuned in.",
)


def tracking_for(log_to, out):
    """--log-to as the library's `Tracking` of the command writing `out`; each library checked installed first."""
    if not log_to:
        return None
    from pathlib import Path

    from st.tracking import Tracking, check_installed

    check_installed(log_to)
    return Tracking(tuple(log_to), root=str(Path(out).resolve()))
