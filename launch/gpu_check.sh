#!/usr/bin/env bash
# The accelerator check: trains dense, BTX and BAM at BAM's 590M size on one GPU (or TPU chip),
# with fused and plain attention, capacity and dropless experts, then times decoding, and prints
# one report against the goals (dense MFU >= 55%, BAM >= 45%, BTX <= 1.10x dense step time).
# At most 8 minutes on one H100/H200; see bam_jax/benchmarks/gpu_check.py, and
# docs/accelerator_check.md for running it on a lent GPU machine.
#
#   launch/gpu_check.sh [--smoke] [--out FILE] [--budget_s S]
#
# --smoke runs the same code on a tiny float32 shape on any platform (the CPU included).
# It needs neither an installed bam_jax nor the data libraries (seqio, TensorFlow): the repository
# is put on the path, and the wheels of `make device-wheels` too when .device_wheels/ is there.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
wheels=$(ls .device_wheels/*.whl 2>/dev/null | tr '\n' ':' || true)
export PYTHONPATH="$PWD:$wheels${PYTHONPATH:-}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
# Compiled programs are kept, so a second run of the check starts timing at once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
exec "$python" -m bam_jax.benchmarks.gpu_check "$@"
