"""Ticket sharing (Algorithm 1): a task's step changes exactly its ticket, weights no task chose are
removed, tasks are sampled by size with every batch once, MT-DNN without tickets, bad inputs, and
a two-task run end to end."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from cli.params import TaskNames, for_tasks, ratios_for_tasks
from st.errors import UserError
from st.importance import Scores
from st.models.bert import Bert, BertConfig
from st.multitask import load_task_model
from st.pipeline import build_task, build_tokenizer, load_split
from st.share import TicketSharer, epoch_plan
from st.share_run import run_share
from st.specs import DataSpec, ModelSpec, RunSpec, TrainConfig
from st.tasks.glue import GLUE_TASKS
from st.tickets import Ticket, tickets_for_tasks
from st.train import evaluate
from tests.conftest import WORDS, Interrupt, stop_at_epoch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


CONFIG = BertConfig(
    vocab_size=30,
    hidden_size=16,
    num_layers=3,
    num_heads=4,
    intermediate_size=32,
    max_position_embeddings=32,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
# Union: layer 0 heads 0-2, layer 1 heads 0-1, layer 2 all; FFN 0 (A only), 1 (B only); FFN 2 and
# heads L0h3, L1h2, L1h3 chosen by nobody. Shared by both: L0h1, L1h0, L2h2, L2h3.
A = Ticket(((1, 1, 0, 0), (1, 0, 0, 0), (1, 1, 1, 1)), (1, 0, 0), 0.3, "winning")
B = Ticket(((0, 1, 1, 0), (1, 1, 0, 0), (0, 0, 1, 1)), (0, 1, 0), 0.3, "winning")


def stub_task(name: str, num_labels: int) -> SimpleNamespace:
    return SimpleNamespace(name=name, num_labels=num_labels, head_dropout=0.0, main_metric="accuracy", labels=())


def make_sharer(tickets=(A, B)) -> TicketSharer:
    torch.manual_seed(0)
    return TicketSharer.create(Bert(CONFIG), [stub_task("a", 2), stub_task("b", 3)], list(tickets) if tickets else None)


def batch(seed: int, num_labels: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    attention = torch.ones(4, 7, dtype=torch.long)
    attention[1, 5:] = 0
    return {
        "input_ids": torch.randint(5, 30, (4, 7), generator=g) * attention,
        "token_type_ids": torch.zeros(4, 7, dtype=torch.long),
        "attention_mask": attention,
        "labels": torch.randint(0, num_labels, (4,), generator=g),
    }


def outside(model, ticket: Ticket, task: int) -> dict[str, torch.Tensor]:
    """Elements a step of `task` must not change, written out from the ticket independently of st.share."""
    c, Dh = model.encoder.config, model.encoder.config.head_dim
    result = {}
    for name, p in model.named_parameters():
        m = torch.zeros_like(p, dtype=torch.bool)
        if name.startswith("heads."):
            m[:] = int(name.split(".")[1]) != task
        elif name.startswith("encoder.layers."):
            layer = int(name.split(".")[2])
            heads = c.layer_heads(layer)
            if ".ffn." in name:
                m[:] = not ticket.ffn_mask[layer]
            for pos, h in enumerate(heads):
                if ticket.head_mask[layer][h]:
                    continue
                if ".attention.qkv." in name:
                    for block in range(3):  # the head's rows in Q, K and V
                        start = block * len(heads) * Dh + pos * Dh
                        m[start : start + Dh] = True
                elif name.endswith("attention.out.weight"):
                    m[:, pos * Dh : (pos + 1) * Dh] = True
        result[name] = m
    return result


def snapshot(sharer, optimizer):
    params = {n: p.detach().clone() for n, p in sharer.model.named_parameters()}
    states = {
        n: {k: v.clone() for k, v in optimizer.state[p].items() if v.shape == p.shape}
        for n, p in sharer.model.named_parameters()
    }
    return params, states


OPTIMIZERS = {
    "adamax": lambda params: torch.optim.Adamax(params, lr=1e-2, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_a_task_step_changes_exactly_its_ticket_and_optimizer_state(optimizer):
    sharer = make_sharer()
    opt = OPTIMIZERS[optimizer](sharer.model.parameters())
    cfg = TrainConfig(clip=1.0)
    labels = {"a": 2, "b": 3}
    for i, name in enumerate("bab"):  # momentum and state for every element of both tickets
        sharer.step(name, batch(i, labels[name]), opt, cfg)
    state_keys = {"adamax": ("exp_avg", "exp_inf"), "adamw": ("exp_avg", "exp_avg_sq")}[optimizer]
    qkv0 = dict(sharer.model.named_parameters())["encoder.layers.0.attention.qkv.weight"]
    assert opt.state[qkv0]["exp_avg"][8:12].abs().sum() > 0  # B-only head L0h2 carries momentum into A's step

    for seed, (name, ticket, index) in enumerate([("a", A, 0), ("b", B, 1), ("a", A, 0)], start=10):
        params, states = snapshot(sharer, opt)
        sharer.step(name, batch(seed, labels[name]), opt, cfg)
        masks = outside(sharer.model, ticket, index)
        for pname, p in sharer.model.named_parameters():
            out = masks[pname]
            assert torch.equal(p.detach()[out], params[pname][out]), f"{name} step moved {pname} outside its ticket"
            for key in state_keys:
                if key in states[pname]:
                    assert torch.equal(opt.state[p][key][out], states[pname][key][out]), (
                        f"{name} step moved {key} of {pname}"
                    )
            if (~out).any():
                assert not torch.equal(p.detach()[~out], params[pname][~out]), (
                    f"{name} step left {pname} unchanged inside its ticket"
                )
        # head by head: L0h0 is A's alone, L0h1 shared, L0h2 B's alone (rows of Q at positions 0, 1, 2)
        q = dict(sharer.model.named_parameters())["encoder.layers.0.attention.qkv.weight"].detach()
        before = params["encoder.layers.0.attention.qkv.weight"]
        moved = [not torch.equal(q[h * 4 : h * 4 + 4], before[h * 4 : h * 4 + 4]) for h in range(3)]
        assert moved == ([True, True, False] if name == "a" else [False, True, True])


def test_weights_no_task_chose_are_removed_and_each_task_keeps_its_ticket():
    sharer = make_sharer()
    c = sharer.model.encoder.config
    assert c.kept_heads == ((0, 1, 2), (0, 1), (0, 1, 2, 3)) and c.ffn_sizes == (32, 32, 0)
    D, Dh, F = 16, 4, 32
    per_head, per_ffn = 3 * (D * Dh + Dh) + D * Dh, D * F + F + F * D + D
    counts = sharer.parameter_counts()
    assert counts["dense_encoder"] == sum(p.numel() for p in Bert(CONFIG).parameters())
    assert counts["encoder"] == sum(p.numel() for p in sharer.model.encoder.parameters())
    assert counts["dense_encoder"] - counts["encoder"] == 3 * per_head + per_ffn
    assert sharer.percent_remaining()["encoder"] == pytest.approx(100 * counts["encoder"] / counts["dense_encoder"])

    sharer.model.eval()
    x = batch(0, 2)
    x.pop("labels")
    for name, ticket in (("a", A), ("b", B)):
        single = sharer.task_model(name).eval()  # physically pruned to the task's ticket
        kept = tuple(tuple(h for h in range(4) if ticket.head_mask[l][h]) for l in range(3))
        assert single.encoder.config.kept_heads == kept
        assert single.encoder.config.ffn_sizes == tuple(32 if f else 0 for f in ticket.ffn_mask)
        with torch.no_grad():
            torch.testing.assert_close(single(**x), sharer.view(name)(**x))  # masked forward = its subnetwork


def test_no_tickets_is_mt_dnn_and_trains_every_weight():
    sharer = make_sharer(None)
    assert sharer.model.encoder.config.kept_heads is None and sharer.model.encoder.config.ffn_sizes is None
    assert sharer.percent_remaining() == {"encoder": 100.0, "model": 100.0}
    assert sharer.masks("a") == (None, None)
    opt = torch.optim.Adamax(sharer.model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in sharer.model.named_parameters()}
    sharer.step("a", batch(0, 2), opt, TrainConfig())
    for name, p in sharer.model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (not name.startswith("heads.1.")), name  # all of the encoder and pooler; b's head untouched


def test_tasks_are_sampled_by_size_and_every_batch_is_used_once():
    plan = epoch_plan([5, 2, 9], seed=0, epoch=0)
    assert Counter(plan) == {0: 5, 1: 2, 2: 9}
    assert plan == epoch_plan([5, 2, 9], seed=0, epoch=0)
    assert plan != sorted(plan) and plan != epoch_plan([5, 2, 9], seed=0, epoch=1)


# ---- inputs ---------------------------------------------------------------------------------------


def parse_tasks(text: str) -> list[str]:
    return TaskNames().convert(text, None, None)


def resolve_tickets(names, values, config, ratios=None) -> dict:
    """`st share --tickets ... [--ratios ...]`: the CLI's parsing, then the library's loading."""
    return tickets_for_tasks(for_tasks(names, values, "--tickets"), config, ratios and ratios_for_tasks(names, ratios))


def test_task_lists():
    assert (
        parse_tasks("glue")
        == list(GLUE_TASKS)
        == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    )
    assert parse_tasks("rte, mrpc") == ["rte", "mrpc"]
    with pytest.raises(UserError, match="listed twice"):
        parse_tasks("rte,mrpc,rte")
    with pytest.raises(UserError, match="listed twice"):
        TicketSharer.create(Bert(CONFIG), [stub_task("a", 2), stub_task("a", 2)])


def test_ticket_sources(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "sweep_b"
    A.save(a)
    b.mkdir()
    (b / "super_ticket.json").write_text(json.dumps({**B.to_json(), "task": "b", "dev_score": 0.9}))
    assert resolve_tickets(["a", "b"], [f"a={a}", f"b={b}"], CONFIG) == {"a": A, "b": B}
    assert resolve_tickets(["a", "b"], [str(a), str(b)], CONFIG) == {"a": A, "b": B}  # by position
    with pytest.raises(UserError, match="made for task b, not a"):
        resolve_tickets(["a", "b"], [str(b), str(a)], CONFIG)
    assert resolve_tickets(["a", "b"], [f"a={a}"], CONFIG) == {"a": A}  # run_share refuses the task without one
    with pytest.raises(UserError, match="two --tickets values"):
        resolve_tickets(["a", "b"], [f"a={a}", f"a={a}", f"b={b}"], CONFIG)
    with pytest.raises(UserError, match="not in --tasks"):
        resolve_tickets(["a"], [f"a={a}", f"c={a}"], CONFIG)

    other_shape = tmp_path / "deep.json"
    Ticket(((1, 1, 1, 1),) * 4, (1,) * 4, 0.0, "winning").save(other_shape)
    with pytest.raises(UserError, match="shape 4×4 for a model with 3×4"):
        resolve_tickets(["a"], [f"a={other_shape}"], CONFIG)
    other_model = tmp_path / "wide.json"
    Ticket(
        A.head_mask, A.ffn_mask, 0.3, "winning", model_fingerprint={"num_layers": 3, "num_heads": 4, "hidden_size": 768}
    ).save(other_model)
    with pytest.raises(UserError, match="different model.*hidden_size 768 vs 16"):
        resolve_tickets(["a"], [f"a={other_model}"], CONFIG)

    # --ratios: winning tickets from importance scores
    rng = random.Random(0)
    Scores([[rng.random() for _ in range(4)] for _ in range(3)], [1.0, 2.0, 3.0], 10).save(
        b / "seed0" / "scores.json"
    )  # sweep layout
    made = resolve_tickets(["b"], [str(b)], CONFIG, ratios=[0.5])["b"]
    assert made.heads_pruned == 6 and made.ffn_mask == (0, 0, 1)  # round(1.5) FFN blocks, lowest scores first
    with pytest.raises(UserError, match="add --ratios"):
        resolve_tickets(["b"], [str(b / "seed0" / "scores.json")], CONFIG)


# ---- end to end ---------------------------------------------------------------------------------


def write_topic_jsonl(folder, n_train=128, n_dev=48, seed=1):
    """A second task on the same words with another rule: does the sentence talk about the plot or the acting?"""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_dev)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                topic = rng.choice(["plot", "acting"])
                words = rng.sample(WORDS[:11], 3) + [topic]
                rng.shuffle(words)
                f.write(json.dumps({"sentence": " ".join(words), "label": topic}) + "\n")
    return folder


TA = Ticket(((1, 1, 0, 0), (1, 0, 1, 0)), (1, 0), 0.4, "winning")
TB = Ticket(((0, 1, 1, 0), (1, 0, 0, 0)), (1, 0), 0.4, "winning")


def test_two_task_run_end_to_end(tiny_bert_dir, sentiment_dir, tmp_path):
    topic_dir = write_topic_jsonl(tmp_path / "topic")
    cfg = TrainConfig(epochs=3, batch_size=16, lr=5e-3)
    jobs = [
        RunSpec(DataSpec(task, str(d)), ModelSpec(str(tiny_bert_dir), dropout=0.0, head_dropout=0.0), cfg)
        for task, d in (("csv", sentiment_dir), ("jsonl", topic_dir))
    ]
    out = tmp_path / "mtl"
    with pytest.raises(UserError, match="task jsonl has no ticket; pass --tickets jsonl=PATH"):
        run_share(jobs, {"csv": TA}, out)
    assert not out.exists()
    result = run_share(jobs, {"csv": TA, "jsonl": TB}, out)

    assert set(result["dev"]) == {"csv", "jsonl"} and set(result["dev"]["csv"]) == {"accuracy", "f1"}
    assert result["dev"]["csv"]["accuracy"] >= 0.7 and result["dev"]["jsonl"]["accuracy"] >= 0.7
    assert result["average"] == pytest.approx(
        (result["dev"]["csv"]["accuracy"] + result["dev"]["jsonl"]["accuracy"]) / 2
    )
    assert all(e["batches"] == {"csv": 12, "jsonl": 8} for e in result["epochs"])  # 192/16 and 128/16, each once
    assert 0 < result["percent_remaining"]["encoder"] < 100 and result["tickets"] == "shared"
    for name in (
        "model.safetensors",
        "config.json",
        "tickets/csv.json",
        "tickets/jsonl.json",
        "metrics.json",
        "report.md",
        "vocab.txt",
    ):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "| csv | accuracy |" in report and "average" in report and "union" in report
    assert json.loads((out / "metrics.json").read_text())["dev"] == result["dev"]

    # one task out of the multi-task folder: its ticket kept, the reported metrics reproduced
    job = jobs[0]
    task, tokenizer = build_task(job.data), build_tokenizer(job)
    model = load_task_model(out, "csv")
    assert model.encoder.config.kept_heads == ((0, 1), (0, 2)) and model.encoder.config.ffn_sizes == (32, 0)
    _, dev = load_split(task, tokenizer, "dev")
    assert evaluate(model, dev, task, tokenizer.pad_id) == result["dev"]["csv"]
    with pytest.raises(UserError, match="not in this multi-task model"):
        load_task_model(out, "sst2")
    assert run_share(jobs, {"csv": TA, "jsonl": TB}, out) == json.loads(
        (out / "metrics.json").read_text()
    )  # finished: kept

    # "+ ST fine-tuning": `st finetune --init MTL_DIR --task t` continues from task t's head and ticket
    from st.models import load_checkpoint
    from st.pipeline import run_finetune

    tuned = run_finetune(
        replace(job, model=replace(job.model, init=str(out)), train=replace(cfg, epochs=1)), tmp_path / "after_mtl"
    )
    after, _ = load_checkpoint(tmp_path / "after_mtl")
    assert after.encoder.config.kept_heads == ((0, 1), (0, 2)) and after.encoder.config.ffn_sizes == (32, 0)
    assert tuned["dev"]["accuracy"] >= 0.7

    crash = stop_at_epoch(2)

    with pytest.raises(Interrupt):
        run_share(jobs, {"csv": TA, "jsonl": TB}, tmp_path / "resumed", on_epoch=crash)
    resumed = run_share(jobs, {"csv": TA, "jsonl": TB}, tmp_path / "resumed")
    assert [e["dev"] for e in resumed["epochs"]] == [e["dev"] for e in result["epochs"]]
    with pytest.raises(UserError, match="tickets"):  # the same folder with other tickets is refused
        run_share(jobs, {"csv": TB, "jsonl": TA}, tmp_path / "resumed")


def st(*args, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    if not ok:
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_cli_no_tickets_and_bad_inputs(tiny_bert_dir, sentiment_dir, tmp_path):
    topic_dir = write_topic_jsonl(tmp_path / "topic", n_train=48, n_dev=16)
    common = [
        "--model",
        tiny_bert_dir,
        "--data-dir",
        f"csv={sentiment_dir}",
        "--data-dir",
        f"jsonl={topic_dir}",
        "--epochs",
        1,
        "--batch-size",
        32,
        "--device",
        "cpu",
    ]
    out = st("share", "--tasks", "csv,jsonl", "--no-tickets", *common, "--out", tmp_path / "mtdnn")
    assert "average" in out
    metrics = json.loads((tmp_path / "mtdnn" / "metrics.json").read_text())
    assert metrics["tickets"] == "none" and metrics["percent_remaining"]["encoder"] == 100.0

    TA.save(tmp_path / "a.json")
    assert "listed twice" in st(
        "share", "--tasks", "csv,csv", "--no-tickets", *common, "--out", tmp_path / "x", ok=False
    )
    assert "task jsonl has no ticket" in st(
        "share",
        "--tasks",
        "csv,jsonl",
        "--tickets",
        f"csv={tmp_path / 'a.json'}",
        *common,
        "--out",
        tmp_path / "x",
        ok=False,
    )
    Ticket(((1, 1, 1, 1),) * 3, (1,) * 3, 0.0, "winning").save(tmp_path / "deep.json")
    assert "shape 3×4" in st(
        "share", "--tasks", "csv", "--tickets", tmp_path / "deep.json", *common[:2], "--out", tmp_path / "x", ok=False
    )
    assert "--no-tickets" in st("share", "--tasks", "csv", *common[:2], "--out", tmp_path / "x", ok=False)


def test_cli_per_task_train_sizes_and_test_report(tiny_bert_dir, sentiment_dir, tmp_path):
    """--train-sizes gives each task its own sample; --report-split test is evaluated once on the chosen weights."""
    topic_dir = write_topic_jsonl(tmp_path / "topic", n_train=48, n_dev=16)
    common = [
        "--model",
        tiny_bert_dir,
        "--data-dir",
        f"csv={sentiment_dir}",
        "--data-dir",
        f"jsonl={topic_dir}",
        "--epochs",
        1,
        "--batch-size",
        32,
        "--device",
        "cpu",
        "--no-tickets",
    ]
    st(
        "share",
        "--tasks",
        "csv,jsonl",
        *common,
        "--train-size",
        40,
        "--train-sizes",
        "jsonl=24",
        "--report-split",
        "test",
        "--out",
        tmp_path / "m",
    )
    settings = json.loads((tmp_path / "m" / "run.json").read_text())["tasks"]
    assert (settings["csv"]["train_size"], settings["jsonl"]["train_size"]) == (40, 24)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["report_split"] == "test" and metrics["extra_dev"] == {}
    for task in ("csv", "jsonl"):
        assert 0 <= metrics["report"][task]["accuracy"] <= 1
    assert "--train-sizes names task mnli" in st(
        "share", "--tasks", "csv,jsonl", *common, "--train-sizes", "mnli=3", "--out", tmp_path / "x", ok=False
    )
    assert "positive whole number" in st(
        "share", "--tasks", "csv,jsonl", *common, "--train-sizes", "csv=0", "--out", tmp_path / "x", ok=False
    )
    assert "no split 'exam'" in st(
        "share", "--tasks", "csv,jsonl", *common, "--report-split", "exam", "--out", tmp_path / "x", ok=False
    )
    assert not (tmp_path / "x" / "run.json").exists()  # so the corrected command may use the same --out


def test_a_task_the_multitask_model_never_saw_starts_from_its_shared_encoder(tiny_bert_dir, sentiment_dir, tmp_path):
    """Domain adaptation (`st adapt --from NAME=MTL_DIR`): the union of the tickets and a fresh head."""
    topic_dir = write_topic_jsonl(tmp_path / "topic", n_train=48, n_dev=16)
    TA.save(tmp_path / "a.json")
    st(
        "share",
        "--tasks",
        "csv",
        "--tickets",
        tmp_path / "a.json",
        "--model",
        tiny_bert_dir,
        "--data-dir",
        f"csv={sentiment_dir}",
        "--epochs",
        1,
        "--batch-size",
        32,
        "--device",
        "cpu",
        "--out",
        tmp_path / "m",
    )
    st(
        "finetune",
        "--task",
        "jsonl",
        "--data-dir",
        topic_dir,
        "--init",
        tmp_path / "m",
        "--epochs",
        1,
        "--batch-size",
        16,
        "--device",
        "cpu",
        "--out",
        tmp_path / "adapted",
    )
    from st.models import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "adapted")
    assert model.encoder.config.kept_heads == ((0, 1), (0, 2)) and model.encoder.config.ffn_sizes == (32, 0)
    # before training: the shared encoder's weights are carried over, the csv head is not
    from st.pipeline import build_model, build_task
    from st.specs import run_spec

    spec = run_spec("jsonl", data_dir=str(topic_dir), init=str(tmp_path / "m"), seed=0)
    start, csv_model = build_model(spec, build_task(spec.data)), load_task_model(tmp_path / "m", "csv")
    assert torch.equal(start.encoder.layers[0].attention.qkv.weight, csv_model.encoder.layers[0].attention.qkv.weight)
    assert not torch.equal(start.classifier.out.weight, csv_model.classifier.out.weight)
    # the run's --dropout and --head-dropout replace the folder's (its maker's), for a new task and its own
    for task in ("jsonl", "csv"):
        kw = {"data_dir": str(topic_dir)} if task == "jsonl" else {"data_dir": str(sentiment_dir)}
        spec = run_spec(task, init=str(tmp_path / "m"), seed=0, dropout=0.3, head_dropout=0.25, **kw)
        model = build_model(spec, build_task(spec.data))
        assert model.encoder.config == start.encoder.config.with_dropout(0.3)
        assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3, 0.25}
        assert model.classifier.dropout.p == 0.25
        assert torch.equal(model.encoder.layers[0].attention.qkv.weight, start.encoder.layers[0].attention.qkv.weight)


# ---- all nine GLUE tasks, in their official layouts ---------------------------------------------


def nine_glue_files(n_train: int = 8, n_dev: int = 4) -> dict:
    """Tiny train/dev files of every GLUE task, laid out as the official ones (see tests/test_glue.py).
    STS-B's dev scores are all equal, so its Pearson/Spearman correlations are undefined (NaN)."""
    from tests.test_glue import MNLI_HEAD, PARSES, row

    rng = random.Random(3)

    def sent() -> str:
        return " ".join(rng.sample(WORDS, 4)) + " ."

    def rows(n, make):
        return "".join(make(i) for i in range(n))

    nli = ("contradiction", "entailment", "neutral")
    sts_head = row(
        "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"
    )

    def sts(n, constant=False):
        return sts_head + rows(
            n,
            lambda i: row(
                i,
                "main-captions",
                "MSRvid",
                "2012test",
                f"{i:04d}",
                "none",
                "none",
                sent(),
                sent(),
                "2.500" if constant else f"{i % 6:.3f}",
            ),
        )

    def mnli_dev(n):
        return row(*MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label") + rows(
            n, lambda i: row(i, 100 + i, f"{100 + i}n", "slate", *PARSES, sent(), sent(), *([nli[i % 3]] * 6))
        )

    files = {
        "CoLA": {
            s: rows(n, lambda i: row("gj04", i % 2, "" if i % 2 else "*", sent()))
            for s, n in (("train.tsv", n_train), ("dev.tsv", n_dev))
        },
        "SST-2": {
            s: row("sentence", "label") + rows(n, lambda i: row(sent(), i % 2))
            for s, n in (("train.tsv", n_train), ("dev.tsv", n_dev))
        },
        "MRPC": {
            s: row("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
            + rows(n, lambda i: row(i % 2, 1000 + i, 2000 + i, sent(), sent()))
            for s, n in (("train.tsv", n_train), ("dev.tsv", n_dev))
        },
        "STS-B": {"train.tsv": sts(n_train), "dev.tsv": sts(n_dev, constant=True)},
        "QQP": {
            s: row("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
            + rows(n, lambda i: row(i, 2 * i, 2 * i + 1, sent(), sent(), i % 2))
            for s, n in (("train.tsv", n_train), ("dev.tsv", n_dev))
        },
        "MNLI": {
            "train.tsv": row(*MNLI_HEAD, "label1", "gold_label")
            + rows(n_train, lambda i: row(i, i, f"{i}n", "fiction", *PARSES, sent(), sent(), nli[i % 3], nli[i % 3])),
            "dev_matched.tsv": mnli_dev(n_dev),
            "dev_mismatched.tsv": mnli_dev(n_dev + 1),
        },
        **{
            folder: {
                s: row("index", *cols, "label")
                + rows(n, lambda i, labels=labels: row(i, sent(), sent(), labels[i % 2]))
                for s, n in (("train.tsv", n_train), ("dev.tsv", n_dev))
            }
            for folder, cols, labels in (
                ("QNLI", ("question", "sentence"), ("entailment", "not_entailment")),
                ("RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
                ("WNLI", ("sentence1", "sentence2"), ("0", "1")),
            )
        },
    }
    return files


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_share_on_all_nine_glue_tasks(tiny_bert_dir, tmp_path, monkeypatch):
    from tests.test_glue import write_glue

    write_glue(tmp_path / "glue", nine_glue_files())
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "glue"))
    out = tmp_path / "mtdnn"
    st(
        "share",
        "--tasks",
        "glue",
        "--no-tickets",
        "--model",
        tiny_bert_dir,
        "--epochs",
        1,
        "--batch-size",
        4,
        "--device",
        "cpu",
        "--out",
        out,
    )

    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN is written as null
    json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert metrics["tasks"] == list(GLUE_TASKS) and set(metrics["dev"]) == set(GLUE_TASKS)
    assert metrics["epochs"][0]["batches"] == {name: 2 for name in GLUE_TASKS}  # 8 rows / 4 per batch, each task
    for name in GLUE_TASKS:
        main = metrics["main_metric"][name]
        assert main in metrics["dev"][name], name
    # MNLI: epochs chosen on dev_matched, dev_mismatched scored with the same weights and reported
    assert metrics["dev_split"]["mnli"] == "dev_matched" and metrics["dev_split"]["sst2"] == "dev"
    assert set(metrics["extra_dev"]) == {"mnli"} and set(metrics["extra_dev"]["mnli"]) == {"dev_mismatched"}
    mm = metrics["extra_dev"]["mnli"]["dev_mismatched"]["accuracy"]
    assert mm in {k / 5 for k in range(6)}  # 5 mismatched rows, not the 4 matched ones
    # STS-B: a one-output regression head, Pearson/Spearman; constant gold scores make them undefined
    config = json.loads((out / "config.json").read_text())
    heads = {t["name"]: t["num_labels"] for t in config["tasks"]}
    assert heads["stsb"] == 1 and heads["mnli"] == 3 and heads["cola"] == 2
    assert set(metrics["dev"]["stsb"]) == {"pearson", "spearman"} and metrics["dev"]["stsb"]["pearson"] is None
    expected = (
        sum(
            0.0
            if metrics["dev"][n][metrics["main_metric"][n]] is None
            else metrics["dev"][n][metrics["main_metric"][n]]
            for n in GLUE_TASKS
        )
        / 9
    )
    assert metrics["average"] == pytest.approx(expected)
    report = (out / "report.md").read_text()
    assert "| mnli | dev_mismatched | accuracy |" in report and "mnli: dev_matched" in report
    assert "| stsb | pearson | n/a |" in report and "counted as 0 in the average: stsb" in report
    assert load_task_model(out, "stsb").classifier.out.out_features == 1


def test_task_importance_figure(tmp_path):
    from st.importance import plot_task_importance, task_importance

    a = Scores([[1.0, 2.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]], [2.0, 1.0], 10)
    b = Scores([[0.0, 1.0, 3.0, 1.0], [1.0, 0.0, 0.0, 0.0]], [0.0, 4.0], 10)
    data = plot_task_importance({"sst2": a, "mnli": b}, tmp_path / "fig" / "tasks.png")
    png = (tmp_path / "fig" / "tasks.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert [p.name for p in (tmp_path / "fig").iterdir()] == ["tasks.png"]  # written atomically, no temp left
    for layer in range(2):  # each layer's shares over tasks sum to one
        assert sum(data["layer_head_share"][t][layer] for t in range(2)) == pytest.approx(1.0)
    assert data["ffn_share"][0] == pytest.approx([1.0, 0.5 / 1.5])  # FFN: a [1, .5], b [0, 1]
    assert data["head_share"][0][0][2] == 0.0 and data["head_share"][1][0][2] == 1.0
    assert data["head_mean"][1][0] == pytest.approx((0.5 + 1.0) / 2)

    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    st(
        "task-importance",
        "--scores",
        f"sst2={tmp_path / 'a.json'}",
        "--scores",
        f"mnli={tmp_path / 'b.json'}",
        "--out",
        tmp_path / "cli.png",
    )
    assert (tmp_path / "cli.png").stat().st_size > 1000 and json.loads((tmp_path / "cli.json").read_text())[
        "tasks"
    ] == ["sst2", "mnli"]

    deep = Scores([[1.0] * 4] * 3, [1.0] * 3, 10)
    with pytest.raises(UserError, match="3×4 but sst2's are 2×4"):
        task_importance({"sst2": a, "rte": deep})
    deep.save(tmp_path / "deep.json")
    out = st(
        "task-importance",
        "--scores",
        f"sst2={tmp_path / 'a.json'}",
        "--scores",
        f"rte={tmp_path / 'deep.json'}",
        "--out",
        tmp_path / "bad.png",
        ok=False,
    )
    assert "3×4" in out and not (tmp_path / "bad.png").exists()
