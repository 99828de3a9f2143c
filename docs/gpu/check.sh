#!/usr/bin/env bash
# The GPU checks in one command, from the repository root or anywhere:
#   bash docs/gpu/check.sh                  on a CUDA machine: tests on cuda, the GPU benchmark, results here
#   bash docs/gpu/check.sh --device cpu --out DIR   the same plumbing on a CPU in a minute (CI runs it so)
# It runs the checks that matter on the device (tests/test_device.py: encoder parity and invariants,
# importance, pruning, fine-tune resume, ticket-sharing exactness, precision, varlen attention against
# the padded path), then bench/bench_gpu.py, and writes check.txt and bench_gpu.md to --out (default
# docs/gpu). Python: $PY, else the repository's .venv, else python3; it needs torch (a CUDA build on a
# GPU), transformers and the package's test dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEVICE=cuda
OUT=docs/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: bash docs/gpu/check.sh [--device cuda|cpu] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
if [ "$DEVICE" = cpu ]; then BENCH=(--shapes tiny --repeats 2 --warmup 1); else BENCH=(); fi
{
  echo "# docs/gpu/check.sh --device $DEVICE, $(date -u +%Y-%m-%dT%H:%MZ)"
  "$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} > "$OUT/check.txt"
status=0
"$PY" -m pytest -p no:cacheprovider tests/test_device.py --device "$DEVICE" 2>&1 | tee -a "$OUT/check.txt" || status=1
"$PY" bench/bench_gpu.py --device "$DEVICE" --out "$OUT" "${BENCH[@]}" > /dev/null || status=1
echo "bench: $OUT/bench_gpu.md" >> "$OUT/check.txt"
exit $status
