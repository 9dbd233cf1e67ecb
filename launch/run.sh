#!/usr/bin/env bash
# Runs one bam-jax command locally, or on every worker of a TPU pod slice.
#
#   launch/run.sh [--dry-run] train --gin_file=gin/models/tiny.gin --gin_file=gin/seed.gin --workdir=runs/seed
#   launch/run.sh [--dry-run] pipeline [STAGE ...]     the whole experiment (launch/pipeline.sh)
#
# On a pod, set TPU_NAME (and TPU_ZONE, TPU_PROJECT; REMOTE_DIR, the checkout on the workers,
# default ~/bam_jax). The command then runs on all workers through
# `gcloud compute tpus tpu-vm ssh --worker=all`, with --distributed so each worker joins the
# run (jax.distributed.initialize). Workdirs must then be on a filesystem all workers share.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 1 ]]; then
  echo "usage: launch/run.sh [--dry-run] COMMAND [ARGS...]   (COMMAND: train, ...)" >&2
  exit 2
fi

here="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "$1" == pipeline ]]; then
  shift
  exec "$here/launch/pipeline.sh" $([[ $dry_run == 1 ]] && echo --dry-run) "$@"
fi
quoted="$(printf '%q ' "$@")"

if [[ -n "${TPU_NAME:-}" ]]; then
  : "${TPU_ZONE:?set TPU_ZONE for TPU_NAME=$TPU_NAME}"
  remote_dir="${REMOTE_DIR:-~/bam_jax}"
  cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$TPU_ZONE" --worker=all)
  [[ -n "${TPU_PROJECT:-}" ]] && cmd+=(--project="$TPU_PROJECT")
  cmd+=(--command="cd $remote_dir && .venv/bin/bam-jax ${quoted}--distributed")
else
  cmd=("$here/.venv/bin/bam-jax" "$@")
fi

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
