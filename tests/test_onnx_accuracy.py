"""`st export --onnx F --quantize int8`: an int8 file that runs in ONNX Runtime with its metadata, kept
only when its dev accuracy is within --max-drop of the fp32 export's (or with --force, said so)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from st.models import load_checkpoint
from st.onnx_export import example_batch, inference_session, metadata

pytest.importorskip("onnxruntime.quantization")


def run_st(*args, ok=True) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_bert_dir, sentiment_dir) -> Path:
    folder = tmp_path_factory.mktemp("int8") / "ck"
    run_st(
        *("finetune", "--task", "csv", "--data-dir", sentiment_dir, "--model", tiny_bert_dir),
        *("--epochs", 3, "--batch-size", 8, "--lr", 5e-3, "--out", folder, "--device", "cpu"),
    )
    return folder


def flipped(src, dst) -> None:
    """A "quantizer" that writes a graph whose logits are negated: every dev prediction flips."""
    import onnx

    proto = onnx.load(str(src))
    last = next(n for n in proto.graph.node if "logits" in n.output)
    last.output[list(last.output).index("logits")] = "logits_raw"
    proto.graph.node.append(onnx.helper.make_node("Neg", ["logits_raw"], ["logits"]))
    onnx.save(proto, str(dst))


def test_int8_export_runs_in_onnxruntime_with_its_labels_and_dev_check(checkpoint, tmp_path):
    import onnx

    # a tiny model on 48 dev examples: one flipped prediction is 2 points, so the default 1 would be luck
    args = ["--onnx", tmp_path / "q.onnx", "--quantize", "int8", "--max-drop", 25]
    out = run_st("export", "--checkpoint", checkpoint, *args)
    assert "int8 accuracy on dev" in out and "against the fp32 export's" in out and "kept anyway" not in out, out
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops  # int8 matrix products, not fp32 ones
    meta = metadata(tmp_path / "q.onnx")
    assert json.loads(meta["id2label"]) == {"0": "neg", "1": "pos"} and meta["st_quantized"] == "int8"
    assert json.loads(meta["st_config"])["num_layers"] == 2
    model = load_checkpoint(checkpoint)[0].eval()
    batch = example_batch(model.encoder.config, batch=4, length=12, seed=3)
    (got,) = inference_session(tmp_path / "q.onnx", threads=1).run(["logits"], {k: v.numpy() for k, v in batch.items()})
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert torch.from_numpy(got).shape == expected.shape
    assert (torch.from_numpy(got) - expected).abs().max() < 0.2  # int8 moves logits a little, not far


def test_a_drop_beyond_max_drop_is_refused_with_both_numbers_and_force_keeps_it(checkpoint, tmp_path, monkeypatch):
    import st.export

    monkeypatch.setattr(st.export, "quantize_int8", flipped)
    args = ["export", "--checkpoint", checkpoint, "--out", tmp_path / "st", "--onnx", tmp_path / "q.onnx"]
    out = run_st(*args, "--quantize", "int8", ok=False)
    assert len(out.strip().splitlines()) == 1 and "--max-drop 1" in out and "nothing was written" in out, out
    int8, fp32 = (float(x) for x in re.findall(r"\d+\.\d\d", out)[:2])  # the int8 number first
    assert int8 == pytest.approx(100 - fp32) and fp32 > 70, out  # every prediction flipped: both numbers shown
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file, no st folder, no staging or fp32 debris

    out = run_st(*args, "--quantize", "int8", "--force")
    assert "kept anyway (--force)" in out and (tmp_path / "q.onnx").exists() and (tmp_path / "st").is_dir(), out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "int8", "--max-drop", "-1"], "--max-drop -1.0: give the points"),
        (["--force"], "--max-drop and --force apply to --quantize int8"),
    ],
)
def test_bad_quantize_options_are_one_line(checkpoint, tmp_path, extra, message):
    out = run_st("export", "--checkpoint", checkpoint, "--onnx", tmp_path / "q.onnx", *extra, ok=False)
    assert message in out and len(out.strip().splitlines()) == 1 and not (tmp_path / "q.onnx").exists(), out


def test_quantize_needs_an_onnx_file(checkpoint, tmp_path):
    out = run_st("export", "--checkpoint", checkpoint, "--out", tmp_path / "st", "--quantize", "int8", ok=False)
    assert "of an --onnx FILE export" in out and len(out.strip().splitlines()) == 1 and not (tmp_path / "st").exists()
