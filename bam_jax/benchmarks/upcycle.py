"""Speed and peak memory of `bam-jax upcycle`, against mergekit-moe and plain copies of the same files.

Inputs: NUM_INPUTS dense run checkpoints of BENCH_MODEL (d_model 1024, d_ff 4096, 8 layers, vocab
32,000, untied, sequential blocks, float32: 200M parameters, 799 MB of tensors each) with random weights, written
into a temporary directory that is removed afterwards, three ways with the same weights: with
RunCheckpoints as training writes them (uncompressed), with RunCheckpoints(compression=True) as
older versions wrote them (zstd), and as Hugging Face Llama folders (one model.safetensors, the
byte-level tokenizer) for mergekit-moe. They are mixed into a 4-expert BTX (a Mixtral for
mergekit). The timed rows run REPEATS times each, interleaved (the order rotating from one repeat
to the next, so a drift in this machine's speed touches every row alike), each in a fresh
subprocess (benchmarks/child.py); a row shows its median:

  upcycle     `bam-jax upcycle --method=btx --experts=A,B,C,D --out=OUT` through the CLI's own
              entry point, from the uncompressed inputs and from the zstd ones. seconds: the
              upcycler's summary (from reading the inputs' metadata to the renamed output); wall:
              the whole subprocess, interpreter start included; rate = (bytes_read +
              bytes_written) / seconds, tensor bytes, from the summary.
  mergekit    `mergekit-moe CONFIG OUT --device cpu --quiet` (gate_mode random: no forward passes;
              dtype float32; base model the first input, so its attention, norms and embeddings
              are the first model's where `upcycle` averages all four). seconds: its `main` alone;
              wall as above. mergekit is not a dependency of bam_jax: it is installed on first use
              into MERGEKIT_VENV (git-ignored), a venv that reuses this one's torch and
              transformers; if that fails the row says why.
  copy        shutil.copytree of the 4 uncompressed inputs' params directories (what `cp -r`
              does), median of COPY_REPEATS; rate = 2 x the inputs' tensor bytes / seconds (it
              reads every input tensor and writes as much, counted as the upcycler counts).
  copy+sync   the same copy followed by os.sync(): what a copy costs once its files are on disk,
              as the upcycler's are (TensorStore syncs each file it writes).
  baseline    a subprocess that imports the upcycler's modules (or mergekit-moe's) and stops.

Memory: a row's highest peak resident set over its runs, less its baseline's, over the largest
tensor (the 131 MB embedding, in both formats); the goal is inputs + 1. "anon" counts only the
process's own allocations (sampled).
"""

from __future__ import annotations

import functools
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

from bam_jax.benchmarks import child

# Sequential blocks (Llama's), so that the same weights make a Hugging Face Llama for mergekit.
BENCH_MODEL = dict(vocab_size=32000, d_model=1024, num_layers=8, num_heads=8, num_kv_heads=8, d_ff=4096,
                   parallel_block=False, tie_embeddings=False, dtype='float32')
NUM_INPUTS = 4
METHOD = 'btx'
COPY_REPEATS = 3
REPEATS = 3
ROWS = ('plain', 'zstd', 'mergekit')
MERGEKIT = 'mergekit==0.1.5'  # the newest release on PyPI when this table was written
MERGEKIT_VENV = pathlib.Path(__file__).resolve().parents[2] / 'runs' / 'bench' / 'mergekit_venv'


def random_params(config, seed: int) -> dict:
    """Random normal (std 0.02) float32 weights of every parameter of `config`."""
    import jax

    from bam_jax.models import abstract_model, split_params

    _, shapes = split_params(abstract_model(config))
    normal = np.random.default_rng(seed).standard_normal
    return jax.tree.map(lambda s: normal(s.shape, np.float32) * np.float32(0.02), shapes)


