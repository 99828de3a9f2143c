"""--precision bf16/fp16 computes in that dtype on CPU too, with fp32 master weights, optimizer state,
loss and importance sums; every command takes it and records it; a device that cannot do it is one line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from st.errors import UserError
from st.importance import compute_importance
from st.models import load_checkpoint
from st.models.attention import drop
from st.models.bert import Bert, BertConfig
from st.models.heads import BertClassifier
from st.pipeline import run_finetune
from st.precision import check_precision, compute_copy
from st.specs import TrainConfig
from st.train import Group, TrainingStep, predict_set
from tests.test_train import make_job

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {
        "input_ids": torch.randint(5, 40, (4, 9), generator=g) * mask,
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (4,), generator=g),
    }


def matmul_dtypes(module: torch.nn.Module) -> list:
    """Records the input dtype of every Linear that runs (forward hooks)."""
    seen = []
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, mod.weight.dtype)))
    return seen


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_training_computes_in_the_dtype_and_keeps_fp32_masters(precision, dtype):
    torch.manual_seed(0)
    model = BertClassifier(Bert(CONFIG), 2, 0.1).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
    step = TrainingStep(model, optimizer, TrainConfig(precision=precision), torch.device("cpu"))
    seen = matmul_dtypes(step.compute)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(Group([batch(1), batch(2)], "a step"))
    assert seen and all(pair == (dtype, dtype) for pair in seen)  # every matmul in the compute dtype
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values() if v.dim())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # it trained
    for p, c in zip(model.parameters(), step.compute.parameters()):  # the copy holds the new weights, cast
        assert torch.equal(c, p.to(dtype))


def test_evaluation_and_importance_compute_in_the_dtype():
    from st.data import EncodedSet

    torch.manual_seed(0)
    model = BertClassifier(Bert(CONFIG), 2, 0.1)
    data = EncodedSet([([2, 7, 9, 3], [0, 0, 0, 0]), ([2, 11, 3], [0, 0, 0])], [0, 1], False)
    fp32, bf16 = predict_set(model, data, 0), predict_set(model, data, 0, precision="bf16")
    assert len(bf16) == 2 and all(p in (0, 1) for p in fp32 + bf16)
    copy = compute_copy(model, "bf16")
    seen = matmul_dtypes(copy)
    copy(**{k: v for k, v in batch().items() if k != "labels"})
    assert seen and {d for d, _ in seen} == {torch.bfloat16}
    scores32 = compute_importance(model, [batch(3)])
    scores16 = compute_importance(model, [batch(3)], precision="bf16")
    assert scores16.precision == "bf16" and scores32.precision == "fp32"
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())  # restored, untouched
    # bf16 scores are the fp32 ones up to bf16 rounding: the same ranking of clearly different heads
    a, b = torch.tensor(scores32.head_raw), torch.tensor(scores16.head_raw)
    assert torch.allclose(a, b, rtol=0.1, atol=1e-3 * a.max().item())


def test_cheap_bf16_dropout_drops_p_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(200_000, dtype=torch.bfloat16)
    y = drop(x, 0.1)
    assert y.dtype == torch.bfloat16
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005  # every 16-bit slice of the draws is uniform
    assert abs(y.float().mean().item() - 1.0) < 0.01  # kept values scaled by 1 / (1 - p)
    torch.manual_seed(0)
    assert torch.equal(drop(x, 0.1), y)  # seeded like every other draw


def test_same_seed_same_bf16_run_and_precision_recorded(tiny_bert_dir, sentiment_dir, tmp_path):
    job = make_job(tiny_bert_dir, sentiment_dir, epochs=1, precision="bf16")
    first, second = run_finetune(job, tmp_path / "a"), run_finetune(job, tmp_path / "b")
    assert first["dev"] == second["dev"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "run.json").read_text())["train"]["precision"] == "bf16"
    model, _ = load_checkpoint(tmp_path / "a")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the checkpoint keeps the fp32 masters


def st(*args, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def test_every_command_takes_precision_and_records_it(tiny_bert_dir, sentiment_dir, tmp_path):
    common = ["--task", "csv", "--data-dir", sentiment_dir, "--model", tiny_bert_dir, "--epochs", 1, "--batch-size", 32]
    out = st("finetune", *common, "--precision", "bf16", "--device", "cpu", "--out", tmp_path / "ft")
    assert "(bf16)" in out
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["train"]["precision"] == "bf16"
    # score and eval default to the precision the checkpoint was fine-tuned in, and take another
    assert "in bf16" in st("score", "--checkpoint", tmp_path / "ft", "--out", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["precision"] == "bf16"
    st("score", "--checkpoint", tmp_path / "ft", "--out", tmp_path / "s32.json", "--precision", "fp32")
    assert json.loads((tmp_path / "s32.json").read_text())["precision"] == "fp32"
    assert "accuracy" in st("eval", "--checkpoint", tmp_path / "ft", "--precision", "fp16")
    st(
        "sweep",
        *common,
        "--precision",
        "bf16",
        "--seeds",
        1,
        "--ratios",
        "0.5",
        "--kinds",
        "winning",
        "--out",
        tmp_path / "sw",
    )
    settings = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert settings["job"]["train"]["precision"] == "bf16"
    assert json.loads((tmp_path / "sw" / "seed0" / "scores.json").read_text())["precision"] == "bf16"
    run = json.loads((tmp_path / "sw" / "seed0" / "winning-r0.50" / "run" / "run.json").read_text())
    assert run["train"]["precision"] == "bf16"
    st(
        "share",
        "--tasks",
        "csv",
        "--data-dir",
        f"csv={sentiment_dir}",
        "--model",
        tiny_bert_dir,
        "--no-tickets",
        "--epochs",
        1,
        "--precision",
        "fp16",
        "--out",
        tmp_path / "sh",
    )
    assert json.loads((tmp_path / "sh" / "run.json").read_text())["tasks"]["csv"]["train"]["precision"] == "fp16"
    st("adapt", *common, "--fractions", "0.5", "--precision", "bf16", "--out", tmp_path / "ad")
    found = list((tmp_path / "ad").rglob("run.json"))
    assert found and all(json.loads(p.read_text())["train"]["precision"] == "bf16" for p in found)


def test_a_gpu_without_bf16_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(
        UserError, match=r"^--precision bf16: the GPU Tesla V100 has no bf16 arithmetic; use --precision fp16"
    ):
        check_precision("bf16", "cuda")
    assert check_precision("fp16", "cuda") == torch.float16 and check_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(UserError, match="--precision must be one of fp32, bf16, fp16"):
        check_precision("int8", "cpu")


def test_the_cli_offers_exactly_the_precisions_st_computes_in():
    from cli.app import PRECISIONS
    from st.precision import DTYPES

    assert PRECISIONS == list(DTYPES)
