"""The CLI end to end on a tiny model: finetune -> score -> prune -> rewind -> export -> eval,
and every bad input answered with one line that says how to fix it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from st.models import load_checkpoint, load_pretrained
from st.tickets import Ticket


def st(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
        assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def finetuned(tiny_bert_dir, sentiment_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "full"
    st(
        "finetune",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--lr",
        5e-3,
        "--out",
        out,
        "--device",
        "cpu",
    )
    return out


def test_paper_pipeline_through_the_cli(finetuned, tiny_bert_dir, sentiment_dir, tmp_path):
    metrics = json.loads((finetuned / "metrics.json").read_text())
    assert set(metrics["dev"]) == {"accuracy", "f1"}

    st("score", "--checkpoint", finetuned, "--out", tmp_path / "scores.json", "--device", "cpu")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(scores["head"]) == 2 and len(scores["head"][0]) == 4
    assert (tmp_path / "scores.png").stat().st_size > 0

    out = st(
        "prune",
        "--scores",
        tmp_path / "scores.json",
        "--ratio",
        0.5,
        "--checkpoint",
        finetuned,
        "--out",
        tmp_path / "ticket.json",
    )
    ticket = Ticket.load(tmp_path / "ticket.json")
    assert ticket.heads_pruned == 4 and ticket.ffn_pruned == 1
    assert 0 < ticket.percent_remaining["encoder"] < 100 and "% of weights remain" in out

    rewound = tmp_path / "rewound"
    st(
        "finetune",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--epochs",
        1,
        "--batch-size",
        8,
        "--lr",
        5e-3,
        "--ticket",
        tmp_path / "ticket.json",
        "--out",
        rewound,
        "--device",
        "cpu",
    )
    model, cfg = load_checkpoint(rewound)
    assert sum(len(h) for h in model.encoder.config.kept_heads) == 4

    st(
        "export",
        "--checkpoint",
        finetuned,
        "--ticket",
        tmp_path / "ticket.json",
        "--out",
        tmp_path / "small",
        "--hf",
        tmp_path / "hf",
    )
    small = load_pretrained(tmp_path / "small")
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in load_pretrained(finetuned).parameters())
    st("export", "--checkpoint", finetuned, "--out", tmp_path / "small", ok=False)  # never overwritten

    evaluated = st(
        "eval", "--checkpoint", finetuned, "--split", "test", "--predictions", tmp_path / "pred.tsv", "--device", "cpu"
    )
    assert "accuracy" in evaluated
    lines = (tmp_path / "pred.tsv").read_text().splitlines()
    assert (
        lines[0] == "index\tprediction" and len(lines) == 49 and {l.split("\t")[1] for l in lines[1:]} <= {"neg", "pos"}
    )


def test_rewinding_resets_kept_weights_to_pretrained(finetuned, tiny_bert_dir, sentiment_dir, tmp_path):
    """The rewound subnetwork starts from pre-trained values, not the fine-tuned ones."""
    from st.pipeline import build_model, build_task
    from st.specs import run_spec

    ticket = Ticket.full(load_pretrained(tiny_bert_dir).config)
    job = run_spec("csv", model=str(tiny_bert_dir), data_dir=str(sentiment_dir), ticket=ticket)
    rewound = build_model(job, build_task(job.data))
    pretrained = load_pretrained(tiny_bert_dir)
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(rewound.encoder.state_dict()[name], tensor), name
    again = build_model(job, build_task(job.data))  # the task head is re-initialised with the same seed
    assert torch.equal(again.classifier.out.weight, rewound.classifier.out.weight)


@pytest.mark.parametrize(
    "args, message",
    [
        (["finetune", "--task", "no_such_task", "--out", "{tmp}/x"], "unknown task"),
        (["finetune", "--task", "rotten_tomatos", "--out", "{tmp}/x"], "Did you mean: rotten_tomatoes"),
        (
            ["finetune", "--task", "csv", "--data-dir", "{tmp}/missing", "--model", "{model}", "--out", "{tmp}/x"],
            "missing",
        ),
        (
            [
                "finetune",
                "--task",
                "csv",
                "--data-dir",
                "{data}",
                "--model",
                "{model}",
                "--train-fraction",
                "1.5",
                "--out",
                "{tmp}/x",
            ],
            "(0, 1]",
        ),
        (["finetune", "--task", "csv", "--data-dir", "{data}", "--model", "{tmp}", "--out", "{tmp}/x"], "config.json"),
        (
            ["finetune", "--task", "csv", "--data-dir", "{data}", "--model", "no-such/model", "--out", "{tmp}/x"],
            "Hugging Face cache",
        ),
        (["prune", "--scores", "{tmp}/nope.json", "--ratio", "0.2", "--out", "{tmp}/t.json"], "not found"),
        (["eval", "--checkpoint", "{tmp}/nope"], "does not exist"),
        (["score", "--checkpoint", "{tmp}/nope", "--out", "{tmp}/s.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path, tiny_bert_dir, sentiment_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    args = [a.format(tmp=tmp_path, model=tiny_bert_dir, data=sentiment_dir) for a in args]
    out = st(*args, ok=False)
    assert message in out and out.strip().startswith("Error:") and len(out.strip().splitlines()) == 1


def test_prune_rejects_bad_ratio_and_mismatched_scores(finetuned, tmp_path):
    st("score", "--checkpoint", finetuned, "--out", tmp_path / "scores.json", "--device", "cpu")
    for ratio in ("-0.1", "1.0"):
        assert "[0, 1)" in st(
            "prune", "--scores", tmp_path / "scores.json", "--ratio", ratio, "--out", tmp_path / "t.json", ok=False
        )
    other = tmp_path / "other"
    from tests.conftest import write_tiny_bert

    write_tiny_bert(other, num_layers=3)
    out = st(
        "prune",
        "--scores",
        tmp_path / "scores.json",
        "--ratio",
        "0.2",
        "--model",
        other,
        "--out",
        tmp_path / "t.json",
        ok=False,
    )
    assert "2×4" in out and "3×4" in out


def test_ticket_for_another_model_is_refused(finetuned, tiny_bert_dir, sentiment_dir, tmp_path):
    from st.models import BertConfig

    wrong = Ticket.full(BertConfig(vocab_size=10, hidden_size=16, num_layers=3, num_heads=4, intermediate_size=8))
    wrong.save(tmp_path / "wrong.json")
    out = st(
        "finetune",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--ticket",
        tmp_path / "wrong.json",
        "--out",
        tmp_path / "x",
        ok=False,
    )
    assert "wrong.json" in out and "3×4" in out
    out = st(
        "export", "--checkpoint", finetuned, "--ticket", tmp_path / "wrong.json", "--out", tmp_path / "e", ok=False
    )
    assert "3×4" in out


def test_help_shows_the_library_defaults():
    """Options left out are None and the library fills in its defaults: the help must say the same ones."""
    import re

    from cli.main import finetune_command
    from st.specs import run_spec

    spec = run_spec("csv")
    where = {
        **vars(spec.train),
        **vars(spec.data),
        "dropout": spec.model.dropout,
        "model": spec.model.name,
        "seed": spec.seed,
    }
    shown = {p.name: re.search(r"Default: ([\w.-]+)\.$", p.help or "") for p in finetune_command.params}
    checked = {name: m.group(1) for name, m in shown.items() if m}
    assert len(checked) >= 10
    for name, text in checked.items():
        assert text == str(where[name]), name


# ---- outputs are never overwritten; the environment's faults are one line --------------------------


def test_outputs_never_replace_another_file(finetuned, tmp_path):
    config = finetuned / "config.json"
    before = config.read_bytes()
    assert "already exists" in st("score", "--checkpoint", finetuned, "--out", config, "--device", "cpu", ok=False)
    assert "is not importance scores" in st(
        "score", "--checkpoint", finetuned, "--out", config, "--overwrite", ok=False
    )
    assert "does not end in .png" in st(
        "task-importance", "--scores", f"a={config}", "--out", tmp_path / "x.txt", ok=False
    )
    assert "already exists" in st(
        "eval", "--checkpoint", finetuned, "--split", "test", "--predictions", finetuned / "test.csv", ok=False
    ) or "does not end in .tsv" in st(
        "eval", "--checkpoint", finetuned, "--split", "test", "--predictions", finetuned / "test.csv", ok=False
    )
    assert config.read_bytes() == before

    scores = tmp_path / "scores.json"
    st("score", "--checkpoint", finetuned, "--out", scores, "--device", "cpu")
    first = scores.read_bytes()
    assert "already exists" in st("score", "--checkpoint", finetuned, "--out", scores, "--device", "cpu", ok=False)
    st("prune", "--scores", scores, "--ratio", 0.5, "--out", tmp_path / "ticket.json")
    out = st(
        "prune", "--scores", scores, "--ratio", 0.5, "--out", scores, "--overwrite", ok=False
    )  # a ticket over scores
    assert "is not a ticket" in out and scores.read_bytes() == first
    st(
        "prune", "--scores", scores, "--ratio", 0.25, "--out", tmp_path / "ticket.json", "--overwrite"
    )  # same kind: replaced
    assert Ticket.load(tmp_path / "ticket.json").ratio == 0.25
    st("score", "--checkpoint", finetuned, "--out", scores, "--device", "cpu", "--num-examples", 8, "--overwrite")
    assert json.loads(scores.read_text())["num_examples"] == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "1e23"], "'1e23' is not a valid integer range"),
        (["--epochs", "0"], "--epochs"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--device", "bogus"], "--device bogus"),
        (["--max-length", "100"], "--max-length 100 is more than the 64 positions"),
    ],
)
def test_bad_options_are_one_line_and_leave_no_folder(args, message, tiny_bert_dir, sentiment_dir, tmp_path):
    out = st(
        "finetune",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--out",
        tmp_path / "run",
        *args,
        ok=False,
    )
    assert message in out and out.strip().startswith("Error:") and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "run.json").exists()  # the corrected command may use the same --out


def test_an_unwritable_out_and_an_interrupt_are_one_line(tiny_bert_dir, sentiment_dir, tmp_path, monkeypatch):
    args = ["finetune", "--task", "csv", "--data-dir", sentiment_dir, "--model", tiny_bert_dir, "--device", "cpu"]
    assert "cannot write to /proc/st" in st(*args, "--out", "/proc/st/run", ok=False)

    import st.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "finetune", interrupted)
    result = CliRunner().invoke(cli, [str(a) for a in (*args, "--out", tmp_path / "run")])
    assert result.exit_code == 130 and "the same command resumes" in result.output and "Traceback" not in result.output


def test_a_stopped_score_leaves_nothing_and_says_so(finetuned, tmp_path, monkeypatch):
    """SIGTERM (KeyboardInterrupt in the CLI) after scores.json was computed but before its heatmap:
    neither file is left, the message says so, and the same command then runs."""
    from st import importance

    real = importance.plot_heatmap

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importance, "plot_heatmap", interrupted)
    args = ["score", "--checkpoint", finetuned, "--out", tmp_path / "scores.json"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 130 and "no output was left half-written" in result.output, result.output
    assert "resumes" not in result.output and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(importance, "plot_heatmap", real)
    st(*args)
    assert (tmp_path / "scores.json").exists() and (tmp_path / "scores.png").exists()


def _model_with_config(folder, tiny_bert_dir, edit):
    import shutil

    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: [c], "holds a list, not a model config"),
        (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "lacks hidden_size"),
        (lambda c: {**c, "hidden_size": "16"}, "hidden_size must be a positive whole number, got '16'"),
        (lambda c: {**c, "num_hidden_layers": -2}, "num_layers must be a positive whole number, got -2"),
        (lambda c: {**c, "num_attention_heads": 3}, "hidden_size 16 is not a multiple of num_heads 3"),
        (lambda c: {**c, "num_hidden_layers": True}, "num_layers must be a positive whole number, got True"),
        (lambda c: {**c, "layer_norm_eps": "x"}, "layer_norm_eps must be a non-negative number, got 'x'"),
        (lambda c: {**c, "hidden_dropout_prob": "x"}, "hidden_dropout must be a non-negative number, got 'x'"),
        (lambda c: {**c, "attention_probs_dropout_prob": 1.5}, "dropout probabilities must be below 1"),
        (lambda c: {**c, "pad_token_id": "0"}, "pad_token_id must be a whole number >= 0, got '0'"),
        (lambda c: {**c, "type_vocab_size": -1}, "type_vocab_size must be a whole number >= 0, got -1"),
        # sizes that cannot be allocated: one line naming the field, before any tensor is built
        (
            lambda c: {**c, "hidden_size": 4_000_000, "num_attention_heads": 1},
            "hidden_size = 4,000,000 makes weights of",
        ),
        (lambda c: {**c, "intermediate_size": 10**9}, "intermediate_size = 1,000,000,000 makes weights of"),
        (lambda c: {**c, "vocab_size": 3 * 10**9}, "vocab_size = 3,000,000,000 makes weights of"),
        (lambda c: {**c, "max_position_embeddings": 2 * 10**9}, "max_position_embeddings = 2,000,000,000 makes"),
    ],
)
def test_bad_model_configs_are_one_line(edit, message, tiny_bert_dir, sentiment_dir, tmp_path):
    model = _model_with_config(tmp_path / "model", tiny_bert_dir, edit)
    out = st(
        "finetune", "--task", "csv", "--data-dir", sentiment_dir, "--model", model, "--out", tmp_path / "run", ok=False
    )
    assert message in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("config.json", b"\xff\xfe{}", "config.json is not valid JSON"),
        ("tokenizer_config.json", b"\xff\xfe", "tokenizer_config.json is not UTF-8 text"),
        ("tokenizer_config.json", b"[]", "tokenizer_config.json holds a JSON list, not an object"),
        ("tokenizer_config.json", b'{"do_lower_case": "yes"}', "do_lower_case is 'yes', where a bool belongs"),
        ("tokenizer_config.json", b'{"model_max_length": "big"}', "model_max_length is 'big', where a int or float"),
        ("tokenizer_config.json", b'{"unk_token": {"content": 5}}', "unk_token is {'content': 5}, not a token"),
        ("special_tokens_map.json", b"\xff", "special_tokens_map.json is not UTF-8 text"),
        ("special_tokens_map.json", b'["[PAD]"]', "special_tokens_map.json holds a JSON list"),
        ("special_tokens_map.json", b'{"unk_token": 5}', "unk_token is 5, not a token"),
        ("vocab.txt", b"\xff\xfe\xfd\n", "vocab.txt is not UTF-8 text"),
        ("tokenizer.json", b"[]", "cannot read"),
    ],
)
def test_damaged_model_folder_files_are_one_line_before_anything_is_written(
    file, content, message, tiny_bert_dir, sentiment_dir, tmp_path
):
    model = _model_with_config(tmp_path / "model", tiny_bert_dir, lambda c: c)
    (model / file).write_bytes(content)
    out = st(
        "finetune", "--task", "csv", "--data-dir", sentiment_dir, "--model", model, "--out", tmp_path / "run", ok=False
    )
    assert message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize(
    "head, message",
    [
        ({"num_labels": "2"}, "head.num_labels must be a positive whole number, got '2'"),
        ({"num_labels": -1}, "head.num_labels must be a positive whole number, got -1"),
        ({"dropout": "x"}, "head.dropout must be a number in [0, 1), got 'x'"),
    ],
)
def test_a_damaged_checkpoint_head_is_one_line(head, message, finetuned, tmp_path):
    import shutil

    edited = shutil.copytree(finetuned, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "head": {**config["head"], **head}}))
    for args in (["eval", "--checkpoint", edited], ["score", "--checkpoint", edited, "--out", tmp_path / "s.json"]):
        out = st(*args, ok=False)
        assert message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "s.json").exists()


def test_bad_files_and_user_code_are_one_line(finetuned, tiny_bert_dir, tmp_path):
    edited = tmp_path / "edited"
    import shutil

    shutil.copytree(finetuned, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "head": {**config["head"], "num_labels": 5}}))
    assert "does not match its config.json" in st("eval", "--checkpoint", edited, ok=False)
    (edited / "config.json").write_text(json.dumps({**config, "job": {"task": "csv"}}))
    assert 'has a broken "job" entry' in st("score", "--checkpoint", edited, "--out", tmp_path / "s.json", ok=False)
    assert "is a folder; pass the scores.json" in st(
        "prune", "--scores", tmp_path, "--ratio", 0.2, "--out", tmp_path / "t.json", ok=False
    )
    (tmp_path / "tasks.csv").write_text("a,b\n")
    assert "is not a Python file" in st("--user-dir", tmp_path / "tasks.csv", "tasks", ok=False)
    (tmp_path / "again.py").write_text(
        "from st.tasks import register_task\n\n@register_task('csv')\nclass Mine:\n    pass\n"
    )
    assert "task 'csv' is already registered" in st("--user-dir", tmp_path / "again.py", "tasks", ok=False)

    data = tmp_path / "jsonl"
    data.mkdir()
    for split in ("train", "dev", "test"):
        (data / f"{split}.jsonl").write_text(
            '{"sentence": "good", "label": "pos"}\n{"sentence": NaN, "label": "neg"}\n'
        )
    out = st(
        "finetune", "--task", "jsonl", "--data-dir", data, "--model", tiny_bert_dir, "--out", tmp_path / "r", ok=False
    )
    assert "train.jsonl, line 2: NaN is not valid JSON" in out

    rte = tmp_path / "RTE"
    rte.mkdir()
    (rte / "train.tsv").write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\tgood\t\xff\xfe bad\tentailment\n")
    out = st(
        "finetune", "--task", "rte", "--data-dir", rte, "--model", tiny_bert_dir, "--out", tmp_path / "g", ok=False
    )
    assert "train.tsv:2: not UTF-8 text" in out


def test_report_refuses_nan_in_results(tmp_path):
    (tmp_path / "results.json").write_text('{"runs": [], "main_metric": "accuracy", "settings": {}, "x": NaN}')
    assert "NaN is not valid JSON" in st("report", tmp_path, ok=False)


def test_report_split_is_the_saved_weights_score_on_test(tiny_bert_dir, sentiment_dir, tmp_path):
    """--report-split test: evaluated once on the weights dev chose, the ones saved (st eval agrees)."""
    out = st(
        "finetune",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--lr",
        5e-3,
        "--report-split",
        "test",
        "--out",
        tmp_path / "run",
        "--device",
        "cpu",
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert f"test accuracy {metrics['report']['accuracy']:.4f}" in out
    evaluated = st("eval", "--checkpoint", tmp_path / "run", "--split", "test", "--device", "cpu")
    assert f"accuracy {metrics['report']['accuracy']:.4f}" in evaluated
    assert "no split 'exam'" in st(
        "finetune",
        "--task",
        "csv",
        "--data-dir",
        sentiment_dir,
        "--model",
        tiny_bert_dir,
        "--report-split",
        "exam",
        "--out",
        tmp_path / "other",
        "--device",
        "cpu",
        ok=False,
    )