def write_hf_llama(directory: pathlib.Path, config, params: dict) -> None:
    """`params` as a Hugging Face Llama folder: model.safetensors, config.json, tokenizer."""
    from bam_jax.benchmarks.hf_io import FAMILY, TOKEN_IDS
    from bam_jax.data import write_byte_tokenizer
    from bam_jax.hf import families
    from bam_jax.hf.safetensors_files import TensorSpec, write_safetensors
    from bam_jax.models import flatten

    flat = flatten(params)
    specs = [TensorSpec(t.hf, t.hf_shape(flat[t.bam].shape), np.dtype(np.float32),
                        functools.partial(lambda t: np.ascontiguousarray(t.to_hf(flat[t.bam])), t))
             for t in families.tensors(config, FAMILY)]
    directory.mkdir(parents=True)
    write_safetensors(directory, specs)
    hf_config = families.hf_config(config, FAMILY, dtype='float32', max_length=2048, token_ids=TOKEN_IDS)
    (directory / 'config.json').write_text(json.dumps(hf_config, indent=2) + '\n')
    write_byte_tokenizer(directory)


def write_inputs(directory: pathlib.Path, model: dict = BENCH_MODEL) -> tuple[dict, int]:
    """NUM_INPUTS dense models with random weights, each written uncompressed, with zstd and as a
    Hugging Face folder: ({'plain': [workdirs], 'zstd': [workdirs], 'hf': [folders]}, tensor bytes)."""
    import jax

    from bam_jax.models import ModelConfig
    from bam_jax.workdir import RunCheckpoints

    config = ModelConfig(**model)
    inputs, nbytes = {'plain': [], 'zstd': [], 'hf': []}, 0
    for i in range(NUM_INPUTS):
        params = random_params(config, i)
        nbytes += sum(x.nbytes for x in jax.tree.leaves(params))
        for variant in ('plain', 'zstd'):
            inputs[variant].append(directory / variant / f'dense{i}')
            with RunCheckpoints(inputs[variant][-1], keep=1, compression=variant == 'zstd') as checkpoints:
                checkpoints.save(0, params, {'count': np.zeros((), np.int32)},
                                 {'step': 0, 'data_position': 0, 'seed': i}, config)
        inputs['hf'].append(directory / 'hf' / f'dense{i}')
        write_hf_llama(inputs['hf'][-1], config, params)
    return inputs, nbytes


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


