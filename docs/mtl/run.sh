#!/usr/bin/env bash
# Multi-task comparison on the packaged tasks: MT-DNN vs ticket sharing, each with and without
# single-task fine-tuning after it, over 3 seeds. Tickets: rotten_tomatoes' super ticket from the
# demo sweep; bbc_news' winning ticket at the same ratio (r = 0.2) from its own fine-tuned scores.
set -euo pipefail
OUT=${OUT:-runs/mtl}; DEMO=${DEMO:-runs/demo}
COMMON="--train-size 256 --epochs 2 --batch-size 16 --lr 5e-4 --max-length 128 --device cpu"
st finetune --task bbc_news $COMMON --out $OUT/bbc_full
st score --checkpoint $OUT/bbc_full --out $OUT/bbc_scores.json --device cpu
st prune --scores $OUT/bbc_scores.json --ratio 0.2 --checkpoint $OUT/bbc_full --out $OUT/bbc_ticket.json
for seed in 0 1 2; do
  st share --tasks rotten_tomatoes,bbc_news --no-tickets $COMMON --seed $seed --out $OUT/mtdnn-seed$seed
  st share --tasks rotten_tomatoes,bbc_news --tickets rotten_tomatoes=$DEMO/super_ticket.json \
    --tickets bbc_news=$OUT/bbc_ticket.json $COMMON --seed $seed --out $OUT/shared-seed$seed
  for method in mtdnn shared; do
    for task in rotten_tomatoes bbc_news; do
      st finetune --task $task --init $OUT/$method-seed$seed --train-size 256 --epochs 1 --batch-size 16 --lr 5e-4 --max-length 128 \
        --device cpu --seed $seed --out $OUT/$method-seed$seed-ft-$task
    done
  done
done
