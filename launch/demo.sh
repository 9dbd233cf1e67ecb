#!/usr/bin/env bash
# `make demo`: a tiny Branch-Train stage on the built-in corpora, on the CPU, in minutes.
# Seed on all domains, then one branch per domain from the seed, then a perplexity table
# that shows whether each expert became best on its own domain.
#
# Sizes can be overridden: SEED_STEPS, BRANCH_STEPS, BATCH_SIZE, SEQ_LEN, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-runs/demo}"
SEED_STEPS="${SEED_STEPS:-300}"
BRANCH_STEPS="${BRANCH_STEPS:-150}"
BATCH_SIZE="${BATCH_SIZE:-16}"
SEQ_LEN="${SEQ_LEN:-128}"
DOMAINS=(code law math)
common=(--gin_file=gin/models/tiny.gin --gin.BATCH_SIZE="$BATCH_SIZE" --gin.SEQ_LEN="$SEQ_LEN"
        --gin.TrainConfig.warmup_steps=20 --gin.TrainConfig.eval_every=100000)

echo "== seed: $SEED_STEPS steps on every domain -> $OUT/seed"
launch/run.sh train "${common[@]}" --gin_file=gin/seed.gin --gin.TRAIN_STEPS="$SEED_STEPS" \
  --workdir="$OUT/seed"

runs=(--run "seed=$OUT/seed")
for domain in "${DOMAINS[@]}"; do
  echo "== branch $domain: $BRANCH_STEPS steps from the seed -> $OUT/$domain"
  launch/run.sh train "${common[@]}" --gin_file=gin/branch.gin --gin.TRAIN_STEPS="$BRANCH_STEPS" \
    --gin.DOMAIN="'$domain'" --gin.INIT_CHECKPOINT="'$OUT/seed'" --workdir="$OUT/$domain"
  runs+=(--run "$domain=$OUT/$domain")
done

echo "== held-out perplexity (bold: best per domain)"
.venv/bin/python -m bam_jax.evaluate.compare "${runs[@]}" --out "$OUT"
