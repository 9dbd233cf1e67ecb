#!/usr/bin/env bash
# `make demo`: the whole Branch-Train-Mix pipeline at tiny scale on the built-in corpora, on the
# CPU: seed -> code/law/math experts -> BTX, BAM and BAM shared-KV (data- and compute-matched), Lory
# -> held-out perplexity per domain and the offline downstream tasks (bam_domains), and whether
# the BAM paper's ordering held on each. BTX, BAM and BAM shared-KV are trained a second time
# with other seeds, to weigh each gap against the noise.
#
# Sizes can be overridden: SEED_STEPS, BRANCH_STEPS, MIX_STEPS, BATCH_SIZE, SEQ_LEN, OUT, MIXES,
# RERUNS, TASKS, TASK_LIMIT (see launch/pipeline.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

export OUT="${OUT:-runs/demo}"
export SEED_STEPS="${SEED_STEPS:-300}"
export BRANCH_STEPS="${BRANCH_STEPS:-150}"
export MIX_STEPS="${MIX_STEPS:-150}"
export BATCH_SIZE="${BATCH_SIZE:-16}"
export SEQ_LEN="${SEQ_LEN:-128}"
export RERUNS="${RERUNS-btx_top1 bam bam_shared_kv}"
export PARALLEL_BRANCHES=1  # the branches' single-threaded phases (start-up, compiling) overlap
export MODEL=gin/models/tiny.gin
export EXTRA="--gin.TrainConfig.warmup_steps=20 --gin.TrainConfig.eval_every=100000"
exec launch/pipeline.sh "$@"
