"""From names to a run: task + tokenizer + model (+ ticket) + data, then the training loop.

`st finetune`, `st eval` and `st sweep` all go through here, so a sweep's runs are exactly the
runs a user would get by hand.
"""

from __future__ import annotations

import logging
import random

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from st import dist
from st.data import EncodedSet, encode_examples, make_batch
from st.errors import UserError
from st.importance import Scores, compute_importance
from st.models import Bert, BertClassifier, load_checkpoint, load_pretrained_parts, resolve_model_dir
from st.prune import export, export_hf, prune_classifier
from st.share import is_multitask_dir, load_task_model
from st.tasks import Example, Task, get_task
from st.tasks.sampling import check_nonempty, subsample
from st.tickets import Ticket
from st.tokenize import Tokenizer, check_vocab, copy_tokenizer
from st.train import TrainConfig, check_run_settings, finetune

log = logging.getLogger("st")

@dataclass(frozen=True)
class Job:
    """Everything that defines one fine-tuning run."""

    task: str
    model: str = "minilm-l6"
    data_dir: str | None = None
    task_options: tuple[tuple[str, str], ...] = ()  # e.g. (("text_columns", "a,b"),) for csv tasks
    train_size: int | None = None
    train_fraction: float | None = None
    max_length: int = 128
    dropout: float = 0.1
    head_dropout: float | None = None  # None: the task's own (MNLI 0.2, CoLA 0.05, else 0.1)
    ticket: str | None = None  # ticket.json: rewind to pre-trained weights and train the subnetwork
    init: str | None = None  # a fine-tuned checkpoint to continue from
    train: TrainConfig = field(default_factory=TrainConfig)
    # Honest model selection (st sweep): a seeded sample of `dev_size` dev examples is split, with the
    # seed, into a selection part (a `select_fraction` of it) that chooses the epoch and a report part
    # evaluated once on the chosen weights. None and None: the epoch is chosen on all of dev, as before.
    dev_size: int | None = None
    select_fraction: float | None = None

    def settings(self) -> dict:
        """What identifies the run's result (the device does not: a run may resume elsewhere)."""
        d = asdict(self)
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("device", "eval_batch_size")}
        d["task_options"] = dict(self.task_options)
        return d


def build_task(job: Job) -> Task:
    return get_task(job.task, data_dir=job.data_dir, **dict(job.task_options))


def model_dir(job: Job) -> Path:
    return Path(job.init) if job.init else resolve_model_dir(job.model)


def build_tokenizer(job: Job) -> Tokenizer:
    return Tokenizer.from_dir(model_dir(job), max_length=job.max_length)


def build_model(job: Job, task: Task) -> BertClassifier:
    """Pre-trained encoder + a task head initialised from the seed, pruned to the ticket if given."""
    if job.init:
        # A multi-task folder gives the task's own head and its ticket's subnetwork ("+ ST fine-tuning").
        model = load_task_model(job.init, task.name) if is_multitask_dir(job.init) else load_checkpoint(job.init)[0]
        if model.num_labels != task.num_labels:  # a new task (domain adaptation): a fresh head
            torch.manual_seed(job.train.seed)
            head = BertClassifier(model.encoder, task.num_labels, _head_dropout(job, task))
            head.pooler.load_state_dict(model.pooler.state_dict())
            model = head
    else:
        # One read of the checkpoint for both the encoder and its pre-trained pooler.
        config, encoder_state, pooler_state, _ = load_pretrained_parts(job.model)
        encoder = Bert(replace(config, hidden_dropout=job.dropout, attention_dropout=job.dropout))
        encoder.load_state_dict(encoder_state)
        torch.manual_seed(job.train.seed)  # the same seed gives the same head, with or without a ticket
        model = BertClassifier(encoder, task.num_labels, _head_dropout(job, task))
        if pooler_state is not None:  # BERT's pre-trained pooler, where the checkpoint has one
            model.pooler.load_state_dict(pooler_state)
    if job.ticket:
        ticket = Ticket.load(job.ticket)
        ticket.check_matches(model.encoder.config)
        model = prune_classifier(model, ticket.head_mask_tensor(), ticket.ffn_mask_tensor())
    return model


def _head_dropout(job: Job, task: Task) -> float:
    return task.head_dropout if job.head_dropout is None else job.head_dropout


def load_split(task: Task, tokenizer: Tokenizer, split: str) -> tuple[list[Example], EncodedSet]:
    examples = check_nonempty(task.load(split), task, split)
    return examples, encode_examples(tokenizer, examples, regression=task.num_labels == 1)


def load_train(job: Job, task: Task, tokenizer: Tokenizer) -> EncodedSet:
    examples = check_nonempty(task.load("train"), task, "train")
    examples = subsample(examples, train_size=job.train_size, train_fraction=job.train_fraction, seed=job.train.seed)
    return encode_examples(tokenizer, examples, regression=task.num_labels == 1)


def run_finetune(job: Job, out: str | Path, on_step=None, on_epoch=None) -> dict:
    """Fine-tune `job` into `out`; a finished run is returned as it is, an interrupted one resumed."""
    out = Path(out)
    finished = check_run_settings(out, job.settings())
    if finished is not None:
        log.info("%s already finished; nothing to do", out)
        return finished
    task = build_task(job)
    tokenizer = build_tokenizer(job)
    model = build_model(job, task)
    check_vocab(tokenizer, model.encoder.config.vocab_size, model_dir(job))
    train = load_train(job, task, tokenizer)
    _, dev = load_split(task, tokenizer, task.dev_splits[0])
    select, report = split_dev(dev, job)
    if dist.is_main():
        copy_tokenizer(model_dir(job), out)
    meta = {"task": task.name, "labels": list(task.labels), "job": job.settings()}
    return finetune(model, train, select, task, job.train, out, tokenizer.pad_id, on_step=on_step, on_epoch=on_epoch,
                    meta=meta, report=report)


