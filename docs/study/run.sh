#!/usr/bin/env bash
# The study of docs/study/PLAN.md, part by part. Every command resumes: rerun this script after an
# interruption and finished runs are skipped. Runs go to $OUT (runs/study); docs/study/summarize.py
# collects their JSON into docs/study/results/ and renders REPORT.md.
# Parts: pilot (how the sizes were chosen), rt, bbc (sweeps), mtl (multi-task), adapt (domain adaptation).
set -euo pipefail
OUT=${OUT:-runs/study}
PARTS=${*:-rt bbc mtl adapt}
export OMP_NUM_THREADS=1  # two one-thread processes beat one two-thread process on 2 cores
SEEDS=5

for part in $PARTS; do case $part in
rt)
  st sweep --task rotten_tomatoes --model minilm-l6 --train-size 1024 --epochs 2 --batch-size 32 --lr 2e-4 --max-length 64 \
    --seeds $SEEDS --control-ratios 0.3,0.6 --report-split test --jobs 2 --device cpu --out $OUT/rt ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac; done
