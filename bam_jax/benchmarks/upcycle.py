"""Speed and peak memory of the streaming upcycler, against a plain copy of the same files.

Inputs: 4 dense run checkpoints (a seed and 3 experts) of BENCH_MODEL, 74.8M float32 parameters
(299 MB) each, whose largest tensor is the tied [32000, 1024] embedding (131 MB; the largest BAM
output tensor, a stacked FFN weight, is 34 MB). Random weights, written with RunCheckpoints into a
temporary directory that is removed afterwards. os.sync() runs before each timed part, so none
pays for another's write-back.

  upcycle  `upcycle_checkpoints('bam', ...)`, seed + 3 experts, in a fresh subprocess; rate =
           (bytes_read + bytes_written) / seconds, all three from the upcycler's summary.
  copy     shutil.copytree of the 4 inputs' params directories (what `cp -r` does), median of 3;
           rate = 2 x the inputs' tensor bytes / seconds: it reads every input tensor and writes
           as much, counted as the upcycler counts (tensor bytes; the zstd-compressed files are
           ~8% smaller, for the upcycler's reads and writes alike; both sizes are saved).
  memory   peak resident set of the upcycle subprocess, less that of a subprocess that imports the
           same modules and stops (both with JAX_PLATFORMS=cpu: the upcycler needs no accelerator);
           the difference over the largest tensor is compared with the streaming target, inputs + 1.
           Each subprocess reads its own VmHWM from /proc/self/status. getrusage's ru_maxrss is no
           use here: Linux carries the parent's peak into a child across fork and exec.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCH_MODEL = dict(vocab_size=32000, d_model=1024, num_layers=4, num_heads=8, num_kv_heads=8, d_ff=2048,
                   tie_embeddings=True, dtype='float32')
NUM_INPUTS = 4  # a seed and 3 experts
COPY_REPEATS = 3


def write_inputs(directory: pathlib.Path) -> tuple[list[pathlib.Path], int]:
    """NUM_INPUTS dense run checkpoints of BENCH_MODEL with random weights: (workdirs, tensor bytes)."""
    import jax

    from bam_jax.models import ModelConfig, abstract_model, split_params
    from bam_jax.workdir import RunCheckpoints

    config = ModelConfig(**BENCH_MODEL)
    _, shapes = split_params(abstract_model(config))
    workdirs, nbytes = [], 0
    for i in range(NUM_INPUTS):
        normal = np.random.default_rng(i).standard_normal
        params = jax.tree.map(lambda s, normal=normal: normal(s.shape, np.float32) * np.float32(0.02), shapes)
        nbytes += sum(x.nbytes for x in jax.tree.leaves(params))
        workdirs.append(directory / f'dense{i}')
        checkpoints = RunCheckpoints(workdirs[-1], keep=1)
        checkpoints.save(0, params, {'count': np.zeros((), np.int32)},
                         {'step': 0, 'data_position': 0, 'seed': i}, config)
        checkpoints.close()  # waits for the async save
    return workdirs, nbytes


def _file_bytes(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob('*') if p.is_file())


def _subprocess(*args: str) -> dict:
    """Runs this module's _child in a fresh interpreter; its JSON result."""
    os.sync()
    done = subprocess.run([sys.executable, '-m', __name__, *args], capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    if done.returncode:
        raise RuntimeError(f'upcycle benchmark subprocess {args[:1]} failed:\n{done.stderr[-4000:]}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def _copy_seconds(sources: list[pathlib.Path], directory: pathlib.Path) -> float:
    times = []
    for _ in range(COPY_REPEATS):
        shutil.rmtree(directory, ignore_errors=True)
        os.sync()
        start = time.perf_counter()
        for i, source in enumerate(sources):
            shutil.copytree(source, directory / str(i))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(directory: pathlib.Path) -> dict:
    """Writes the inputs under `directory`, then times the upcycle and the copy and measures memory."""
    workdirs, input_bytes = write_inputs(directory)
    out = directory / 'bam'
    upcycle = _subprocess('upcycle', str(out), *map(str, workdirs))
    baseline = _subprocess('baseline')
    params_dirs = [w / 'checkpoints' / '0' / 'params' for w in workdirs]
    copy_seconds = _copy_seconds(params_dirs, directory / 'copy')

    upcycle_rate = (upcycle['bytes_read'] + upcycle['bytes_written']) / upcycle['seconds']
    copy_rate = 2 * input_bytes / copy_seconds
    delta = upcycle['peak_rss_bytes'] - baseline['peak_rss_bytes']
    return {
        'model': BENCH_MODEL, 'method': 'bam', 'inputs': NUM_INPUTS, 'tensors': upcycle['tensors'],
        'input_tensor_bytes': input_bytes, 'input_file_bytes': sum(map(_file_bytes, params_dirs)),
        'output_file_bytes': _file_bytes(out / 'checkpoints' / '0' / 'params'),
        'bytes_read': upcycle['bytes_read'], 'bytes_written': upcycle['bytes_written'],
        'largest_tensor_bytes': upcycle['largest_tensor_bytes'],
        'upcycle_seconds': upcycle['seconds'], 'upcycle_bytes_per_s': upcycle_rate,
        'copy_seconds': copy_seconds, 'copy_bytes_per_s': copy_rate, 'upcycle_vs_copy': upcycle_rate / copy_rate,
        'peak_rss_bytes': upcycle['peak_rss_bytes'], 'baseline_rss_bytes': baseline['peak_rss_bytes'],
        'rss_delta_over_largest_tensor': delta / upcycle['largest_tensor_bytes'],
        'target_rss_multiple': NUM_INPUTS + 1, 'target_vs_copy': 0.7,
    }


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix='bam_jax_bench_upcycle_') as directory:
        return measure(pathlib.Path(directory))


def print_table(r: dict) -> None:
    header = (f'{"upcycle":<24} {"upcycle MB/s":>12} {"copy MB/s":>10} {"ratio":>6} {"peak RSS MiB":>12} '
              f'{"baseline MiB":>12} {"delta/largest":>13}')
    print(header)
    print('-' * len(header))
    print(f'{"bam, seed + 3 experts":<24} {r["upcycle_bytes_per_s"] / 1e6:>12,.0f} '
          f'{r["copy_bytes_per_s"] / 1e6:>10,.0f} {r["upcycle_vs_copy"]:>6.2f} '
          f'{r["peak_rss_bytes"] / 2**20:>12,.0f} {r["baseline_rss_bytes"] / 2**20:>12,.0f} '
          f'{r["rss_delta_over_largest_tensor"]:>12.1f}x')
    m = r['model']
    print(f'config: {r["inputs"]} dense float32 inputs of {r["input_tensor_bytes"] / r["inputs"] / 1e6:.0f} MB '
          f'(V {m["vocab_size"]}, D {m["d_model"]}, L {m["num_layers"]}, F {m["d_ff"]}, tied); '
          f'read {r["bytes_read"] / 1e6:,.0f} MB + wrote {r["bytes_written"] / 1e6:,.0f} MB '
          f'({r["tensors"]} tensors) in {r["upcycle_seconds"]:.1f} s; copy {r["copy_seconds"]:.2f} s '
          f'(median of {COPY_REPEATS}); largest tensor {r["largest_tensor_bytes"] / 2**20:.0f} MiB')
    print(f'targets: ratio >= {r["target_vs_copy"]}, delta/largest <= {r["target_rss_multiple"]}x '
          f'(inputs + 1); rates in tensor bytes (read + written) per second')


def _child(argv: list[str]) -> None:
    """Subprocess: `upcycle OUT SEED EXPERT...` runs the upcycle; `baseline` only imports what it needs."""
    from bam_jax.upcycle.io import upcycle_checkpoints

    result = {}
    if argv[0] == 'upcycle':
        out, seed, *experts = argv[1:]
        result = upcycle_checkpoints('bam', experts, out, seed=seed, progress=False)
    with open('/proc/self/status') as status:
        hwm = next(line for line in status if line.startswith('VmHWM:'))
    result['peak_rss_bytes'] = int(hwm.split()[1]) * 1024
    print(json.dumps(result))


if __name__ == '__main__':
    _child(sys.argv[1:])
