#!/usr/bin/env bash
# The study of docs/study/PLAN.md, part by part. Every command resumes: rerun this script after an
# interruption and finished runs are skipped. Runs go to $OUT (runs/study); docs/study/summarize.py
# collects their JSON into docs/study/results/ and renders REPORT.md.
# Parts: pilot (how the sizes were chosen), rt, bbc (sweeps), mtl (multi-task), adapt (domain adaptation),
# mpnet (part 5: part 1's sweep on all-mpnet-base-v2 in bf16; `make mpnet` first), mpnet-bbc (part 6: part 2's).
set -euo pipefail
OUT=${OUT:-runs/study}
PARTS=${*:-rt bbc mtl adapt}
export OMP_NUM_THREADS=1  # two one-thread processes beat one two-thread process on 2 cores
SEEDS=5
mkdir -p $OUT/mtl
# Two one-thread runs side by side; a failed run fails the script (`wait PID` returns its status).
waitall() { for pid in $(jobs -p); do wait $pid; done; }

for part in $PARTS; do case $part in
rt)
  st sweep --task rotten_tomatoes --model minilm-l6 --train-size 1024 --epochs 2 --batch-size 32 --lr 2e-4 --max-length 64 \
    --seeds $SEEDS --control-ratios 0.3,0.6 --report-split test --jobs 2 --device cpu --out $OUT/rt ;;
bbc)
  st sweep --task bbc_news --model minilm-l6 --train-size 128 --epochs 3 --batch-size 16 --lr 2e-4 --max-length 128 \
    --seeds $SEEDS --control-ratios 0.3,0.6 --report-split test --jobs 2 --device cpu --out $OUT/bbc ;;
mtl)  # each task's super ticket from its sweep; MT-DNN and ticket sharing in parallel, then fine-tuning after each
  MT="--tasks rotten_tomatoes,bbc_news --train-size 1024 --train-sizes bbc_news=128 --epochs 2 --batch-size 16 --lr 2e-4
      --max-length 128 --report-split test --device cpu"
  for seed in $(seq 0 $((SEEDS - 1))); do
    st share $MT --no-tickets --seed $seed --out $OUT/mtl/mtdnn-seed$seed > $OUT/mtl-mtdnn-$seed.log 2>&1 &
    st share $MT --tickets rotten_tomatoes=$OUT/rt/super_ticket.json,bbc_news=$OUT/bbc/super_ticket.json --seed $seed \
      --out $OUT/mtl/shared-seed$seed > $OUT/mtl-shared-$seed.log 2>&1 &
    waitall
    for method in mtdnn shared; do
      st finetune --task rotten_tomatoes --train-size 1024 --init $OUT/mtl/$method-seed$seed --epochs 1 --batch-size 16 --lr 2e-4 \
        --max-length 128 --report-split test --seed $seed --device cpu --out $OUT/mtl/$method-seed$seed-ft-rotten_tomatoes &
      st finetune --task bbc_news --train-size 128 --init $OUT/mtl/$method-seed$seed --epochs 1 --batch-size 16 --lr 2e-4 \
        --max-length 128 --report-split test --seed $seed --device cpu --out $OUT/mtl/$method-seed$seed-ft-bbc_news &
      waitall
    done
  done ;;
adapt)  # from seed s's two multi-task models, at 1%, 3%, 10% and 100% of presidential_debates' training data
  for seed in 0 1 2; do  # 3 seeds, not 5: the session's time
    st adapt --task presidential_debates --from mtdnn=$OUT/mtl/mtdnn-seed$seed --from shared=$OUT/mtl/shared-seed$seed \
      --fractions 0.01,0.03,0.1,1 --seed $seed --seeds 1 --epochs 3 --batch-size 16 --max-length 128 --report-split test \
      --device cpu --out $OUT/adapt/seed$seed > $OUT/adapt-$seed.log 2>&1 &
    if (( seed % 2 == 1 )); then waitall; fi  # two at a time
  done
  waitall ;;
mpnet)  # part 5: part 1's sizes on a 110M encoder, bf16, 3 seeds; the pilot (seed 100) chose nothing new
  st sweep --task rotten_tomatoes --model mpnet-base --train-size 1024 --epochs 2 --batch-size 32 --max-length 64 \
    --precision bf16 --seeds 3 --control-ratios 0.3,0.6 --report-split test --jobs 2 --device cpu --out $OUT/mpnet ;;
mpnet-bbc)  # part 6: part 2's sizes on the 110M encoder, bf16, 3 seeds; lr 1e-4 by the plan's pilot rule (pilot: 60.4% < 85% at 5e-5)
  st sweep --task bbc_news --model mpnet-base --train-size 128 --epochs 3 --batch-size 16 --lr 1e-4 --max-length 128 \
    --precision bf16 --seeds 3 --control-ratios 0.3,0.6 --report-split test --jobs 2 --device cpu --out $OUT/mpnet-bbc ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac; done
