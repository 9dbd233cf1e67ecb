#!/usr/bin/env bash
# Runs one bam-jax command locally, or on every worker of a TPU pod slice.
#
#   launch/run.sh [--dry-run] train --gin_file=gin/models/tiny.gin --gin_file=gin/seed.gin --workdir=runs/seed
#   launch/run.sh [--dry-run] pipeline [STAGE ...]     the whole experiment (launch/pipeline.sh)
#   launch/run.sh --local_processes=2 [--local_devices=4] train ...   a multi-process job on this
#       machine (bam_jax.local_job): the pod's code path, processes joined over loopback
#
# On a pod, set TPU_NAME (and TPU_ZONE, TPU_PROJECT; REMOTE_DIR, the checkout on the workers,
# default ~/bam_jax). Device commands (train, eval, generate) then run on all workers through
# `gcloud compute tpus tpu-vm ssh --worker=all`, with --distributed so each worker joins the
# run (jax.distributed.initialize); so does prepare-data, whose workers share each domain's input
# files. The other commands (upcycle, import-hf, export-hf, experts) run once, on worker 0: the
# CLI's command table (bam_jax.cli.COMMANDS) says which. Workdirs and DataConfig.data_dir must
# then be where every worker sees them: a bucket (--workdir=gs://BUCKET/DIR) or a filesystem
# they share.
set -euo pipefail

dry_run=0 local_processes=0 local_devices=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --local_processes=*) local_processes="${1#*=}"; shift ;;
    --local_devices=*) local_devices="${1#*=}"; shift ;;
    *) break ;;
  esac
done
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

if [[ "$local_processes" != 0 ]]; then
  cmd=("$here/.venv/bin/python" -m bam_jax.local_job --processes="$local_processes")
  [[ -n "$local_devices" ]] && cmd+=(--devices_per_process="$local_devices")
  cmd+=(-- "$@")
elif [[ -n "${TPU_NAME:-}" ]]; then
  : "${TPU_ZONE:?set TPU_ZONE for TPU_NAME=$TPU_NAME}"
  remote_dir="${REMOTE_DIR:-~/bam_jax}"
  # Whether every worker runs the command is bam_jax.cli's to say (COMMANDS); that module imports
  # only the standard library, so any python3 reads it, with or without the venv.
  every_worker="$(PYTHONPATH="$here" "${PYTHON:-python3}" -c \
    'import sys; from bam_jax.cli import COMMANDS; c = COMMANDS.get(sys.argv[1]); print(c.every_worker if c else "")' "$1")"
  case "$every_worker" in
    True) workers=all join=' --distributed' ;;
    False) workers=0 join='' ;;
    *) echo "launch/run.sh: unknown command '$1'" >&2; exit 2 ;;
  esac
  cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$TPU_ZONE" --worker="$workers")
  [[ -n "${TPU_PROJECT:-}" ]] && cmd+=(--project="$TPU_PROJECT")
  cmd+=(--command="cd $remote_dir && .venv/bin/bam-jax ${quoted% }${join}")
else
  cmd=("$here/.venv/bin/bam-jax" "$@")
fi

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
