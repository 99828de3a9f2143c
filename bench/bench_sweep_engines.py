"""`st sweep --quick` on the packaged model with `--ray` (a local Ray instance) against `--jobs 2`
(the local process pool), both in the same run on this machine.

  python bench/bench_sweep_engines.py [--repeats 2] [--out runs/bench-engines]

Each repeat runs both commands one after the other, alternating which goes first, each into a new
folder, and times the whole command (start-up included: Ray's instance, the pool's processes).
Prints every wall time, the medians and their ratio (target: --ray within 15% of --jobs 2), and
checks that both engines gave the same per-run metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = {"--jobs 2": ["--jobs", "2"], "--ray": ["--ray"]}


def sweep(out: Path, engine: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cli.main", "sweep", "--quick", "--device", "cpu", "--out", str(out), *engine],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def runs(out: Path) -> dict:
    doc = json.loads((out / "results.json").read_text())
    return {(r["seed"], r["kind"], r["ratio"]): (r["selection"], r["report"], r["best_epoch"]) for r in doc["runs"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-engines"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in ENGINES}
    for i in range(args.repeats):
        order = list(ENGINES) if i % 2 == 0 else list(reversed(ENGINES))
        for name in order:
            seconds = sweep(args.out / f"{name.strip('-').replace(' ', '')}-{i}", ENGINES[name])
            times[name].append(seconds)
            print(f"repeat {i + 1}: st sweep --quick {name}: {seconds:.1f} s", flush=True)
    pool, ray = (statistics.median(times[name]) for name in ENGINES)
    print(
        f"median wall time: --jobs 2 {pool:.1f} s, --ray {ray:.1f} s; --ray / --jobs 2 = {ray / pool:.3f} "
        "(target <= 1.15)"
    )
    same = all(runs(args.out / f"jobs2-{i}") == runs(args.out / f"ray-{i}") for i in range(args.repeats))
    print(f"same per-run metrics from both engines: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