def mergekit_python() -> tuple[pathlib.Path | None, str]:
    """MERGEKIT_VENV's interpreter, with MERGEKIT installed there on first use; (None, why) when
    pip cannot install it. The venv sees this one's packages (a .pth file), so pip adds only what
    they lack."""
    import sysconfig
    import venv

    python = MERGEKIT_VENV / 'bin' / 'python'
    version = _mergekit_version(python)
    if version:
        return python, version
    print(f'  installing {MERGEKIT} into {MERGEKIT_VENV} (first use only; it reuses this venv\'s torch and '
          'transformers) ...', flush=True)
    try:
        venv.create(MERGEKIT_VENV, with_pip=True)
        site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                              capture_output=True, text=True, check=True).stdout.strip()
        ours = sysconfig.get_paths()['purelib']
        (pathlib.Path(site) / '_bam_jax_venv.pth').write_text(f'import site; site.addsitedir({ours!r})\n')
        subprocess.run([str(python), '-m', 'pip', 'install', '--quiet', MERGEKIT], capture_output=True, text=True,
                       check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        why = (getattr(e, 'stderr', None) or str(e)).strip().splitlines()
        return None, f'pip could not install {MERGEKIT}: {why[-1] if why else e}'
    version = _mergekit_version(python)
    return (python, version) if version else (None, f'{MERGEKIT} installed but does not import')


def _mergekit_version(python: pathlib.Path) -> str | None:
    if not python.exists():
        return None
    found = subprocess.run([str(python), '-c', 'import importlib.metadata as m, mergekit.scripts.moe; '
                            'print(m.version("mergekit"))'], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def run_in(python: pathlib.Path, *args: str) -> dict:
    """child.run under another interpreter (mergekit's venv)."""
    os.sync()
    start = time.perf_counter()
    done = subprocess.run([str(python), '-m', __name__, *args], capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f'{args[0]} subprocess failed: {(done.stderr.strip().splitlines() or ["?"])[-1]}')
    return {**json.loads(done.stdout.strip().splitlines()[-1]), 'wall_seconds': wall}


def mergekit_config(directory: pathlib.Path, hf_dirs: list[pathlib.Path]) -> pathlib.Path:
    """mergekit-moe's config (JSON is YAML): the first model as base, every model an expert."""
    config = {'base_model': str(hf_dirs[0]), 'gate_mode': 'random', 'dtype': 'float32',
              'experts': [{'source_model': str(d)} for d in hf_dirs]}
    path = directory / 'mergekit.yml'
    path.write_text(json.dumps(config, indent=1))
    return path


def _timed_row(name: str, directory: pathlib.Path, inputs: dict, mergekit: pathlib.Path | None) -> dict:
    """One run of a timed row, its output measured and removed."""
    out = directory / f'out_{name}'
    if name == 'mergekit':
        record = run_in(mergekit, 'mergekit', str(mergekit_config(directory, inputs['hf'])), str(out))
        record['output_file_bytes'] = child.file_bytes(out, '*.safetensors')
    else:
        record = child.run(__name__, 'upcycle', str(out), *map(str, inputs[name]))
        record['output_file_bytes'] = child.file_bytes(out / 'checkpoints' / '0' / 'params')
    shutil.rmtree(out)
    return record


def time_rows(directory: pathlib.Path, inputs: dict, mergekit: pathlib.Path | None) -> dict[str, list[dict]]:
    """REPEATS runs of every timed row, interleaved, the order rotating each repeat."""
    names = [n for n in ROWS if n != 'mergekit' or mergekit is not None]
    runs = {name: [] for name in names}
    for repeat in range(REPEATS):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            runs[name].append(_timed_row(name, directory, inputs, mergekit))
            print(f'  {name}: {runs[name][-1]["seconds"]:.2f} s ({runs[name][-1]["wall_seconds"]:.1f} s wall)',
                  flush=True)
    return runs


def summarize(runs: list[dict], baseline: dict, largest: int) -> dict:
    """A row's medians, its range of wall times and its highest peaks against its baseline."""
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    walls = [r['wall_seconds'] for r in runs]
    row = {'runs': len(runs), 'seconds': median('seconds'), 'wall_seconds': median('wall_seconds'),
           'wall_range': [min(walls), max(walls)], 'seconds_each': [r['seconds'] for r in runs],
           'peak_rss_bytes': max(r['peak_rss_bytes'] for r in runs),
           'peak_anon_bytes': max(r['peak_anon_bytes'] for r in runs),
           'output_file_bytes': runs[0]['output_file_bytes']}
    row['rss_delta_over_largest_tensor'] = (row['peak_rss_bytes'] - baseline['peak_rss_bytes']) / largest
    row['anon_delta_over_largest_tensor'] = (row['peak_anon_bytes'] - baseline['peak_anon_bytes']) / largest
    if 'bytes_read' in runs[0]:
        row.update(bytes_read=runs[0]['bytes_read'], bytes_written=runs[0]['bytes_written'],
                   bytes_per_s=(runs[0]['bytes_read'] + runs[0]['bytes_written']) / row['seconds'])
    return row


def measure(directory: pathlib.Path) -> dict:
    """Writes the inputs under `directory`, then times the rows and the copies and measures memory."""
    mergekit, mergekit_note = mergekit_python()
    print(f'  writing {NUM_INPUTS} dense models (uncompressed, zstd, Hugging Face) ...', flush=True)
    inputs, input_bytes = write_inputs(directory)
    runs = time_rows(directory, inputs, mergekit)
    baselines = {'upcycle': child.run(__name__, 'baseline')}
    if mergekit is not None:
        baselines['mergekit'] = run_in(mergekit, 'mergekit_baseline')
    params_dirs = {v: [w / 'checkpoints' / '0' / 'params' for w in inputs[v]] for v in ('plain', 'zstd')}
    copy = _copy_seconds(params_dirs['plain'], directory / 'copy', sync=False)
    copy_sync = _copy_seconds(params_dirs['plain'], directory / 'copy', sync=True)

    largest = runs['plain'][0]['largest_tensor_bytes']
    rows = {name: summarize(r, baselines['mergekit' if name == 'mergekit' else 'upcycle'], largest)
            for name, r in runs.items()}
    for name in ('plain', 'zstd'):
        rows[name]['vs_copy'] = rows[name]['bytes_per_s'] * copy / (2 * input_bytes)
        rows[name]['vs_copy_sync'] = rows[name]['bytes_per_s'] * copy_sync / (2 * input_bytes)
    return {
        'model': BENCH_MODEL, 'method': METHOD, 'inputs': NUM_INPUTS, 'tensors': runs['plain'][0]['tensors'],
        'repeats': REPEATS, 'input_tensor_bytes': input_bytes, 'largest_tensor_bytes': largest,
        'input_file_bytes': {v: sum(map(child.file_bytes, d)) for v, d in params_dirs.items()},
        'hf_file_bytes': sum(child.file_bytes(d, '*.safetensors') for d in inputs['hf']),
        'rows': rows, 'mergekit': MERGEKIT, 'mergekit_version': mergekit_note if mergekit else None,
        'mergekit_note': None if mergekit else mergekit_note,
        'copy_seconds': copy, 'copy_bytes_per_s': 2 * input_bytes / copy,
        'copy_sync_seconds': copy_sync, 'copy_sync_bytes_per_s': 2 * input_bytes / copy_sync,
        'baselines': {k: {'wall_seconds': b['wall_seconds'], 'peak_rss_bytes': b['peak_rss_bytes']}
                      for k, b in baselines.items()},
        'target_rss_multiple': NUM_INPUTS + 1, 'goal': goal(rows, NUM_INPUTS + 1),
    }


def goal(rows: dict, multiple: int) -> dict | None:
    """Faster than mergekit-moe (median wall and work seconds), within multiple x the largest tensor."""
    if 'mergekit' not in rows:
        return None
    ours, theirs = rows['plain'], rows['mergekit']
    faster = ours['wall_seconds'] < theirs['wall_seconds'] and ours['seconds'] < theirs['seconds']
    within = ours['rss_delta_over_largest_tensor'] <= multiple
    return {'faster': faster, 'within_memory': within, 'met': faster and within}


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix='bam_jax_bench_upcycle_') as directory:
        return measure(pathlib.Path(directory))


_LABELS = {'plain': f'{METHOD}, uncompressed inputs', 'zstd': f'{METHOD}, zstd inputs', 'mergekit': 'mergekit-moe'}


def print_table(r: dict) -> None:
    header = (f'{"upcycle (4 x 200M -> 4 experts)":<32} {"seconds":>8} {"wall s":>7} {"wall range":>11} {"MB/s":>6} '
              f'{"vs copy":>7} {"vs c+sync":>9} {"peak RSS MiB":>12} {"delta/largest":>13} {"anon/largest":>12}')
    print(header)
    print('-' * len(header))
    dash = '-'
    for name, row in r['rows'].items():
        low, high = row['wall_range']
        rate = f'{row["bytes_per_s"] / 1e6:>6,.0f} {row["vs_copy"]:>7.2f} {row["vs_copy_sync"]:>9.2f}' \
            if 'bytes_per_s' in row else f'{dash:>6} {dash:>7} {dash:>9}'
        print(f'{_LABELS[name]:<32} {row["seconds"]:>8.2f} {row["wall_seconds"]:>7.1f} {f"{low:.1f}-{high:.1f}":>11} '
              f'{rate} {row["peak_rss_bytes"] / 2**20:>12,.0f} {row["rss_delta_over_largest_tensor"]:>12.1f}x '
              f'{row["anon_delta_over_largest_tensor"]:>11.1f}x')
    if r['mergekit_note']:
        print(f'{"mergekit-moe":<32} not run: {r["mergekit_note"]}')
    for name, key in (('copy (shutil.copytree)', 'copy'), ('copy + os.sync()', 'copy_sync')):
        print(f'{name:<32} {r[f"{key}_seconds"]:>8.2f} {dash:>7} {dash:>11} {r[f"{key}_bytes_per_s"] / 1e6:>6,.0f} '
              f'{r[f"{key}_bytes_per_s"] / r["copy_bytes_per_s"]:>7.2f} '
              f'{r[f"{key}_bytes_per_s"] / r["copy_sync_bytes_per_s"]:>9.2f}')
    for name, b in r['baselines'].items():
        print(f'{f"imports only ({name})":<32} {dash:>8} {b["wall_seconds"]:>7.1f} {dash:>11} {dash:>6} {dash:>7} '
              f'{dash:>9} {b["peak_rss_bytes"] / 2**20:>12,.0f}')
    _print_notes(r)


def _print_notes(r: dict) -> None:
    m, plain = r['model'], r['rows']['plain']
    files = r['input_file_bytes']
    print(f'config: {r["inputs"]} dense float32 inputs of {r["input_tensor_bytes"] / r["inputs"] / 1e6:.0f} MB '
          f'(V {m["vocab_size"]}, D {m["d_model"]}, L {m["num_layers"]}, F {m["d_ff"]}, untied); read '
          f'{plain["bytes_read"] / 1e6:,.0f} MB + wrote {plain["bytes_written"] / 1e6:,.0f} MB ({r["tensors"]} '
          f'tensors); largest tensor {r["largest_tensor_bytes"] / 2**20:.0f} MiB; median of {r["repeats"]} '
          f'interleaved runs; copies: median of {COPY_REPEATS}')
    print(f'inputs on disk: {files["plain"] / 1e6:,.0f} MB uncompressed, {files["zstd"] / 1e6:,.0f} MB zstd '
          f'({1 - files["zstd"] / files["plain"]:.1%} less), {r["hf_file_bytes"] / 1e6:,.0f} MB safetensors; '
          f'mergekit: {r["mergekit_version"] and "mergekit " + r["mergekit_version"]}, base model = input 0')
    g = r['goal']
    if g is None:
        print('goal: faster than mergekit-moe within (inputs + 1) x the largest tensor: not judged (no mergekit row)')
        return
    theirs = r['rows']['mergekit']
    print(f'goal: faster than mergekit-moe ({plain["wall_seconds"]:.1f} s against {theirs["wall_seconds"]:.1f} s '
          f'wall, {plain["seconds"]:.2f} s against {theirs["seconds"]:.2f} s of work: '
          f'{"yes" if g["faster"] else "NO"}) at delta/largest <= {r["target_rss_multiple"]}x '
          f'({plain["rss_delta_over_largest_tensor"]:.1f}x: {"yes" if g["within_memory"] else "NO"}): '
          f'{"met" if g["met"] else "NOT met"}')


def _child(argv: list[str]) -> None:
    """Subprocess: `upcycle OUT INPUT...` runs the CLI; `mergekit CONFIG OUT` runs mergekit-moe's
    entry point (in its venv); `baseline` and `mergekit_baseline` only import what those need."""
    anon = child.sample_anon_peak()
    result = {}
    if argv[0] == 'upcycle':
        from bam_jax import cli
        out, *inputs = argv[1:]
        status = cli.main(['upcycle', f'--method={METHOD}', f'--experts={",".join(inputs)}', f'--out={out}'])
        if status:
            sys.exit(status)
        result = json.loads((pathlib.Path(out) / 'upcycle.json').read_text())
    elif argv[0].startswith('mergekit'):
        from mergekit.scripts import moe
        if argv[0] == 'mergekit':
            start = time.perf_counter()
            moe.main([argv[1], argv[2], '--device', 'cpu', '--quiet'], standalone_mode=False)
            result = {'seconds': time.perf_counter() - start}
    else:
        import bam_jax.upcycle.io  # noqa: F401
    print(json.dumps({**result, **child.peaks(anon)}))


if __name__ == '__main__':
    _child(sys.argv[1:])
