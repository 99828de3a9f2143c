"""Why `st export --quantize int8` is dynamic: ONNX Runtime's dynamic and static int8 side by side.

  python bench/bench_quantize_modes.py --checkpoint DIR [--calibration 256] [--rounds 5]

On one fine-tuned checkpoint (e.g. `st finetune --task rotten_tomatoes --train-size 2000 --epochs 2`):
its fp32 ONNX export, `st.onnx_export.quantize_int8` (dynamic, per-channel int8 weights), and
`quantize_static` in QDQ format (per-channel, MinMax calibration on `--calibration` training examples)
with uint8 and with int8 activations. Prints each file's dev accuracy (ONNX Runtime) and its batch
32 × 128 time against the fp32 export's, timed round-robin in the same run (one thread, medians).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from st.data import eval_shards  # noqa: E402
from st.models import load_checkpoint  # noqa: E402
from st.onnx_accuracy import onnx_metric  # noqa: E402
from st.onnx_export import INPUTS, export_onnx, inference_session, quantize_int8  # noqa: E402
from st.pipeline import checkpoint_spec, load_split  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--calibration", type=int, default=256, help="Training examples static calibration reads.")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    _, _, task, tokenizer = checkpoint_spec(args.checkpoint)
    model = load_checkpoint(args.checkpoint)[0].eval()
    dev = load_split(task, tokenizer, task.dev_splits[0])[1]
    train = load_split(task, tokenizer, "train")[1]
    train.rows, train.labels = train.rows[: args.calibration], None

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = (b for _, b in eval_shards(train, 32, tokenizer.pad_id))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {k: batch[k].numpy() for k in INPUTS}

    tmp = Path(tempfile.mkdtemp(prefix="st-quant-"))
    files = {"fp32": tmp / "fp32.onnx", "dynamic (st)": tmp / "dynamic.onnx"}
    export_onnx(model, files["fp32"])
    quantize_int8(files["fp32"], files["dynamic (st)"])
    for name, activations in (("static QDQ u8", QuantType.QUInt8), ("static QDQ s8", QuantType.QInt8)):
        files[name] = tmp / f"{name.replace(' ', '-')}.onnx"
        quantize_static(
            str(files["fp32"]),
            str(files[name]),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=activations,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    accuracy = {name: onnx_metric(path, dev, task, tokenizer.pad_id) for name, path in files.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.encoder.config.vocab_size, (32, 128), generator=g)
    feed = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    feed["token_type_ids"] = torch.zeros_like(ids).numpy()
    sessions = {name: inference_session(path, threads=1) for name, path in files.items()}
    times = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(["logits"], feed)
    for _ in range(args.rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(["logits"], feed)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{task.name} {task.dev_splits[0]} ({len(dev)} examples), batch 32 x 128, one thread")
    for name in files:
        print(
            f"{name:>14}: {task.main_metric} {100 * accuracy[name]:.2f} "
            f"({100 * (accuracy[name] - accuracy['fp32']):+.2f} points), {median[name] * 1e3:.0f} ms, "
            f"{median['fp32'] / median[name]:.2f}x fp32, {files[name].stat().st_size / 1e6:.1f} MB"
        )


if __name__ == "__main__":
    main()
