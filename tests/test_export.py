"""Exports: Hugging Face folders that load in transformers 4.57.6 and 5.x with st's logits, ONNX files
that run in onnxruntime with st's logits, round trips back into st, and refusals."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from st.errors import UserError
from st.export import export_checkpoint, export_hf, export_st, hf_state, load_hf_classifier
from st.models import (
    Bert,
    BertClassifier,
    BertConfig,
    load_checkpoint,
    load_pretrained,
    resolve_model_dir,
    save_checkpoint,
)
from st.onnx_export import example_batch, export_onnx, inference_session
from st.prune import prune_classifier
from st.tickets import Ticket

ROOT = Path(__file__).resolve().parents[1]
L, H, D, F = 3, 4, 16, 32
DH = D // H
# Uneven heads per layer (3, 2, 1 kept) and the middle FFN block removed.
HEAD = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.float32)
FFN = torch.tensor([1.0, 0.0, 1.0])


def tiny_classifier(seed=0, num_labels=3) -> BertClassifier:
    """Large random weights and biases everywhere, so a wrong slice or a lost bias shows in the logits."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=D, num_layers=L, num_heads=H, intermediate_size=F, max_position_embeddings=32
    )
    model = BertClassifier(Bert(config), num_labels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- Hugging Face: transformers 4.57.6 in this process, 5.x in a subprocess ----------------------

HF_LOGITS = """
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers
transformers.logging.set_verbosity_error()
batch = {k: torch.tensor(v) for k, v in json.loads(sys.argv[1]).items()}
out = {"version": transformers.__version__}
for folder in sys.argv[2:]:
    try:
        model, info = transformers.BertForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    except Exception as e:
        out[folder] = {"error": type(e).__name__}
        continue
    with torch.no_grad():
        logits = model.eval()(**batch).logits.tolist()
        out[folder] = {"logits": logits, "info": {k: [str(x) for x in v] for k, v in info.items()}}
print(json.dumps(out))
"""


def transformers5(batch: dict, *folders: Path) -> dict:
    """{folder: {"logits"} or {"error"}} from transformers 5.x, which the Makefile's test set-up installs
    into a --target folder; it runs on this venv's torch."""
    target = Path(os.environ.get("ST_TRANSFORMERS5", ROOT / ".venv" / "tf5"))
    if not (target / "transformers").is_dir():
        pytest.fail(f"transformers 5 is not installed in {target}: run `make test` (its set-up installs it)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    args = [json.dumps({k: v.tolist() for k, v in batch.items()}), *map(str, folders)]
    run = subprocess.run([sys.executable, "-c", HF_LOGITS, *args], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out.pop("version").startswith("5."), "ST_TRANSFORMERS5 must hold transformers 5.x"
    return {Path(k): v for k, v in out.items()}


def transformers4(folder: Path):
    transformers = pytest.importorskip("transformers")
    assert transformers.__version__ == "4.57.6"
    model, info = transformers.BertForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


@pytest.fixture(scope="module")
def minilm_exports(tmp_path_factory):
    """MiniLM-L6 (real weights) with a 3-label head, pruned unevenly (2 FFN blocks removed), exported
    in both layouts; (pruned model, dense folder, pruned-heads folder, padded batch of pairs)."""
    tmp = tmp_path_factory.mktemp("minilm")
    folder = resolve_model_dir("minilm-l6")
    torch.manual_seed(0)
    model = BertClassifier(load_pretrained(folder), num_labels=3).eval()
    c = model.encoder.config
    g = torch.Generator().manual_seed(11)
    head = (torch.rand(c.num_layers, c.num_heads, generator=g) > 0.4).float()
    head[:, 0] = 1  # every layer keeps one head at least
    ffn = torch.ones(c.num_layers)
    ffn[[1, 4]] = 0
    pruned = export_hf(
        model, tmp / "dense", ["no", "maybe", "yes"], head_mask=head, ffn_mask=ffn, tokenizer_from=folder
    )
    export_hf(model, tmp / "pruned_heads", ["no", "maybe", "yes"], layout="pruned-heads", head_mask=head, ffn_mask=ffn)
    assert len({int(n) for n in head.sum(1)}) > 1  # uneven
    return pruned, tmp / "dense", tmp / "pruned_heads", example_batch(c, batch=4, length=24, seed=5)


def test_dense_export_loads_in_transformers_4_and_5_with_st_logits(minilm_exports):
    pruned, dense, pruned_heads, batch = minilm_exports
    ours = logits(pruned, batch)
    written = json.loads((dense / "config.json").read_text())
    assert "pruned_heads" not in written and written["id2label"] == {"0": "no", "1": "maybe", "2": "yes"}
    assert (dense / "vocab.txt").exists()

    hf4 = transformers4(dense)
    assert hf4.config.id2label == {0: "no", 1: "maybe", 2: "yes"}
    with torch.no_grad():
        out = hf4(**batch, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ours, atol=1e-5, rtol=0)
    real = batch["attention_mask"].bool()  # padded positions are not compared
    torch.testing.assert_close(out.hidden_states[-1][real], pruned.encoder(**batch)[real], atol=1e-5, rtol=1e-5)

    hf5 = transformers5(batch, dense, pruned_heads)
    assert not any(hf5[dense]["info"].values()), hf5[dense]["info"]
    torch.testing.assert_close(torch.tensor(hf5[dense]["logits"]), ours, atol=1e-5, rtol=0)
    # What the pruned-heads option's help says: transformers 5 has no head pruning and refuses it.
    assert "error" in hf5[pruned_heads]


def test_pruned_heads_export_loads_in_transformers_4(minilm_exports):
    pruned, _, pruned_heads, batch = minilm_exports
    written = json.loads((pruned_heads / "config.json").read_text())
    c = pruned.encoder.config
    assert written["pruned_heads"] == {
        str(i): sorted(set(range(c.num_heads)) - set(c.layer_heads(i)))
        for i in range(c.num_layers)
        if len(c.layer_heads(i)) < c.num_heads
    }
    with torch.no_grad():
        torch.testing.assert_close(
            transformers4(pruned_heads)(**batch).logits, logits(pruned, batch), atol=1e-5, rtol=0
        )


def test_tiny_exports_regression_and_unsorted_heads_in_both_versions(tmp_path):
    """A regression head, and a model whose kept heads are stored out of order (HF wants them sorted)."""
    model = tiny_classifier(5, num_labels=1)
    pruned = prune_classifier(model, HEAD, FFN)
    c = pruned.encoder.config
    reversed_config = BertConfig.from_dict({**c.to_dict(), "kept_heads": tuple(k[::-1] for k in c.kept_heads)})
    shuffled = BertClassifier(Bert(reversed_config), 1).eval()
    state = pruned.state_dict()
    for i, kept in enumerate(c.kept_heads):
        rows = (torch.arange(len(kept) - 1, -1, -1)[:, None] * DH + torch.arange(DH)).reshape(-1)
        p = f"encoder.layers.{i}.attention."
        for name in ("qkv.weight", "qkv.bias"):
            state[p + name] = torch.cat([block[rows] for block in state[p + name].chunk(3)])
        state[p + "out.weight"] = state[p + "out.weight"][:, rows]
    shuffled.load_state_dict(state)
    batch = example_batch(c, batch=3, length=9)
    torch.testing.assert_close(logits(shuffled, batch), logits(pruned, batch), atol=1e-5, rtol=0)
    for layout in ("dense", "pruned-heads"):
        a, b = hf_state(pruned, layout), hf_state(shuffled, layout)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), layout
        export_hf(shuffled, tmp_path / layout, layout=layout)
        hf = transformers4(tmp_path / layout)
        assert hf.config.problem_type == "regression" and hf.num_labels == 1
        with torch.no_grad():
            torch.testing.assert_close(hf(**batch).logits, logits(pruned, batch), atol=1e-5, rtol=0)
    hf5 = transformers5(batch, tmp_path / "dense")
    torch.testing.assert_close(
        torch.tensor(hf5[tmp_path / "dense"]["logits"]), logits(pruned, batch), atol=1e-5, rtol=0
    )


def test_dense_layout_is_zero_exactly_where_pruned():
    state = hf_state(prune_classifier(tiny_classifier(1), HEAD, FFN), "dense")
    for i in range(L):
        p = f"bert.encoder.layer.{i}."
        for h in range(H):
            rows = slice(h * DH, (h + 1) * DH)
            gone = HEAD[i, h] == 0
            for qkv in ("query", "key", "value"):
                assert (state[p + f"attention.self.{qkv}.weight"][rows] == 0).all() == gone
                assert (state[p + f"attention.self.{qkv}.bias"][rows] == 0).all() == gone
            assert (state[p + "attention.output.dense.weight"][:, rows] == 0).all() == gone
        ffn_gone = FFN[i] == 0
        for name in (
            "intermediate.dense.weight",
            "intermediate.dense.bias",
            "output.dense.weight",
            "output.dense.bias",
        ):
            assert (state[p + name] == 0).all() == ffn_gone
        assert state[p + "attention.output.dense.bias"].abs().sum() > 0  # a pruned head still leaves the bias


# ---- reading exports back into st -----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["dense", "pruned-heads"])
def test_hf_exports_round_trip_into_st(tmp_path, layout):
    model = tiny_classifier(2)
    small = export_st(model, tmp_path / "st", head_mask=HEAD, ffn_mask=FFN, task="rte")
    export_hf(model, tmp_path / "hf", ["a", "b", "c"], layout=layout, head_mask=HEAD, ffn_mask=FFN)
    batch = example_batch(small.encoder.config, batch=3, length=11, seed=3)
    expected = logits(small, batch)

    back, cfg = load_hf_classifier(tmp_path / "hf")
    assert cfg["id2label"] == {"0": "a", "1": "b", "2": "c"}
    torch.testing.assert_close(logits(back.eval(), batch), expected, atol=1e-5, rtol=0)
    if layout == "pruned-heads":  # heads load at their size through pruned_heads; FFN width is HF's
        assert back.encoder.config.kept_heads == small.encoder.config.kept_heads
    else:
        assert back.encoder.config.kept_heads is None and n_params(back) == n_params(model)

    slim, _ = load_hf_classifier(tmp_path / "hf", remove_zeros=True)
    assert slim.encoder.config == small.encoder.config
    assert n_params(slim) == n_params(small) == n_params(load_checkpoint(tmp_path / "st")[0])
    torch.testing.assert_close(logits(slim.eval(), batch), expected, atol=1e-5, rtol=0)
    encoder = load_pretrained(
        tmp_path / "hf", remove_zeros=True
    ).eval()  # the encoder alone, as `st finetune --model` reads it
    assert encoder.config == small.encoder.config
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(encoder(**batch)[real], small.encoder(**batch)[real], atol=1e-5, rtol=0)


def test_finetune_starts_from_hf_exports_of_either_layout(tmp_path, tiny_bert_dir, sentiment_dir):
    """`st finetune --model` on an export: pruned_heads loads at its size, a dense export as it is."""
    model = BertClassifier(load_pretrained(tiny_bert_dir), 2).eval()
    head = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.float32)
    for layout in ("dense", "pruned-heads"):
        export_hf(
            model,
            tmp_path / layout,
            layout=layout,
            head_mask=head,
            ffn_mask=torch.tensor([1.0, 0.0]),
            tokenizer_from=tiny_bert_dir,
        )
        st(
            "finetune",
            "--task",
            "csv",
            "--data-dir",
            sentiment_dir,
            "--model",
            tmp_path / layout,
            "--epochs",
            1,
            "--batch-size",
            16,
            "--train-size",
            32,
            "--out",
            tmp_path / f"ft-{layout}",
            "--device",
            "cpu",
        )
        tuned, _ = load_checkpoint(tmp_path / f"ft-{layout}")
        assert tuned.encoder.config.kept_heads == (None if layout == "dense" else ((0, 2, 3), (2,)))


def test_load_hf_classifier_refuses_a_folder_without_a_task_head(tiny_bert_dir):
    with pytest.raises(UserError, match="not a Hugging Face sequence-classification folder"):
        load_hf_classifier(tiny_bert_dir)


# ---- ONNX --------------------------------------------------------------------------------------


def onnx_logits(path: Path, batch: dict) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    (out,) = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "pruned"])
def test_onnx_export_matches_st_on_a_padded_batch_of_pairs(tmp_path, pruned):
    import onnx

    model = tiny_classifier(3)
    if pruned:
        model = prune_classifier(model, HEAD, FFN)
    error = export_onnx(model, tmp_path / "m.onnx", ["neg", "neutral", "pos"])
    assert error <= 1e-4
    # Batch and sequence sizes the export never saw: both axes are dynamic.
    for batch in (
        example_batch(model.encoder.config, batch=5, length=13, seed=9),
        example_batch(model.encoder.config, batch=1, length=30),
    ):
        assert (batch["attention_mask"] == 0).any() or batch["input_ids"].shape[0] == 1
        assert (batch["token_type_ids"] == 1).any()
        torch.testing.assert_close(onnx_logits(tmp_path / "m.onnx", batch), logits(model, batch), atol=1e-4, rtol=0)
    # The session the README's benchmark uses (SkipLayerNormFusion off) computes the same.
    (tuned,) = inference_session(tmp_path / "m.onnx", threads=1).run(
        ["logits"], {k: v.numpy() for k, v in batch.items()}
    )
    torch.testing.assert_close(torch.from_numpy(tuned), logits(model, batch), atol=1e-4, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["id2label"]) == {"0": "neg", "1": "neutral", "2": "pos"}
    assert json.loads(props["st_config"])["kept_heads"] == ([[0, 2, 3], [1, 2], [2]] if pruned else None)