def dev_parts(n: int, seed: int, dev_size: int | None = None, select_fraction: float | None = None) -> tuple[list[int], list[int]]:
    """(selection, report) indices into a dev set of `n` examples: a seeded sample of `dev_size` of them
    (all when None or larger), then split with the same seed into `select_fraction` for selection and
    the rest for the report (no report part when `select_fraction` is None). Both lists are sorted."""
    if select_fraction is not None and not 0 < select_fraction < 1:
        raise UserError(f"--select-fraction must be in (0, 1), got {select_fraction}")
    if dev_size is not None and dev_size < 1:
        raise UserError(f"--dev-size must be a positive whole number, got {dev_size}")
    rng = random.Random(seed)
    order = list(range(n))
    if dev_size is not None and dev_size < n:
        order = rng.sample(order, dev_size)
    if select_fraction is None:
        return sorted(order), []
    rng.shuffle(order)
    k = round(select_fraction * len(order))
    if not 0 < k < len(order):
        raise UserError(f"{len(order)} dev examples cannot be split into a selection part of {select_fraction:g} and a "
                        "report part with at least one example each; use a larger --dev-size or another --select-fraction")
    return sorted(order[:k]), sorted(order[k:])


def split_dev(dev: EncodedSet, job: Job) -> tuple[EncodedSet, EncodedSet | None]:
    """The job's selection part of dev (all of it by default) and its report part (None by default)."""
    if job.dev_size is None and job.select_fraction is None:
        return dev, None
    if job.dev_size is not None and job.dev_size > len(dev):
        log.info("--dev-size %d is more than the %d dev examples; using all of them", job.dev_size, len(dev))
    select, report = dev_parts(len(dev), job.train.seed, job.dev_size, job.select_fraction)
    return subset(dev, select), (subset(dev, report) if report else None)


def subset(data: EncodedSet, indices: list[int]) -> EncodedSet:
    labels = None if data.labels is None else [data.labels[i] for i in indices]
    return EncodedSet([data.rows[i] for i in indices], labels, data.regression)


def checkpoint_job(checkpoint: str | Path, **changes) -> tuple[BertClassifier, Job, Task, Tokenizer]:
    """A fine-tuned checkpoint with the job that made it (`changes` override it, e.g. task or
    data_dir), its task and its tokenizer."""
    model, cfg = load_checkpoint(checkpoint)
    job = job_from_settings(cfg["job"], init=str(checkpoint), **{k: v for k, v in changes.items() if v is not None})
    task = build_task(job)
    return model, job, task, Tokenizer.from_dir(checkpoint, max_length=job.max_length)


def job_from_settings(settings: dict, **changes) -> Job:
    fields = {**settings, "task_options": tuple(settings.get("task_options", {}).items())}
    fields["train"] = TrainConfig(**fields["train"])
    return replace(Job(**fields), **changes)


def score_checkpoint(checkpoint: str | Path, *, num_examples: int | None = None, batch_size: int = 32,
                     device: str = "cpu", seed: int = 0) -> Scores:
    """Importance of every head and FFN block of a fine-tuned checkpoint over its training set
    (the examples it was fine-tuned on; `num_examples` samples fewer, with the seed)."""
    model, job, task, tokenizer = checkpoint_job(checkpoint)
    if model.encoder.config.kept_heads is not None or model.encoder.config.ffn_sizes is not None:
        raise UserError(f"{checkpoint} is physically pruned; score the full fine-tuned model")
    train = load_train(job, task, tokenizer)
    order = list(range(len(train)))
    if num_examples is not None and num_examples < len(order):
        order = sorted(random.Random(seed).sample(order, num_examples))
    mine = order[dist.rank() :: dist.world_size()]
    batches = (make_batch(train, mine[i : i + batch_size], tokenizer.pad_id) for i in range(0, len(mine), batch_size))
    return compute_importance(model, batches, device=device)


def export_checkpoint(checkpoint: str | Path, ticket_path: str | Path | None, out: str | Path, hf_out: str | Path | None = None) -> dict:
    """Physically prune a fine-tuned checkpoint (to a ticket, if given) into `out`, and optionally
    a Hugging Face folder; finished exports are never overwritten."""
    for folder in filter(None, (out, hf_out)):
        if (Path(folder) / "config.json").exists():
            raise UserError(f"{folder} already holds an exported model; choose another folder or delete it")
    model, cfg = load_checkpoint(checkpoint)
    masks, meta = {}, {k: v for k, v in cfg.items() if k not in ("format", "encoder", "head")}
    if ticket_path:
        ticket = Ticket.load(ticket_path)
        ticket.check_matches(model.encoder.config)
        masks = {"head_mask": ticket.head_mask_tensor(), "ffn_mask": ticket.ffn_mask_tensor()}
        meta["ticket"] = ticket.to_json()
    copy_tokenizer(checkpoint, out)
    small = export(model, out, **masks, **meta)
    if hf_out:
        export_hf(model, hf_out, id2label=cfg.get("labels") or None, **masks, tokenizer_from=checkpoint)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"parameters": count(small), "percent": 100.0 * count(small) / count(model)}
