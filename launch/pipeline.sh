#!/usr/bin/env bash
# The whole Branch-Train-Mix experiment, stage by stage:
#   seed -> one branch per domain -> upcycle (btx, bam, bam_shared_kv) -> mix finetunes
#   (BTX; BAM and BAM shared-KV data-matched and compute-matched to BTX) -> eval -> comparison.
#
#   launch/pipeline.sh [--dry-run] [STAGE ...]     (STAGE: seed branch upcycle mix eval compare; default all)
#
# Every training command goes through launch/run.sh, so with TPU_NAME set it runs on every worker
# of that pod slice. Branches are independent: BRANCH_TPUS="slice-a slice-b slice-c" runs them at
# once, one per slice; PARALLEL_BRANCHES=1 runs them at once on this machine; by default they run
# one after another. A finished stage leaves OUT/.done/<stage> and is skipped on rerun; a run
# stopped in the middle resumes from its last checkpoint.
#
# Settings (environment): OUT, MODEL (a gin file), SEED_STEPS, BRANCH_STEPS, MIX_STEPS,
# BATCH_SIZE, SEQ_LEN, DOMAINS, EXTRA (more train flags, e.g. '--gin.TrainConfig.warmup_steps=20').
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=()
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=(--dry-run); shift; fi
stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(seed branch upcycle mix eval compare)

OUT="${OUT:-runs/pipeline}"
MODEL="${MODEL:-gin/models/tiny.gin}"
SEED_STEPS="${SEED_STEPS:-2000}"
BRANCH_STEPS="${BRANCH_STEPS:-1000}"
MIX_STEPS="${MIX_STEPS:-1000}"
BATCH_SIZE="${BATCH_SIZE:-32}"
SEQ_LEN="${SEQ_LEN:-256}"
read -r -a DOMAINS <<< "${DOMAINS:-code law math}"
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a BRANCH_TPUS <<< "${BRANCH_TPUS:-}"
common=(--gin_file="$MODEL" --gin.BATCH_SIZE="$BATCH_SIZE" --gin.SEQ_LEN="$SEQ_LEN" "${EXTRA[@]}")
MIXES=(btx bam bam_shared_kv)

wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }
done_marker() { echo "$OUT/.done/$1"; }

# run STAGE_NAME COMMAND...: skip if finished before; mark finished after.
run() {
  local name="$1"; shift
  if [[ -e "$(done_marker "$name")" ]]; then echo "== $name: finished before, skipped"; return; fi
  echo "== $name"
  if [[ ${#dry_run[@]} -gt 0 ]]; then
    if [[ "$1" == launch/run.sh ]]; then "$@"; else printf '%q ' "$@"; echo; fi
    return
  fi
  "$@"
  mkdir -p "$OUT/.done" && touch "$(done_marker "$name")"
}

if wants seed; then
  run seed launch/run.sh "${dry_run[@]}" train "${common[@]}" --gin_file=gin/seed.gin \
    --gin.TRAIN_STEPS="$SEED_STEPS" --workdir="$OUT/seed"
fi

if wants branch; then
  pids=()
  for i in "${!DOMAINS[@]}"; do
    domain="${DOMAINS[$i]}"
    cmd=(run "branch_$domain" launch/run.sh "${dry_run[@]}" train "${common[@]}" --gin_file=gin/branch.gin
         --gin.TRAIN_STEPS="$BRANCH_STEPS" --gin.DOMAIN="'$domain'" --gin.INIT_CHECKPOINT="'$OUT/seed'"
         --workdir="$OUT/$domain")
    slice="${TPU_NAME:-}"
    [[ ${#BRANCH_TPUS[@]} -gt 0 ]] && slice="${BRANCH_TPUS[$((i % ${#BRANCH_TPUS[@]}))]}"
    if [[ (${#BRANCH_TPUS[@]} -gt 0 || "${PARALLEL_BRANCHES:-0}" == 1) && ${#dry_run[@]} -eq 0 ]]; then
      TPU_NAME="$slice" "${cmd[@]}" & pids+=($!)  # concurrent
    else
      TPU_NAME="$slice" "${cmd[@]}"  # one after another (a dry run always: its lines stay in order)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
fi

experts=$(IFS=,; echo "${DOMAINS[*]/#/$OUT/}")
if wants upcycle; then
  for method in "${MIXES[@]}"; do
    # Host work on the shared filesystem: it runs here, not on the pod's workers.
    run "upcycle_$method" .venv/bin/bam-jax upcycle --method="$method" --seed="$OUT/seed" \
      --experts="$experts" --out="$OUT/${method}_init" --overwrite
  done
fi

if wants mix; then
  mix() {  # mix NAME METHOD [FLAGS...]
    local name="$1" method="$2"; shift 2
    run "mix_$name" launch/run.sh "${dry_run[@]}" train --gin_file="$OUT/${method}_init/model.gin" \
      --gin_file="gin/mix_$method.gin" "${common[@]:1}" --gin.TRAIN_STEPS="$MIX_STEPS" "$@" --workdir="$OUT/$name"
  }
  mix btx btx
  for method in bam bam_shared_kv; do
    # data-matched: the tokens BTX trained on; compute-matched: the FLOPs BTX spent.
    mix "$method" "$method" --gin.TrainConfig.match_run="'$OUT/btx'" --gin.TrainConfig.match="'tokens'"
    mix "${method}_compute" "$method" --gin.TrainConfig.match_run="'$OUT/btx'" --gin.TrainConfig.match="'flops'"
  done
fi

RUNS=(seed "${DOMAINS[@]}" btx bam bam_shared_kv bam_compute bam_shared_kv_compute)
if wants eval; then
  for name in "${RUNS[@]}"; do
    run "eval_$name" .venv/bin/bam-jax eval --workdir="$OUT/$name"
  done
fi

if wants compare; then  # cheap: never skipped
  cmd=(.venv/bin/python -m bam_jax.evaluate.compare --out "$OUT" --order bam,bam_shared_kv,btx,seed)
  for name in "${RUNS[@]}"; do cmd+=(--run "$name=$OUT/$name"); done
  echo "== compare"
  if [[ ${#dry_run[@]} -gt 0 ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
fi