def test_onnx_that_does_not_match_is_not_kept(tmp_path, monkeypatch):
    import st.onnx_export

    monkeypatch.setattr(st.onnx_export, "TOLERANCE", -1.0)  # no graph can pass
    with pytest.raises(RuntimeError, match="nothing was written"):
        export_onnx(tiny_classifier(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ---- st export: all three from a checkpoint, and refusals -------------------------------------


@pytest.fixture
def checkpoint(tmp_path, tiny_bert_dir):
    model = tiny_classifier(4, num_labels=2)
    folder = tmp_path / "ck"
    save_checkpoint(folder, model, task="csv", labels=["neg", "pos"])
    (folder / "vocab.txt").write_text((tiny_bert_dir / "vocab.txt").read_text())
    ticket = Ticket(tuple(tuple(int(v) for v in row) for row in HEAD), tuple(int(v) for v in FFN), 0.4, "winning")
    ticket.save(tmp_path / "ticket.json")
    return folder, model, tmp_path / "ticket.json"


def st(*args, ok=True) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    assert "Traceback" not in result.output
    return result.output


def test_cli_export_writes_st_hf_and_onnx_that_agree(checkpoint, tmp_path):
    folder, model, ticket = checkpoint
    out = st(
        "export",
        "--checkpoint",
        folder,
        "--ticket",
        ticket,
        "--out",
        tmp_path / "st",
        "--hf",
        tmp_path / "hf",
        "--onnx",
        tmp_path / "onnx" / "model.onnx",
    )
    assert "-> " in out and "model.onnx" in out
    small, cfg = load_checkpoint(tmp_path / "st")
    assert cfg["ticket"]["kind"] == "winning" and (tmp_path / "st" / "vocab.txt").exists()
    batch = example_batch(small.encoder.config, batch=3, length=12, seed=4)
    expected = logits(prune_classifier(model, HEAD, FFN), batch)
    torch.testing.assert_close(logits(small.eval(), batch), expected, atol=1e-5, rtol=0)
    hf, hf_cfg = load_hf_classifier(tmp_path / "hf", remove_zeros=True)
    assert hf_cfg["id2label"] == {"0": "neg", "1": "pos"} and "pruned_heads" not in hf_cfg
    torch.testing.assert_close(logits(hf.eval(), batch), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(onnx_logits(tmp_path / "onnx" / "model.onnx", batch), expected, atol=1e-4, rtol=0)

    st("export", "--checkpoint", folder, "--hf", tmp_path / "hf4", "--hf-layout", "pruned-heads", "--ticket", ticket)
    assert json.loads((tmp_path / "hf4" / "config.json").read_text())["pruned_heads"] == {
        "0": [1],
        "1": [0, 3],
        "2": [0, 1, 3],
    }


def test_existing_outputs_are_refused_before_anything_is_written(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "m.onnx").write_text("not ours")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.onnx").mkdir()  # a folder where the file would go
    for args, message in (
        (["--out", tmp_path / "new", "--hf", tmp_path / "taken"], "taken already exists"),
        (["--out", tmp_path / "new", "--onnx", tmp_path / "m.onnx"], "m.onnx already exists"),
        (["--out", tmp_path / "new", "--hf", tmp_path / "new"], "same path"),
        (["--out", tmp_path / "new", "--onnx", tmp_path / "model.bin"], "name the file *.onnx"),
        (["--onnx", tmp_path / "empty.onnx"], "is a directory"),
        ([], "nothing to export"),
    ):
        out = st("export", "--checkpoint", folder, *args, ok=False)
        assert message in out and len(out.strip().splitlines()) == 1, out
        assert not (tmp_path / "new").exists()
    assert (tmp_path / "m.onnx").read_text() == "not ours" and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    st("export", "--checkpoint", folder, "--out", tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(UserError, match="layout"):
        export_checkpoint(folder, hf_out=tmp_path / "x", hf_layout="sparse")
    with pytest.raises(UserError, match="empty.onnx already exists"):
        export_checkpoint(folder, onnx_out=tmp_path / "empty.onnx")


def test_onnx_without_the_extra_says_how_to_install_it(checkpoint, tmp_path, monkeypatch):
    folder, _, _ = checkpoint
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    out = st("export", "--checkpoint", folder, "--out", tmp_path / "st", "--onnx", tmp_path / "m.onnx", ok=False)
    assert "pip install 'st[onnx]'" in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "st").exists() and not (tmp_path / "m.onnx").exists()  # refused before writing anything


@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int):
    """A tmpfs of `size_kb` KiB at `folder` (root only: skip where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_midway_leaves_no_output_and_the_corrected_command_runs(checkpoint, tmp_path):
    """--out fits on the disk, --hf does not: nothing is left behind, so the same command, once there
    is room, is not refused for a half-done export."""
    folder, _, _ = checkpoint
    st("export", "--checkpoint", folder, "--out", tmp_path / "probe")
    pages = sum(-(-p.stat().st_size // 4096) for p in (tmp_path / "probe").rglob("*") if p.is_file())
    with small_disk(tmp_path / "disk", 4 * pages + 8) as disk:  # room for one export (in 4 KiB pages), not two
        args = ["export", "--checkpoint", folder, "--out", disk / "st", "--hf", disk / "hf"]
        out = st(*args, ok=False)
        assert "No space left on device" in out and "no output was left half-written" in out, out
        assert len(out.strip().splitlines()) == 1 and list(disk.iterdir()) == [], list(disk.iterdir())
        st("export", "--checkpoint", folder, "--out", disk / "st")  # the corrected command (one output)
        assert load_checkpoint(disk / "st")[0] is not None


def test_an_unwritable_second_output_is_refused_before_the_first_is_written(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    (tmp_path / "a-file").write_text("x")
    out = st(
        "export", "--checkpoint", folder, "--out", tmp_path / "st", "--onnx", tmp_path / "a-file" / "m.onnx", ok=False
    )
    assert len(out.strip().splitlines()) == 1 and not (tmp_path / "st").exists(), out
    st("export", "--checkpoint", folder, "--out", tmp_path / "st")


def test_an_interrupted_export_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    import st.export

    folder, _, _ = checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # SIGTERM becomes this in the CLI

    monkeypatch.setattr(st.export, "export_hf", interrupted)
    result = CliRunner().invoke(
        cli, ["export", "--checkpoint", str(folder), "--out", str(tmp_path / "st"), "--hf", str(tmp_path / "hf")]
    )
    assert result.exit_code == 130 and "no output was left half-written" in result.output, result.output
    assert not (tmp_path / "st").exists() and not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging debris
