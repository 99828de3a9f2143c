"""Multi-task training runs the one training step and the one run builder (st.train, st.pipeline), so
it gets what single-task training has: --grad-accum, the fp16 scaler, DDP through the same code, and
--dev-size / --select-fraction with the meaning they have in `st finetune`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from st.models import load_checkpoint
from st.multitask import load_task_model
from st.pipeline import run_finetune
from st.share_run import run_share
from st.specs import DataSpec, HeldOut, ModelSpec, RunSpec, TrainConfig
from st.train import Group, TrainingStep
from tests.conftest import as_torchrun_rank, free_port
from tests.test_share import TA, TB, batch, make_sharer, outside, write_topic_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def jobs(model, sentiment, topic, held_out=None, **train) -> list[RunSpec]:
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 5e-3, **train})
    model_spec = ModelSpec(str(model), dropout=0.0, head_dropout=0.0)
    return [
        RunSpec(DataSpec(task, str(d)), model_spec, cfg, 0, held_out)
        for task, d in (("csv", sentiment), ("jsonl", topic))
    ]


def test_an_accumulated_task_step_is_one_masked_step_over_all_its_batches():
    """Two micro-batches of task a: the mean of their mean losses, one masked update, as one batch of both."""
    from tests.test_share import A

    first, second = batch(1, 2), batch(2, 2)
    both = {k: torch.cat([first[k], second[k]]) for k in first}  # equal sizes: the mean of means is the mean
    updated = []
    for micro in ([first, second], [both]):
        sharer = make_sharer()
        before = {n: p.detach().clone() for n, p in sharer.model.named_parameters()}
        optimizer = torch.optim.Adamax(sharer.model.parameters(), lr=1e-2)
        TrainingStep(sharer.model, optimizer, TrainConfig(grad_accum=len(micro)), torch.device("cpu"))(
            sharer.group("a", micro)
        )
        masks = outside(sharer.model, A, 0)
        for name, p in sharer.model.named_parameters():
            assert torch.equal(p.detach()[masks[name]], before[name][masks[name]]), name
        updated.append(dict(sharer.model.named_parameters()))
    for name, p in updated[0].items():
        torch.testing.assert_close(p, updated[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["a", None])
def test_fp16_skips_a_non_finite_step_instead_of_applying_it(task):
    """The gradient scaler of fp16 sees an inf gradient: the step is skipped (no error, no weight or
    optimizer state moved) and the scale drops; a finite step afterwards goes through."""
    from tests.test_share import stub_task  # noqa: F401  (the sharer's tasks)

    sharer = make_sharer()
    model = sharer.model
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
    step = TrainingStep(model, optimizer, TrainConfig(precision="fp16"), torch.device("cpu"), find_unused=True)
    group = (
        (lambda: sharer.group("a", [batch(3, 2)]))
        if task
        else (lambda: Group([batch(3, 2)], "a step", lambda m, b: m(0, **b)))
    )
    assert next(step.compute.parameters()).dtype == torch.float16  # fp16 compute, fp32 master weights
    weight = step.compute.encoder.layers[0].attention.qkv.weight
    poison = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale = step.scaler.get_scale()
    step(group())
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert not any(optimizer.state.values()) and step.scaler.get_scale() < scale  # no state made, the scale backs off
    poison.remove()
    step(group())
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_grad_accum_makes_fewer_steps_of_one_task_each(tiny_bert_dir, sentiment_dir, tmp_path):
    topic = write_topic_jsonl(tmp_path / "topic")
    steps = []
    result = run_share(
        jobs(tiny_bert_dir, sentiment_dir, topic, grad_accum=3),
        {"csv": TA, "jsonl": TB},
        tmp_path / "m",
        on_step=lambda done, total, loss: steps.append((done, total)),
    )
    # 192/16 = 12 and 128/16 = 8 batches: groups of 3 make 4 and 3 (a short last group) steps per epoch
    assert steps[-1] == (7, 7) and len(steps) == 2 * 7
    assert all(e["batches"] == {"csv": 12, "jsonl": 8} for e in result["epochs"])
    assert json.loads((tmp_path / "m" / "run.json").read_text())["tasks"]["csv"]["train"]["grad_accum"] == 3


def test_dev_size_and_select_fraction_mean_what_they_mean_in_finetune(tiny_bert_dir, sentiment_dir, tmp_path):
    topic = write_topic_jsonl(tmp_path / "topic")
    held = HeldOut(select_fraction=0.5, dev_size=20)
    result = run_share(jobs(tiny_bert_dir, sentiment_dir, topic, held_out=held, epochs=1), None, tmp_path / "m")
    assert result["report_split"] == "dev (report part)" and set(result["report"]) == {"csv", "jsonl"}
    single = run_finetune(jobs(tiny_bert_dir, sentiment_dir, topic, held_out=held, epochs=1)[0], tmp_path / "ft")
    assert (single["dev_examples"], single["report_examples"]) == (10, 10)
    # the same seeded parts of dev: the multi-task model's csv task, scored on them, gives its recorded numbers
    from st.pipeline import build_tokenizer, prepare_inputs, resolve_defaults

    spec = resolve_defaults(jobs(tiny_bert_dir, sentiment_dir, topic, held_out=held)[0])
    model = load_task_model(tmp_path / "m", "csv")
    inputs = prepare_inputs(spec, build_tokenizer(spec), model.encoder.config)
    from st.train import evaluate

    assert len(inputs.select) == 10 and len(inputs.report) == 10
    assert evaluate(model, inputs.select, inputs.task, 0) == result["dev"]["csv"]
    assert evaluate(model, inputs.report, inputs.task, 0) == result["report"]["csv"]
    model_ft, _ = load_checkpoint(tmp_path / "ft")
    assert evaluate(model_ft, inputs.report, inputs.task, 0) == single["report"]


# ---- DDP: two gloo processes train the multi-task model as one does ------------------------------


def _ddp_worker(rank, world, port, specs, out, result_dir):
    import st.dist as dist

    as_torchrun_rank(rank, world, port)
    torch.set_num_threads(1)
    with dist.session():
        result = run_share(specs, {"csv": TA, "jsonl": TB}, out)
        torch.save(
            {"result": result, "weights": load_task_model(out, "csv").state_dict()}, result_dir / f"rank{rank}.pt"
        )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_process_ddp_multitask_matches_one_process(precision, tiny_bert_dir, sentiment_dir, tmp_path):
    """With --grad-accum 2: DDP all-reduces what no_sync accumulated over a group (in bf16, in the
    compute copy, before it reaches the fp32 master gradients)."""
    topic = write_topic_jsonl(tmp_path / "topic")
    specs = jobs(tiny_bert_dir, sentiment_dir, topic, grad_accum=2, precision=precision)
    mp.spawn(_ddp_worker, args=(2, free_port(), specs, tmp_path / "ddp", tmp_path), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, w in saved[0]["weights"].items():  # DDP keeps the replicas bit-identical
        assert torch.equal(w, saved[1]["weights"][name]), name
    assert [e["dev"] for e in saved[0]["result"]["epochs"]] == [e["dev"] for e in saved[1]["result"]["epochs"]]
    single = run_share(specs, {"csv": TA, "jsonl": TB}, tmp_path / "one")
    if precision == "fp32":  # the same steps as one process, up to float summation order: the same predictions
        assert [e["dev"] for e in single["epochs"]] == [e["dev"] for e in saved[0]["result"]["epochs"]]
    # Compare the functions, not the weights: the key bias gets a mathematically zero gradient whose
    # rounding noise Adamax turns into full-size steps (see test_train's DDP test). bf16 rounds more.
    one, ddp = load_task_model(tmp_path / "one", "csv").eval(), load_task_model(tmp_path / "ddp", "csv").eval()
    x = {k: v for k, v in batch(5, 2).items() if k != "labels"}
    x["input_ids"] = x["input_ids"] % 19  # within the tiny model's vocabulary
    tolerance = 1e-4 if precision == "fp32" else 5e-2
    with torch.no_grad():
        torch.testing.assert_close(ddp(**x), one(**x), rtol=tolerance, atol=tolerance)
