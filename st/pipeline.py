"""From specs to a run: task + tokenizer + model (+ ticket) + data, then the training loop.

`st finetune`, `st eval`, `st sweep`, `st share` and `st adapt` all build their runs here, so a
sweep's runs are exactly the runs a user would get by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from st import dist
from st.data import EncodedSet, encode_examples, make_batch
from st.errors import UserError
from st.importance import Scores, compute_importance
from st.io import file_digest
from st.layout import CONFIG, TORCH_WEIGHTS, WEIGHTS
from st.models import Bert, BertClassifier, BertConfig, load_checkpoint, load_pretrained_parts, resolve_model_dir
from st.models.families import build_encoder, config_from_dict
from st.models.weights import config_from_hf, read_config
from st.multitask import FORMAT as MULTITASK_FORMAT
from st.multitask import MultiTask
from st.prune import prune_classifier
from st.runs import RunFolder
from st.specs import DEFAULT_MAX_LENGTH, DataSpec, ModelSpec, RunSpec
from st.tasks import Example, Task, get_task
from st.tasks.sampling import check_nonempty, subsample
from st.tickets import Ticket, make_ticket, tickets_for_tasks
from st.tokenize import TOKENIZER_FILES, Tokenizer, check_vocab, copy_tokenizer
from st.tracking import Tracking
from st.train import OnEpoch, OnStep, finetune

log = logging.getLogger("st")


def default_lr(hidden_size: int) -> float:
    """The paper's 5e-5 was tuned for BERT-base and -large. Small encoders need a larger rate to
    move in the same few hundred steps: measured on rotten_tomatoes with all-MiniLM-L6-v2
    (hidden 384), 1,000 examples × 2 epochs reach dev accuracy 0.51 at 5e-5 and 0.76 at 2e-4."""
    return 5e-5 if hidden_size >= 768 else 2e-4


def resolve_defaults(spec: RunSpec) -> RunSpec:
    """`spec` with what depends on the model filled in and recorded, so that run.json says what the
    run used: the model (the --init folder when given), the fingerprints of its weights and of the
    files that define it besides them (config.json, the tokenizer's), the learning rate
    by the encoder's size, and --max-length 128, or the model's positions where it has fewer."""
    folder = model_dir(spec)
    config = pretrained_config(folder)
    lr = spec.train.lr or default_lr(config.hidden_size)
    max_length = spec.data.max_length or min(DEFAULT_MAX_LENGTH, config.max_tokens)
    model = replace(
        spec.model, name=spec.model.init or spec.model.name, weights=weights_digest(folder), files=files_digest(folder)
    )
    return replace(spec, model=model, train=replace(spec.train, lr=lr), data=replace(spec.data, max_length=max_length))


def pretrained_config(folder: Path) -> BertConfig:
    """The encoder config of a model folder, checked, without reading its weights. Our checkpoints
    (single- and multi-task) nest it under "encoder"; a Hugging Face config is converted."""
    raw = read_config(folder)
    return config_from_dict(raw["encoder"]) if "encoder" in raw else config_from_hf(raw, folder)


def files_digest(folder: Path) -> str:
    """The model's definition besides its weights, by content: one sha256 over config.json and each
    tokenizer file there is (an edited config or vocabulary is another run)."""
    names = [name for name in (CONFIG, *TOKENIZER_FILES) if (folder / name).is_file()]
    return hashlib.sha256(json.dumps({name: file_digest(folder / name) for name in names}).encode()).hexdigest()


def weights_digest(folder: Path) -> str:
    """A run's model by content: the sha256 of its weights file (swapped weights are another run)."""
    path = next((folder / n for n in (WEIGHTS, TORCH_WEIGHTS) if (folder / n).is_file()), None)
    if path is None:
        raise UserError(f"{folder} has neither {WEIGHTS} nor {TORCH_WEIGHTS}")
    return file_digest(path)


def build_task(data: DataSpec) -> Task:
    return get_task(data.task, data_dir=data.data_dir, **dict(data.task_options))


def model_dir(spec: RunSpec) -> Path:
    return Path(spec.model.init) if spec.model.init else resolve_model_dir(spec.model.name)


def build_tokenizer(spec: RunSpec) -> Tokenizer:
    max_length = spec.data.max_length or resolve_defaults(spec).data.max_length  # a resolved spec has it already
    return Tokenizer.from_dir(model_dir(spec), max_length=max_length)


def pretrained_encoder(model: ModelSpec) -> tuple[Bert, dict | None]:
    """The pre-trained encoder with the run's dropout, and its pooler's weights where the checkpoint
    has them; the checkpoint is read once for both."""
    config, encoder_state, pooler_state, _ = load_pretrained_parts(model.name)
    encoder = build_encoder(config.with_dropout(model.dropout))
    encoder.load_state_dict(encoder_state)
    return encoder, pooler_state


def check_fits(spec: RunSpec, tokenizer: Tokenizer, config: BertConfig) -> None:
    """Refuse up front what would fail mid-run: token ids beyond the model's embeddings, or a
    --max-length beyond its position table."""
    where, positions = model_dir(spec), config.max_tokens
    check_vocab(tokenizer, config.vocab_size, where)
    if spec.data.max_length > positions:
        raise UserError(
            f"--max-length {spec.data.max_length} is more than the {positions} positions of the model in {where}; "
            f"pass --max-length {positions} or less"
        )


def head_dropout(model: ModelSpec, task: Task) -> float:
    return task.head_dropout if model.head_dropout is None else model.head_dropout


def build_model(spec: RunSpec, task: Task) -> BertClassifier:
    """Pre-trained encoder + a task head initialised from the seed, pruned to the ticket if given."""
    m = spec.model
    init = read_config(Path(m.init)) if m.init else None  # read once: which kind of folder, and its model
    shared = MultiTask.load(m.init, config=init) if init and init.get("format") == MULTITASK_FORMAT else None
    if shared is None and init is None:
        encoder, pooler_state = pretrained_encoder(m)
    elif shared is not None and task.name not in shared.names:
        # a task the multi-task model never saw (domain adaptation): its shared encoder
        encoder, pooler_state = shared.model.encoder, shared.model.pooler.state_dict()
    else:
        # A multi-task folder gives the task's own head and its ticket's subnetwork ("+ ST fine-tuning").
        model = shared.task_model(task.name) if shared is not None else load_checkpoint(m.init, config=init)[0]
        if model.num_labels == task.num_labels:
            model.encoder = with_dropout(model.encoder, m.dropout)
            model.classifier.dropout.p = head_dropout(m, task)
            return prune_to_ticket(model, m.ticket)
        encoder, pooler_state = model.encoder, model.pooler.state_dict()  # a new task (domain adaptation): a fresh head
    encoder = with_dropout(encoder, m.dropout)
    torch.manual_seed(spec.seed)  # the same seed gives the same head, with or without a ticket
    model = BertClassifier(encoder, task.num_labels, head_dropout(m, task))
    if pooler_state is not None:  # BERT's pre-trained pooler, where the checkpoint has one
        model.pooler.load_state_dict(pooler_state)
    return prune_to_ticket(model, m.ticket)


def with_dropout(encoder: Bert, p: float) -> Bert:
    """`encoder` with every dropout at `p`: an st folder's (--init, adapt --from) has its maker's dropouts."""
    config = encoder.config.with_dropout(p)
    if config == encoder.config:
        return encoder
    rebuilt = build_encoder(config)
    rebuilt.load_state_dict(encoder.state_dict())
    return rebuilt


def prune_to_ticket(model: BertClassifier, ticket: Ticket | None) -> BertClassifier:
    if ticket is None:
        return model
    ticket.check_matches(model.encoder.config)
    return prune_classifier(model, ticket.head_mask_tensor(), ticket.ffn_mask_tensor())


def load_split(task: Task, tokenizer: Tokenizer, split: str) -> tuple[list[Example], EncodedSet]:
    examples = check_nonempty(task.load(split), task, split)
    return examples, encode_examples(tokenizer, examples, regression=task.num_labels == 1)


def load_labelled(task: Task, tokenizer: Tokenizer, split: str) -> EncodedSet:
    """A split to report on (--report-split): it must have labels."""
    data = load_split(task, tokenizer, split)[1]
    if data.labels is None:
        raise UserError(
            f"the {split} split of task {task.name} has no labels to report on; "
            f"drop --report-split or name a labelled split ({', '.join(task.dev_splits)})"
        )
    return data


def load_train(spec: RunSpec, task: Task, tokenizer: Tokenizer) -> EncodedSet:
    examples = check_nonempty(task.load("train"), task, "train")
    examples = subsample(
        examples, train_size=spec.data.train_size, train_fraction=spec.data.train_fraction, seed=spec.seed
    )
    return encode_examples(tokenizer, examples, regression=task.num_labels == 1)


@dataclass(frozen=True)
class RunInputs:
    """A run's task and data: the training sample, the held-out set that chooses the epoch and the
    one evaluated once on the chosen weights (None: no report)."""

    task: Task
    train: EncodedSet
    select: EncodedSet
    report: EncodedSet | None


def prepare_inputs(spec: RunSpec, tokenizer: Tokenizer, config: BertConfig, task: Task | None = None) -> RunInputs:
    """The task and data of (resolved) `spec` for a model of `config` read by `tokenizer`, checked
    before anything is written. Every run builds its data here: finetune, sweep, share and adapt."""
    task = task or build_task(spec.data)
    check_fits(spec, tokenizer, config)
    return RunInputs(task, load_train(spec, task, tokenizer), *held_out_sets(spec, task, tokenizer))


def prepare_run(spec: RunSpec) -> tuple[Tokenizer, BertClassifier, RunInputs]:
    """Everything a single-task run of (resolved) `spec` needs: its tokenizer, its model (`build_model`)
    and its inputs (`prepare_inputs`); a sweep calls it to check its input."""
    task, tokenizer = build_task(spec.data), build_tokenizer(spec)
    model = build_model(spec, task)
    return tokenizer, model, prepare_inputs(spec, tokenizer, model.encoder.config, task)


def run_finetune(
    spec: RunSpec,
    out: str | Path,
    *,
    device: str = "cpu",
    on_step: OnStep | None = None,
    on_epoch: OnEpoch | None = None,
    tracking: Tracking | None = None,
) -> dict:
    """Fine-tune `spec` into `out`; a finished run is returned as it is, an interrupted one resumed.
    `tracking`: where its steps and epochs are logged too (`st.tracking`)."""
    spec = resolve_defaults(spec)
    run = RunFolder(out)
    finished = run.check(spec.settings())
    if finished is not None:
        return finished
    tokenizer, model, inputs = prepare_run(spec)
    run.claim(spec.settings())  # every input checked: only now does the folder become this run's
    if dist.is_main():
        copy_tokenizer(model_dir(spec), out)
    task = inputs.task
    meta = {"task": task.name, "labels": list(task.labels), "job": spec.settings()}
    return finetune(
        model,
        inputs.train,
        inputs.select,
        task,
        spec.train,
        run,
        tokenizer.pad_id,
        seed=spec.seed,
        device=device,
        on_step=on_step,
        on_epoch=on_epoch,
        meta=meta,
        report=inputs.report,
        tracking=tracking,
    )


def dev_parts(
    n: int, seed: int, dev_size: int | None = None, select_fraction: float | None = None
) -> tuple[list[int], list[int]]:
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
        raise UserError(
            f"{len(order)} dev examples cannot be split into a selection part of {select_fraction:g} and a "
            "report part with at least one example each; use a larger --dev-size or another --select-fraction"
        )
    return sorted(order[:k]), sorted(order[k:])


def held_out_sets(spec: RunSpec, task: Task, tokenizer: Tokenizer) -> tuple[EncodedSet, EncodedSet | None]:
    """The set that chooses the run's epoch (all of dev by default) and the one evaluated once on the
    chosen weights (None by default): two seeded parts of dev, or dev and a labelled `report_split`."""
    _, dev = load_split(task, tokenizer, task.dev_splits[0])
    held = spec.held_out
    if held is None:
        return dev, None
    if held.dev_size is not None and held.dev_size > len(dev):
        log.info("--dev-size %d is more than the %d dev examples; using all of them", held.dev_size, len(dev))
    select, report = dev_parts(len(dev), spec.seed, held.dev_size, None if held.report_split else held.select_fraction)
    if held.report_split:
        return subset(dev, select), load_labelled(task, tokenizer, held.report_split)
    return subset(dev, select), (subset(dev, report) if report else None)


def subset(data: EncodedSet, indices: list[int]) -> EncodedSet:
    labels = None if data.labels is None else [data.labels[i] for i in indices]
    return EncodedSet([data.rows[i] for i in indices], labels, data.regression)


def checkpoint_spec(
    checkpoint: str | Path,
    task: str | None = None,
    data_dir: str | None = None,
    dataset: str | None = None,
    options: dict | None = None,
) -> tuple[BertClassifier, RunSpec, Task, Tokenizer]:
    """A fine-tuned checkpoint with the spec that made it (another `task`, `data_dir` or Hugging Face
    `dataset` if given: either replaces where the data was; both are refused by the task), its task and
    its tokenizer. `options`: csv/jsonl/hf task options (text_columns, ...) replacing the recorded ones.
    A task whose outputs differ from the checkpoint's (their number, or the labels' order) is refused."""
    model, cfg = load_checkpoint(checkpoint)
    try:
        spec = RunSpec.from_settings(cfg["job"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a hand-edited config.json
        raise UserError(
            f'{checkpoint}/config.json has a broken "job" entry ({type(e).__name__}: {e}); '
            "restore it from the run's run.json"
        ) from None
    data = replace(spec.data, **{k: v for k, v in (("task", task), ("data_dir", data_dir)) if v is not None})
    recorded = dict(data.task_options)
    if data_dir is not None or dataset is not None:
        recorded = {k: v for k, v in recorded.items() if k != "dataset"} | ({"dataset": dataset} if dataset else {})
        data = replace(data, data_dir=None if dataset and data_dir is None else data.data_dir)
    passed = {k: v for k, v in (options or {}).items() if v is not None}
    data = replace(data, task_options=tuple((recorded | passed).items()))
    spec = replace(spec, data=data, model=replace(spec.model, init=str(checkpoint)))
    task = build_task(spec.data)
    if model.num_labels != task.num_labels:
        raise UserError(
            f"{checkpoint} has {model.num_labels} outputs but task {task.name} needs {task.num_labels}; pass "
            "the task it was fine-tuned on"
        )
    trained = cfg.get("labels") or []
    if trained and list(task.labels) and list(trained) != list(task.labels):  # output i must mean the same label
        raise UserError(
            f"{checkpoint} was trained with labels {trained} but task {task.name} has {list(task.labels)}; "
            "pass --labels in the checkpoint's order, or the task it was fine-tuned on"
        )
    return model, spec, task, Tokenizer.from_dir(checkpoint, max_length=spec.data.max_length)


def score_checkpoint(
    checkpoint: str | Path,
    *,
    num_examples: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    seed: int = 0,
    precision: str | None = None,
    data_dir: str | None = None,
    dataset: str | None = None,
    options: dict | None = None,
) -> Scores:
    """Importance of every head and FFN block of a fine-tuned checkpoint over its training set
    (the examples it was fine-tuned on; `num_examples` samples fewer, with the seed), computed in
    `precision` (None: the one it was fine-tuned in). `data_dir`, `dataset`, `options`: where that
    data is now and how to read it, when not where it was (`checkpoint_spec`)."""
    model, spec, task, tokenizer = checkpoint_spec(checkpoint, None, data_dir, dataset, options)
    if model.encoder.config.kept_heads is not None or model.encoder.config.ffn_sizes is not None:
        raise UserError(f"{checkpoint} is physically pruned; score the full fine-tuned model")
    train = load_train(spec, task, tokenizer)
    order = list(range(len(train)))
    if num_examples is not None and num_examples < len(order):
        order = sorted(random.Random(seed).sample(order, num_examples))
    mine = order[dist.rank() :: dist.world_size()]
    batches = (make_batch(train, mine[i : i + batch_size], tokenizer.pad_id) for i in range(0, len(mine), batch_size))
    return compute_importance(model, batches, device=device, precision=precision or spec.train.precision)


def ticket_from_scores(
    scores_path: Path,
    ratio: float,
    kind: str = "winning",
    seed: int = 0,
    *,
    checkpoint: str | Path | None = None,
    model: str | None = None,
) -> Ticket:
    """`st prune`: the ticket at `ratio` from a scores file, checked against (and with the weights
    remaining counted on) the scored checkpoint or a pre-trained model, when one is given."""
    config, num_labels = None, 2
    if checkpoint:
        classifier, _ = load_checkpoint(checkpoint)
        config, num_labels = classifier.encoder.config, classifier.num_labels
    elif model:
        config = load_pretrained_parts(model)[0]
    return make_ticket(Scores.load(scores_path), ratio, kind, seed, config=config, num_labels=num_labels)


def share_tickets(
    paths: dict[str, str], model: str | None, ratios: dict[str, float] | None = None
) -> dict[str, Ticket]:
    """`st share --tickets`: each task's ticket from its file or folder (or, with `ratios`, made from
    its scores), checked against the pre-trained `model` (None: the default model)."""
    config = load_pretrained_parts(model or ModelSpec.name)[0]
    return tickets_for_tasks({name: Path(p) for name, p in paths.items()}, config, ratios)
