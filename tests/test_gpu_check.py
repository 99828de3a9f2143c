"""docs/gpu/check.sh, the GPU checks in one command, runs end to end with --device cpu: the plumbing is
proven before a GPU is at hand (on one, the same script runs on cuda)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_cpu(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "docs" / "gpu" / "check.sh"), "--device", "cpu", "--out", str(tmp_path)],
        env={"PY": sys.executable, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = (tmp_path / "check.txt").read_text()
    assert "--device cpu" in check and "no CUDA device" in check and " passed" in check and "failed" not in check
    bench = (tmp_path / "bench_gpu.md").read_text()
    for family in ("bert", "roberta"):
        for workload in ("forward", "train step", "importance"):
            assert f"| {family} | tiny | {workload} |" in bench
        assert f"| {family} | tiny | 0.5 |" in bench  # the pruned speed-up against the FLOP ideal
