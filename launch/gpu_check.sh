#!/usr/bin/env bash
# The accelerator check: trains dense, BTX and BAM at BAM's 590M size on one GPU (or TPU chip),
# with fused and plain attention, capacity and dropless experts, then times decoding, and prints
# one report against the goals (dense MFU >= 55%, BAM >= 45%, BTX <= 1.10x dense step time).
# About 8 minutes on one H100/H200; see bam_jax/benchmarks/gpu_check.py.
#
#   launch/gpu_check.sh [--smoke] [--out FILE] [--budget_s S]
#
# --smoke runs the same code on a tiny float32 shape on any platform (the CPU included).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
# Compiled programs are kept, so a second run of the check starts timing at once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-runs/jax_cache}
exec "$python" -m bam_jax.benchmarks.gpu_check "$@"
