#!/usr/bin/env bash
# The whole Branch-Train-Mix experiment, stage by stage:
#   seed -> one branch per domain -> upcycle (btx, bam, bam_shared_kv, lory) -> mix finetunes -> eval
#   -> comparison (OUT/comparison.md and .json).
#
#   launch/pipeline.sh [--dry-run] [STAGE ...]
#     STAGE: seed branch upcycle mix eval compare (the default), import, export
#
# Mix runs: btx_top1 is the BAM paper's baseline (BAM's top-1 FFN routing, no attention experts)
# and every other mix is matched to it; btx_top2 is BTX with its own top-2 routing, for
# reference; bam and bam_shared_kv train on btx_top1's tokens (data-matched), bam_compute and
# bam_shared_kv_compute spend its FLOPs (compute-matched); lory (the FFNs as Lory's merged experts,
# no attention experts) trains on btx_top1's tokens as well. Each run named in RERUNS is trained a
# second time with other seeds (router init, data order) as NAME_seed1: the differences give the
# run-to-run noise that the comparison weighs every gap against.
#
# Every bam-jax command goes through launch/run.sh: with TPU_NAME set, training and eval run on
# every worker of that pod slice and the host commands (upcycle, import-hf, export-hf) on worker 0;
# with LOCAL_PROCESSES=N, training and eval run as N processes on this machine. On a pod, OUT is a
# bucket (OUT=gs://BUCKET/DIR) or a filesystem every worker shares. Branches are independent:
# BRANCH_TPUS="slice-a slice-b slice-c" runs them at once, one per slice; PARALLEL_BRANCHES=1 runs
# them at once on this machine; by default they run one after another. A finished stage leaves a
# marker, OUT/.done/<stage> (for a bucket: runs/.done/<OUT's name>/<stage> on this machine), and
# is skipped on rerun; a run stopped in the middle resumes from its last checkpoint.
#
# Settings (environment): OUT, MODEL (a gin file), SEED_STEPS, BRANCH_STEPS, MIX_STEPS,
# BATCH_SIZE, SEQ_LEN, DOMAINS, MIXES (the mix runs, default all; btx_top1 is required), RERUNS
# (e.g. "btx_top1 bam"), EXTRA (more train flags, e.g.
# '--gin.TrainConfig.warmup_steps=20'), TASKS (the eval stage's downstream tasks through
# lm-evaluation-harness, default bam_domains; empty for perplexity only), TASK_LIMIT (items per task)
# and LOCAL_PROCESSES (run every device stage as that many JAX processes on this machine).
#
# From Hugging Face models: HF_SEED=DIR HF_EXPERTS=DIR,DIR,... (a base model and its finetunes)
# replace the seed and branch stages by `bam-jax import-hf` (stage `import`); the experts are named
# by DOMAINS, in order (default: their directory names). The mixes then train on the models' own
# tokenizer, and a last stage `export` writes each mix run as a Hugging Face model to OUT/hf/NAME
# (EXPORT_DTYPE, default bfloat16). MODEL is not read: the imported models carry their shape.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=()
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=(--dry-run); shift; fi
stages=("$@")
HF_SEED="${HF_SEED:-}"
IFS=, read -r -a HF_EXPERTS <<< "${HF_EXPERTS:-}"
if [[ -n "$HF_SEED" ]]; then
  [[ ${#HF_EXPERTS[@]} -ge 1 ]] || { echo "error: HF_SEED needs HF_EXPERTS=DIR,DIR,... (the finetunes)" >&2; exit 2; }
  [[ -n "${DOMAINS:-}" ]] || DOMAINS="$(for d in "${HF_EXPERTS[@]}"; do basename "$d"; done | tr '\n' ' ')"
  [[ ${#stages[@]} -eq 0 ]] && stages=(import upcycle mix eval compare export)
elif [[ ${#HF_EXPERTS[@]} -gt 0 ]]; then
  echo "error: HF_EXPERTS needs HF_SEED=DIR (the base model they were finetuned from)" >&2; exit 2
fi
[[ ${#stages[@]} -eq 0 ]] && stages=(seed branch upcycle mix eval compare)

OUT="${OUT:-runs/pipeline}"
MODEL="${MODEL:-gin/models/tiny.gin}"
SEED_STEPS="${SEED_STEPS:-2000}"
BRANCH_STEPS="${BRANCH_STEPS:-1000}"
MIX_STEPS="${MIX_STEPS:-1000}"
BATCH_SIZE="${BATCH_SIZE:-32}"
TASKS="${TASKS-bam_domains}"      # downstream tasks of the eval stage (empty: perplexity only)
TASK_LIMIT="${TASK_LIMIT:-}"      # at most this many items per task (default: all)
SEQ_LEN="${SEQ_LEN:-256}"
read -r -a DOMAINS <<< "${DOMAINS:-code law math}"
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a BRANCH_TPUS <<< "${BRANCH_TPUS:-}"
read -r -a RERUNS <<< "${RERUNS:-}"
launch=(launch/run.sh)  # every device command: here, on a pod (TPU_NAME), or as N local processes
[[ -n "${LOCAL_PROCESSES:-}" ]] && launch+=(--local_processes="$LOCAL_PROCESSES")
host=(launch/run.sh "${dry_run[@]}")  # host commands: here, or on a pod's worker 0
read -r -a MIXES <<< "${MIXES:-btx_top1 btx_top2 bam bam_compute bam_shared_kv bam_shared_kv_compute lory}"
common=(--gin_file="$MODEL" --gin.BATCH_SIZE="$BATCH_SIZE" --gin.SEQ_LEN="$SEQ_LEN" "${EXTRA[@]}")
# Each mix run: the upcycle method of its initial checkpoint, its run gin file, and what it
# matches of btx_top1's budget (tokens: data-matched, flops: compute-matched).
declare -A INIT=([btx_top1]=btx [btx_top2]=btx [bam]=bam [bam_compute]=bam
                 [bam_shared_kv]=bam_shared_kv [bam_shared_kv_compute]=bam_shared_kv [lory]=lory)
declare -A GIN=([btx_top1]=mix_btx_top1 [btx_top2]=mix_btx [bam]=mix_bam [bam_compute]=mix_bam
                [bam_shared_kv]=mix_bam_shared_kv [bam_shared_kv_compute]=mix_bam_shared_kv [lory]=mix_lory)
declare -A MATCH=([btx_top1]=none [btx_top2]=tokens [bam]=tokens [bam_compute]=flops
                  [bam_shared_kv]=tokens [bam_shared_kv_compute]=flops [lory]=tokens)
all_in() { local x; for x in $1; do [[ " $2 " == *" $x "* ]] || return 1; done; }  # all_in "A B" "LIST"
if [[ -n "$HF_SEED" && ${#HF_EXPERTS[@]} -ne ${#DOMAINS[@]} ]]; then
  echo "error: DOMAINS names ${#DOMAINS[@]} experts but HF_EXPERTS has ${#HF_EXPERTS[@]}" >&2; exit 2
fi
all_in "${MIXES[*]}" "${!INIT[*]}" || { echo "error: MIXES='${MIXES[*]}': mix runs are ${!INIT[*]}" >&2; exit 2; }
all_in "btx_top1" "${MIXES[*]}" || { echo "error: MIXES must hold btx_top1: the other mixes match it" >&2; exit 2; }
all_in "${RERUNS[*]}" "${MIXES[*]}" || { echo "error: RERUNS='${RERUNS[*]}' must name runs in MIXES" >&2; exit 2; }
mapfile -t METHODS < <(for name in "${MIXES[@]}"; do echo "${INIT[$name]}"; done | awk '!seen[$0]++')

wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }
if [[ "$OUT" == *://* ]]; then DONE="runs/.done/${OUT//[:\/]/_}"; else DONE="$OUT/.done"; fi
done_marker() { echo "$DONE/$1"; }

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
  mkdir -p "$DONE" && touch "$(done_marker "$name")"
}

if wants import; then  # host work: Hugging Face models become the seed and the experts
  run import_seed "${host[@]}" import-hf --hf_dir="$HF_SEED" --out="$OUT/seed" --overwrite
  for i in "${!DOMAINS[@]}"; do
    run "import_${DOMAINS[$i]}" "${host[@]}" import-hf --hf_dir="${HF_EXPERTS[$i]}" \
      --out="$OUT/${DOMAINS[$i]}" --overwrite
  done
fi

if wants seed; then
  run seed "${launch[@]}" "${dry_run[@]}" train "${common[@]}" --gin_file=gin/seed.gin \
    --gin.TRAIN_STEPS="$SEED_STEPS" --workdir="$OUT/seed"
fi

if wants branch; then
  pids=()
  for i in "${!DOMAINS[@]}"; do
    domain="${DOMAINS[$i]}"
    cmd=(run "branch_$domain" "${launch[@]}" "${dry_run[@]}" train "${common[@]}" --gin_file=gin/branch.gin
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
  upcycle() {  # upcycle METHOD OUT_NAME [FLAGS...]; host work
    local method="$1" name="$2"; shift 2
    run "upcycle_$name" "${host[@]}" upcycle --method="$method" --seed="$OUT/seed" \
      --experts="$experts" --out="$OUT/${name}_init" --overwrite "$@"
  }
  for method in "${METHODS[@]}"; do upcycle "$method" "$method"; done
  for name in "${RERUNS[@]}"; do upcycle "${INIT[$name]}" "${name}_seed1" --router_seed=1; done
fi

if wants mix; then
  mix() {  # mix NAME INIT_NAME [FLAGS...]
    local name="$1" init="$2" budget=(); shift 2
    local base="${name%_seed1}"
    [[ "${MATCH[$base]}" == none ]] ||
      budget=(--gin.TrainConfig.match_run="'$OUT/btx_top1'" --gin.TrainConfig.match="'${MATCH[$base]}'")
    run "mix_$name" "${launch[@]}" "${dry_run[@]}" train --gin_file="$OUT/${init}_init/model.gin" \
      --gin_file="gin/${GIN[$base]}.gin" "${common[@]:1}" --gin.TRAIN_STEPS="$MIX_STEPS" "${budget[@]}" "$@" \
      --workdir="$OUT/$name"
  }
  for name in "${MIXES[@]}"; do mix "$name" "${INIT[$name]}"; done
  for name in "${RERUNS[@]}"; do mix "${name}_seed1" "${name}_seed1" --gin.TrainConfig.seed=1; done
fi

RUNS=(seed "${DOMAINS[@]}" "${MIXES[@]}")
if wants eval; then  # one process for every run not evaluated yet: they share the validation batches
  todo=()
  for name in "${RUNS[@]}" "${RERUNS[@]/%/_seed1}"; do
    if [[ -e "$(done_marker "eval_$name")" ]]; then echo "== eval_$name: finished before, skipped"; else todo+=("$name"); fi
  done
  if [[ ${#todo[@]} -gt 0 ]]; then
    echo "== eval ${todo[*]}"
    # At the training length: an imported model's own gin file sets a longer one.
    cmd=("${launch[@]}" "${dry_run[@]}" eval "${todo[@]/#/--workdir=$OUT/}" --gin.TrainConfig.seq_len="$SEQ_LEN")
    [[ -n "$TASKS" ]] && cmd+=(--tasks="$TASKS")
    [[ -n "$TASK_LIMIT" ]] && cmd+=(--limit="$TASK_LIMIT")
    if [[ ${#dry_run[@]} -gt 0 ]]; then "${cmd[@]}"; else
      "${cmd[@]}"
      mkdir -p "$DONE" && for name in "${todo[@]}"; do touch "$(done_marker "eval_$name")"; done
    fi
  fi
fi

if wants compare; then  # cheap: never skipped
  cmd=(.venv/bin/python -m bam_jax.evaluate.compare --out "$OUT")
  for order in bam,bam_shared_kv,btx_top1,seed bam_compute,bam_shared_kv_compute,btx_top1,seed; do
    if all_in "${order//,/ }" "${RUNS[*]}"; then cmd+=(--order "$order"); fi  # when all its runs are there
  done
  for name in "${RUNS[@]}"; do cmd+=(--run "$name=$OUT/$name"); done
  for name in "${RERUNS[@]}"; do cmd+=(--rerun "$name=$OUT/${name}_seed1"); done
  echo "== compare"
  if [[ ${#dry_run[@]} -gt 0 ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
fi

if wants export; then  # every mix run as a Hugging Face model (the format that computes it exactly)
  for name in "${MIXES[@]}"; do
    run "export_$name" "${host[@]}" export-hf --workdir="$OUT/$name" --out="$OUT/hf/$name" \
      --dtype="${EXPORT_DTYPE:-bfloat16}" --overwrite
  done
fi
