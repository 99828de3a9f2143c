"""Fine-tuning: learning, determinism, resume, guarded output folders, DDP equivalence."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from st.errors import UserError
from st.models import load_checkpoint
from st.pipeline import build_task, build_tokenizer, load_split, run_finetune
from st.runs import PROGRESS, RunFolder
from st.specs import DataSpec, ModelSpec, RunSpec, TrainConfig
from st.train import evaluate
from tests.conftest import Interrupt, as_torchrun_rank, free_port, stop_at_epoch


def make_job(model_dir, data_dir, seed: int = 0, **train) -> RunSpec:
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 8, "lr": 5e-3, **train})
    return RunSpec(DataSpec("csv", str(data_dir)), ModelSpec(str(model_dir), dropout=0.0, head_dropout=0.0), cfg, seed)


def test_finetune_learns_and_writes_outputs(tiny_bert_dir, sentiment_dir, tmp_path):
    out = tmp_path / "run"
    result = run_finetune(make_job(tiny_bert_dir, sentiment_dir), out)
    assert result["dev"]["accuracy"] >= 0.8  # the label is one word: a tiny BERT learns it
    assert result["main_metric"] == "accuracy" and len(result["epochs"]) == 3
    assert result["dev"] == max((e["dev"] for e in result["epochs"]), key=lambda m: m["accuracy"])
    for name in ("model.safetensors", "config.json", "metrics.json", "run.json", "vocab.txt"):
        assert (out / name).exists(), name
    assert not (out / PROGRESS).exists()
    model, cfg = load_checkpoint(out)
    assert cfg["task"] == "csv" and cfg["labels"] == ["neg", "pos"] and cfg["job"]["train"]["lr"] == 5e-3
    # the saved weights are the selected epoch's: evaluating them reproduces the reported metrics
    job = make_job(tiny_bert_dir, sentiment_dir)
    task, tokenizer = build_task(job.data), build_tokenizer(job)
    _, dev = load_split(task, tokenizer, "dev")
    assert evaluate(model, dev, task, tokenizer.pad_id) == result["dev"]


def test_same_seed_same_metrics_other_seed_differs(tiny_bert_dir, sentiment_dir, tmp_path):
    job = make_job(tiny_bert_dir, sentiment_dir, epochs=1, lr=5e-4)
    a = run_finetune(job, tmp_path / "a")
    b = run_finetune(job, tmp_path / "b")
    run_finetune(replace(job, seed=1), tmp_path / "c")
    assert a["epochs"][0]["dev"] == b["epochs"][0]["dev"]
    wa, _ = load_checkpoint(tmp_path / "a")
    wb, _ = load_checkpoint(tmp_path / "b")
    wc, _ = load_checkpoint(tmp_path / "c")
    assert all(torch.equal(x, y) for x, y in zip(wa.state_dict().values(), wb.state_dict().values()))
    assert not torch.equal(wa.classifier.out.weight, wc.classifier.out.weight)


def test_interrupted_run_resumes_to_the_same_result(tiny_bert_dir, sentiment_dir, tmp_path):
    job = make_job(tiny_bert_dir, sentiment_dir)
    straight = run_finetune(job, tmp_path / "straight")

    crash_after_first_epoch = stop_at_epoch(2)

    with pytest.raises(Interrupt):
        run_finetune(job, tmp_path / "resumed", on_epoch=crash_after_first_epoch)
    assert (tmp_path / "resumed" / PROGRESS / "state.pt").exists()
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = run_finetune(job, tmp_path / "resumed")
    assert [e["dev"] for e in resumed["epochs"]] == [e["dev"] for e in straight["epochs"]]


def test_finished_run_is_never_overwritten(tiny_bert_dir, sentiment_dir, tmp_path):
    job = make_job(tiny_bert_dir, sentiment_dir, epochs=1)
    out = tmp_path / "run"
    first = run_finetune(job, out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run_finetune(job, out) == first
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"train.lr=0\.005, not 0\.001"):
        run_finetune(replace(job, train=replace(job.train, lr=1e-3)), out)


def test_output_folder_with_other_files_is_refused(tiny_bert_dir, sentiment_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        run_finetune(make_job(tiny_bert_dir, sentiment_dir), tmp_path)


def test_ticket_finetune_trains_a_physically_pruned_model(tiny_bert_dir, sentiment_dir, tmp_path):
    from st.importance import Scores
    from st.models import load_pretrained
    from st.tickets import make_ticket

    config = load_pretrained(tiny_bert_dir).config
    L, H = config.num_layers, config.num_heads
    torch.manual_seed(0)
    scores = Scores(torch.rand(L, H).tolist(), torch.rand(L).tolist(), num_examples=1)
    ticket = make_ticket(scores, 0.5, "winning", config=config)
    job = make_job(tiny_bert_dir, sentiment_dir, epochs=1)
    job = replace(job, model=replace(job.model, ticket=ticket))
    run_finetune(job, tmp_path / "run")
    model, _ = load_checkpoint(tmp_path / "run")
    kept = [len(h) for h in model.encoder.config.kept_heads]
    assert sum(kept) == L * H - round(0.5 * L * H)
    assert sum(layer.ffn is None for layer in model.encoder.layers) == round(0.5 * L)


# ---- DDP: two gloo processes behave as one -----------------------------------------------------


def _ddp_worker(rank, world, port, job, out, result_dir):
    import st.dist as dist
    from st.pipeline import build_model, load_train
    from st.train import finetune

    as_torchrun_rank(rank, world, port)
    torch.set_num_threads(1)
    with dist.session():
        task, tokenizer = build_task(job.data), build_tokenizer(job)
        model = build_model(job, task)
        _, dev = load_split(task, tokenizer, "dev")
        result = finetune(
            model,
            load_train(job, task, tokenizer),
            dev,
            task,
            job.train,
            RunFolder(out),
            tokenizer.pad_id,
            seed=job.seed,
        )
        torch.save({"result": result, "weights": model.state_dict()}, result_dir / f"rank{rank}.pt")


def test_two_process_ddp_matches_one_process(tiny_bert_dir, sentiment_dir, tmp_path):
    job = make_job(tiny_bert_dir, sentiment_dir, epochs=2)
    mp.spawn(_ddp_worker, args=(2, free_port(), job, tmp_path / "ddp", tmp_path), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, w in saved[0]["weights"].items():  # DDP keeps the replicas bit-identical
        assert torch.equal(w, saved[1]["weights"][name]), name
    results = [s["result"] for s in saved]
    dev_per_epoch = [[e["dev"] for e in r["epochs"]] for r in results]
    assert dev_per_epoch[0] == dev_per_epoch[1]  # every rank sees the same gathered metrics
    # the gathered DDP metrics equal one process evaluating the saved model on all of dev
    model, _ = load_checkpoint(tmp_path / "ddp")
    task, tokenizer = build_task(job.data), build_tokenizer(job)
    _, dev = load_split(task, tokenizer, "dev")
    assert evaluate(model, dev, task, tokenizer.pad_id) == results[0]["dev"]
    # one process on the same data makes the same updates, up to float summation order. Compare
    # the functions, not the weights: the key bias gets a mathematically zero gradient (softmax
    # ignores it), and Adamax turns that gradient's rounding noise into full-size steps.
    single = run_finetune(job, tmp_path / "single")
    one, _ = load_checkpoint(tmp_path / "single")
    assert [e["dev"] for e in single["epochs"]] == dev_per_epoch[0]
    batch = tokenizer.encode(["the movie was good", "very sad plot"])
    model.eval(), one.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), one(**batch), rtol=1e-4, atol=1e-4)


# ---- runs that go wrong never report success ------------------------------------------------------


def test_a_diverged_run_stops_with_one_line_and_keeps_no_weights(tiny_bert_dir, sentiment_dir, tmp_path):
    with pytest.raises(
        UserError, match=r"epoch 1, step \d+: the (loss|gradient norm) is (nan|inf).*lower --lr \(now 1e\+30\)"
    ):
        run_finetune(make_job(tiny_bert_dir, sentiment_dir, lr=1e30, clip=1e30), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("option", ["lr", "clip", "warmup"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_options_are_refused(option, value):
    from st.specs import run_spec

    with pytest.raises(UserError, match=f"--{option} must be a finite number"):
        run_spec("csv", **{option: value})


def test_a_short_last_accumulation_group_still_makes_a_step(tiny_bert_dir, sentiment_dir, tmp_path):
    """192 examples in batches of 64 are 3 batches: with --grad-accum 4 that is one (short) step per
    epoch, not zero steps that would leave the pre-trained encoder and call it trained."""
    from st.models import load_pretrained

    run_finetune(make_job(tiny_bert_dir, sentiment_dir, epochs=1, batch_size=64, grad_accum=4), tmp_path / "run")
    tuned, _ = load_checkpoint(tmp_path / "run")
    start = load_pretrained(tiny_bert_dir).state_dict()
    assert any(not torch.equal(tuned.encoder.state_dict()[k], v) for k, v in start.items())
    # a group of 3 micro-batches is the mean over 3, as a full group of 3 would be
    same = run_finetune(
        make_job(tiny_bert_dir, sentiment_dir, epochs=1, batch_size=64, grad_accum=3), tmp_path / "three"
    )
    assert same["dev"] == json.loads((tmp_path / "run" / "metrics.json").read_text())["dev"]


def test_a_damaged_best_checkpoint_is_never_committed(tiny_bert_dir, sentiment_dir, tmp_path):
    """The best epoch's weights truncated while the run was stopped: the same command notices (their
    digest), trains the run again from its first epoch, and commits a readable model with the
    uninterrupted run's result; committing damaged weights directly is refused, and the rerun recovers."""
    job = make_job(tiny_bert_dir, sentiment_dir)
    straight = run_finetune(job, tmp_path / "straight")

    crash = stop_at_epoch(2)

    with pytest.raises(Interrupt):
        run_finetune(job, tmp_path / "run", on_epoch=crash)
    weights = tmp_path / "run" / PROGRESS / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    resumed = run_finetune(job, tmp_path / "run")
    assert [e["dev"] for e in resumed["epochs"]] == [e["dev"] for e in straight["epochs"]]
    assert load_checkpoint(tmp_path / "run")[0] is not None  # the committed model reads back

    with pytest.raises(Interrupt):
        run_finetune(job, tmp_path / "again", on_epoch=crash)
    run = RunFolder(tmp_path / "again")
    (run.best_dir / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match="was damaged since it was saved.*rerun the same command"):
        run.commit({"dev": {}})
    assert not (tmp_path / "again" / "metrics.json").exists() and not (tmp_path / "again" / PROGRESS).exists()
    assert run_finetune(job, tmp_path / "again")["dev"] == straight["dev"]
