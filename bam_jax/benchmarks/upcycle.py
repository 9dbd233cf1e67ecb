"""Speed and peak memory of `bam-jax upcycle`, against plain copies of the same files.

Inputs: NUM_INPUTS dense run checkpoints of BENCH_MODEL (d_model 1024, d_ff 4096, 8 layers, vocab
32,000, untied, float32: 200M parameters, 799 MB of tensors each), random weights written with
RunCheckpoints (as training writes them: zstd-compressed) into a temporary directory that is
removed afterwards. They are mixed into a 4-expert BTX. Each row runs in a fresh subprocess
(benchmarks/child.py):

  upcycle     `bam-jax upcycle --method=btx --experts=A,B,C,D --out=OUT` through the CLI's own
              entry point. seconds: the upcycler's summary (from reading the inputs' metadata to
              the renamed output); wall: the whole subprocess, interpreter start included;
              rate = (bytes_read + bytes_written) / seconds, tensor bytes, from the summary.
  copy        shutil.copytree of the 4 inputs' params directories (what `cp -r` does), median of
              COPY_REPEATS; rate = 2 x the inputs' tensor bytes / seconds (it reads every input
              tensor and writes as much, counted as the upcycler counts).
  copy+sync   the same copy followed by os.sync(): what a copy costs once its files are on disk,
              as the upcycler's are (TensorStore syncs each file it writes).
  baseline    a subprocess that imports the upcycler's modules and stops.

Memory: peak less the baseline's, over the largest tensor (the 131 MB embedding); the target is
inputs + 1. "anon" counts only the process's own allocations (sampled).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from bam_jax.benchmarks import child

BENCH_MODEL = dict(vocab_size=32000, d_model=1024, num_layers=8, num_heads=8, num_kv_heads=8, d_ff=4096,
                   tie_embeddings=False, dtype='float32')
NUM_INPUTS = 4
METHOD = 'btx'
COPY_REPEATS = 3
MERGEKIT_SECONDS = 12.1  # the goal: mergekit-moe 0.1.5's time on this shape when it was set (2 CPU cores)


def write_inputs(directory: pathlib.Path, model: dict = BENCH_MODEL) -> tuple[list[pathlib.Path], int]:
    """NUM_INPUTS dense run checkpoints of `model` with random weights: (workdirs, tensor bytes)."""
    import jax

    from bam_jax.models import ModelConfig, abstract_model, split_params
    from bam_jax.workdir import RunCheckpoints

    config = ModelConfig(**model)
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


def _copy_seconds(sources: list[pathlib.Path], directory: pathlib.Path, sync: bool) -> float:
    times = []
    for _ in range(COPY_REPEATS):
        shutil.rmtree(directory, ignore_errors=True)
        os.sync()
        start = time.perf_counter()
        for i, source in enumerate(sources):
            shutil.copytree(source, directory / str(i))
        if sync:
            os.sync()
        times.append(time.perf_counter() - start)
    shutil.rmtree(directory, ignore_errors=True)
    return statistics.median(times)


def measure(directory: pathlib.Path) -> dict:
    """Writes the inputs under `directory`, then times the upcycle and the copies and measures memory."""
    print(f'  writing {NUM_INPUTS} dense checkpoints ...', flush=True)
    workdirs, input_bytes = write_inputs(directory)
    out = directory / 'out'
    upcycle = child.run(__name__, 'upcycle', str(out), *map(str, workdirs))
    baseline = child.run(__name__, 'baseline')
    params_dirs = [w / 'checkpoints' / '0' / 'params' for w in workdirs]
    copy = _copy_seconds(params_dirs, directory / 'copy', sync=False)
    copy_sync = _copy_seconds(params_dirs, directory / 'copy', sync=True)

    moved = upcycle['bytes_read'] + upcycle['bytes_written']
    rate = moved / upcycle['seconds']
    largest = upcycle['largest_tensor_bytes']
    return {
        'model': BENCH_MODEL, 'method': METHOD, 'inputs': NUM_INPUTS, 'tensors': upcycle['tensors'],
        'input_tensor_bytes': input_bytes, 'input_file_bytes': sum(map(child.file_bytes, params_dirs)),
        'output_file_bytes': child.file_bytes(out / 'checkpoints' / '0' / 'params'),
        'bytes_read': upcycle['bytes_read'], 'bytes_written': upcycle['bytes_written'], 'largest_tensor_bytes': largest,
        'upcycle_seconds': upcycle['seconds'], 'upcycle_wall_seconds': upcycle['wall_seconds'],
        'upcycle_bytes_per_s': rate, 'copy_seconds': copy, 'copy_bytes_per_s': 2 * input_bytes / copy,
        'copy_sync_seconds': copy_sync, 'copy_sync_bytes_per_s': 2 * input_bytes / copy_sync,
        'upcycle_vs_copy': rate * copy / (2 * input_bytes),
        'upcycle_vs_copy_sync': rate * copy_sync / (2 * input_bytes),
        'peak_rss_bytes': upcycle['peak_rss_bytes'], 'baseline_rss_bytes': baseline['peak_rss_bytes'],
        'rss_delta_over_largest_tensor': (upcycle['peak_rss_bytes'] - baseline['peak_rss_bytes']) / largest,
        'anon_delta_over_largest_tensor': (upcycle['peak_anon_bytes'] - baseline['peak_anon_bytes']) / largest,
        'baseline_wall_seconds': baseline['wall_seconds'],
        'target_rss_multiple': NUM_INPUTS + 1, 'target_vs_copy': 0.7, 'mergekit_seconds': MERGEKIT_SECONDS,
    }


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix='bam_jax_bench_upcycle_') as directory:
        return measure(pathlib.Path(directory))


def print_table(r: dict) -> None:
    header = (f'{"upcycle":<26} {"seconds":>8} {"wall s":>7} {"MB/s":>7} {"vs copy":>7} {"vs c+sync":>9} '
              f'{"peak RSS MiB":>12} {"delta/largest":>13} {"anon/largest":>12}')
    print(header)
    print('-' * len(header))
    print(f'{f"{METHOD}, {NUM_INPUTS} dense -> {NUM_INPUTS} experts":<26} {r["upcycle_seconds"]:>8.2f} '
          f'{r["upcycle_wall_seconds"]:>7.1f} {r["upcycle_bytes_per_s"] / 1e6:>7,.0f} {r["upcycle_vs_copy"]:>7.2f} '
          f'{r["upcycle_vs_copy_sync"]:>9.2f} {r["peak_rss_bytes"] / 2**20:>12,.0f} '
          f'{r["rss_delta_over_largest_tensor"]:>12.1f}x {r["anon_delta_over_largest_tensor"]:>11.1f}x')
    for name, key in (('copy (shutil.copytree)', 'copy'), ('copy + os.sync()', 'copy_sync')):
        print(f'{name:<26} {r[f"{key}_seconds"]:>8.2f} {"-":>7} {r[f"{key}_bytes_per_s"] / 1e6:>7,.0f} '
              f'{r[f"{key}_bytes_per_s"] / r["copy_bytes_per_s"]:>7.2f} '
              f'{r[f"{key}_bytes_per_s"] / r["copy_sync_bytes_per_s"]:>9.2f} {"-":>12} {"-":>13} {"-":>12}')
    print(f'{"imports only (baseline)":<26} {"-":>8} {r["baseline_wall_seconds"]:>7.1f} {"-":>7} {"-":>7} {"-":>9} '
          f'{r["baseline_rss_bytes"] / 2**20:>12,.0f} {"-":>13} {"-":>12}')
    m = r['model']
    print(f'config: {r["inputs"]} dense float32 inputs of {r["input_tensor_bytes"] / r["inputs"] / 1e6:.0f} MB '
          f'(V {m["vocab_size"]}, D {m["d_model"]}, L {m["num_layers"]}, F {m["d_ff"]}, untied); read '
          f'{r["bytes_read"] / 1e6:,.0f} MB + wrote {r["bytes_written"] / 1e6:,.0f} MB ({r["tensors"]} tensors); '
          f'largest tensor {r["largest_tensor_bytes"] / 2**20:.0f} MiB; copies: median of {COPY_REPEATS}')
    print(f'targets: wall < {r["mergekit_seconds"]} s (mergekit-moe on this shape), vs copy >= {r["target_vs_copy"]}, '
          f'delta/largest <= {r["target_rss_multiple"]}x (inputs + 1); MB/s: (read + written) tensor bytes per s')


def _child(argv: list[str]) -> None:
    """Subprocess: `upcycle OUT INPUT...` runs the CLI; `baseline` only imports what it needs."""
    anon = child.sample_anon_peak()
    result = {}
    if argv[0] == 'upcycle':
        from bam_jax import cli
        out, *inputs = argv[1:]
        status = cli.main(['upcycle', f'--method={METHOD}', f'--experts={",".join(inputs)}', f'--out={out}'])
        if status:
            sys.exit(status)
        result = json.loads((pathlib.Path(out) / 'upcycle.json').read_text())
    else:
        import bam_jax.upcycle.io  # noqa: F401
    print(json.dumps({**result, **child.peaks(anon)}))


if __name__ == '__main__':
    _child(sys.argv[1:])
