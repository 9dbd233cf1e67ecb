"""Speed and peak memory of `import-hf` and `export-hf`, against plain copies of the same bytes.

Input: one Hugging Face Llama directory of BENCH_MODEL (d_model 1024, d_ff 4096, 8 layers, vocab
32,000, untied: 200M float32 parameters, 799 MB in one model.safetensors), with random weights,
its config.json from families.hf_config and the byte-level tokenizer.json; written without torch
into a temporary directory that is removed afterwards. Its largest tensors are the embedding and
the LM head, [32000, 1024] float32 (131 MB). If the temporary directory's disk lacks room for
the input and three outputs, the smaller SMALL_MODEL is used and the table says so.

Every row runs in a fresh subprocess (JAX_PLATFORMS=cpu; os.sync() before each, so none pays for
another's write-back). All of them first import the same modules (bam_jax.hf, bam_jax.train.config,
which export_hf imports when called, safetensors) and start JAX's CPU backend, then do their work:

  import  `import_hf(HF, OUT, dtype='float32')`; seconds = the record's own `seconds`; rate =
          (bytes_read + bytes_written) / seconds, both counted by import_hf in tensor bytes.
  export  `export_hf(OUT, EXPORTED, fmt='llama', dtype='float32')` of the imported directory;
          seconds and rate as for import.
  copy    shutil.copyfile of the safetensors file(s) (what `cp` does), median of COPY_REPEATS;
          rate = 2 x the files' bytes / seconds (read every byte, write as many).
  numpy   every tensor read with safetensors (framework='numpy') and its bytes written to one
          raw file, median of COPY_REPEATS: a copy that, like the converters, materialises each
          tensor in memory; rate as for copy.
  imports the baseline: a subprocess that imports and starts JAX, then stops.

"wall" is the subprocess's whole run as the parent sees it: interpreter start, imports and JAX
start-up, then the work. "vs copy" is a row's rate over the copy's. Memory: each subprocess reads
its own VmHWM (peak resident set) from /proc/self/status (getrusage's ru_maxrss is no use: Linux
carries the parent's peak into a child across fork and exec); a row's peak less the baseline's,
over the largest tensor, is its "delta/largest". The resident set includes the pages of memory-
mapped files the process has touched (safetensors maps its files: up to the whole input, pages
the kernel may drop at will), so each subprocess also samples its anonymous resident memory
(RssAnon, its own allocations) every 5 ms from a background thread (benchmarks/child.py);
"anon/largest" is that peak less the baseline's, over the largest tensor (a sample can miss a
shorter peak). The input was just written, so reads are likely served from the page cache, for
every row alike. The copies' writes end in the page cache; Orbax's (through TensorStore) are
synced to disk file by file.
"""

from __future__ import annotations

import functools
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
                   parallel_block=False, tie_embeddings=False)
# Used when the disk has too little room for BENCH_MODEL: 50M parameters, 198 MB, same vocabulary.
SMALL_MODEL = dict(BENCH_MODEL, d_model=512, num_layers=4, d_ff=2048)
FAMILY = 'llama'
# The ids of the byte-level tokenizer's special tokens (bos and pad '<pad>', eos '</s>').
TOKEN_IDS = {'bos_token_id': 0, 'eos_token_id': 1, 'pad_token_id': 0}
COPY_REPEATS = 3
# Room needed on disk at once: the input, the import, the export and one copy, plus a margin.
DISK_MULTIPLE = 5


def hf_specs(model: dict) -> list:
    """The safetensors TensorSpecs of the Hugging Face Llama model: random normal weights (std
    0.02, float32), ones for the norms, each built only when it is written."""
    from bam_jax.hf import families
    from bam_jax.hf.safetensors_files import TensorSpec
    from bam_jax.models import ModelConfig, abstract_model, flatten, split_params

    config = ModelConfig(**model)
    _, abstract = split_params(abstract_model(config))
    shapes = {path: tuple(v.shape) for path, v in flatten(abstract).items()}
    rng = np.random.default_rng(0)

    def build(shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        weights = rng.standard_normal(shape, np.float32)
        weights *= np.float32(0.02)
        return weights

    specs = []
    for tensor in families.tensors(config, FAMILY):
        shape = tensor.hf_shape(shapes[tensor.bam])
        specs.append(TensorSpec(tensor.hf, shape, np.dtype(np.float32), functools.partial(build, shape)))
    return specs


def write_hf_model(directory: pathlib.Path, model: dict) -> list:
    """config.json, the weights and the byte-level tokenizer of `model` in `directory`; its specs."""
    from bam_jax.data import write_byte_tokenizer
    from bam_jax.hf import families
    from bam_jax.hf.safetensors_files import write_safetensors
    from bam_jax.models import ModelConfig

    directory.mkdir(parents=True)
    specs = hf_specs(model)
    write_safetensors(directory, specs)
    config = families.hf_config(ModelConfig(**model), FAMILY, dtype='float32', max_length=2048,
                                token_ids=TOKEN_IDS)
    (directory / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    write_byte_tokenizer(directory)
    return specs


def _row(*args: str) -> dict:
    return child.run(__name__, *args)


def _parameters(model: dict) -> int:
    """The parameter count of the Hugging Face Llama model, without building it."""
    d, f, v, layers = model['d_model'], model['d_ff'], model['vocab_size'], model['num_layers']
    head_dim = d // model['num_heads']
    attention = 2 * d * d + 2 * d * model['num_kv_heads'] * head_dim
    return 2 * v * d + layers * (attention + 3 * d * f + 2 * d) + d


def choose_model(directory: pathlib.Path) -> tuple[dict, str | None]:
    """BENCH_MODEL if the disk has room for it, else SMALL_MODEL; and a note saying why, or None."""
    need = DISK_MULTIPLE * 4 * _parameters(BENCH_MODEL)
    free = shutil.disk_usage(directory).free
    if free >= need:
        return BENCH_MODEL, None
    note = (f'only {free / 1e9:.1f} GB free in {directory} (the bench shape needs {need / 1e9:.1f} GB): '
            'using the smaller shape')
    print(f'note: {note}', flush=True)
    return SMALL_MODEL, note


def measure(directory: pathlib.Path, model: dict) -> dict:
    """Writes the input under `directory`, then times every row and measures its memory."""
    hf_dir, imported, exported = directory / 'hf', directory / 'imported', directory / 'exported'
    start = time.perf_counter()
    specs = write_hf_model(hf_dir, model)
    write_seconds = time.perf_counter() - start
    tensor_bytes = sum(s.nbytes for s in specs)
    largest = max(s.nbytes for s in specs)

    rows = {'import': _row('import', str(hf_dir), str(imported)),
            'export': _row('export', str(imported), str(exported))}
    for kind in ('copy', 'numpy'):
        rows[kind] = _row(kind, str(hf_dir), str(directory / kind))
        shutil.rmtree(directory / kind)
    baseline = _row('baseline')

    copy_rate = rows['copy']['bytes_read'] * 2 / rows['copy']['seconds']
    for row in rows.values():
        row['bytes_per_s'] = (row['bytes_read'] + row['bytes_written']) / row['seconds']
        row['vs_copy'] = row['bytes_per_s'] / copy_rate
        row['rss_delta_over_largest_tensor'] = (row['peak_rss_bytes'] - baseline['peak_rss_bytes']) / largest
        row['anon_delta_over_largest_tensor'] = (row['peak_anon_bytes'] - baseline['peak_anon_bytes']) / largest
    keep = ('seconds', 'wall_seconds', 'bytes_read', 'bytes_written', 'bytes_per_s', 'vs_copy',
            'peak_rss_bytes', 'rss_delta_over_largest_tensor', 'peak_anon_bytes', 'anon_delta_over_largest_tensor')
    return {
        'model': model, 'family': FAMILY, 'dtype': 'float32', 'tensors': len(specs),
        'tensor_bytes': tensor_bytes, 'largest_tensor_bytes': largest,
        'hf_file_bytes': child.file_bytes(hf_dir, '*.safetensors'),
        'import_file_bytes': child.file_bytes(imported / 'checkpoints' / '0' / 'params'),
        'export_file_bytes': child.file_bytes(exported, '*.safetensors'),
        'input_write_seconds': write_seconds, 'copy_repeats': COPY_REPEATS,
        'rows': {name: {k: row[k] for k in keep} for name, row in rows.items()},
        'baseline': {k: baseline[k] for k in ('wall_seconds', 'peak_rss_bytes', 'peak_anon_bytes')},
    }


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix='bam_jax_bench_hf_io_') as directory:
        model, note = choose_model(pathlib.Path(directory))
        return {**measure(pathlib.Path(directory), model), 'note': note}


_LABELS = {'import': 'import llama -> bam_jax', 'export': 'export bam_jax -> llama',
           'copy': 'copy (shutil.copyfile)', 'numpy': 'copy via numpy'}


def print_table(r: dict) -> None:
    header = (f'{"hf_io":<24} {"seconds":>8} {"wall s":>7} {"MB/s":>7} {"vs copy":>7} '
              f'{"peak RSS MiB":>12} {"delta/largest":>13} {"anon/largest":>12}')
    print(header)
    print('-' * len(header))
    for name, row in r['rows'].items():
        print(f'{_LABELS[name]:<24} {row["seconds"]:>8.2f} {row["wall_seconds"]:>7.1f} '
              f'{row["bytes_per_s"] / 1e6:>7,.0f} {row["vs_copy"]:>7.2f} '
              f'{row["peak_rss_bytes"] / 2**20:>12,.0f} {row["rss_delta_over_largest_tensor"]:>12.1f}x '
              f'{row["anon_delta_over_largest_tensor"]:>11.1f}x')
    b = r['baseline']
    print(f'{"imports only (baseline)":<24} {"-":>8} {b["wall_seconds"]:>7.1f} {"-":>7} {"-":>7} '
          f'{b["peak_rss_bytes"] / 2**20:>12,.0f} {"-":>13} {"-":>12}')
    m = r['model']
    print(f'config: {FAMILY} float32, V {m["vocab_size"]}, D {m["d_model"]}, L {m["num_layers"]}, '
          f'F {m["d_ff"]}, untied: {r["tensors"]} tensors, {r["tensor_bytes"] / 1e6:,.0f} MB; largest tensor '
          f'{r["largest_tensor_bytes"] / 2**20:.0f} MiB; copies: median of {r["copy_repeats"]}')
    print('seconds: the work (import/export: their record\'s own); wall: the whole subprocess, start-up and '
          'imports included; MB/s: (read + written) tensor bytes per second')
    print('memory: peak less the baseline\'s, over the largest tensor; delta (RSS) counts the pages of the '
          'mapped input file, anon only allocations (sampled)')
    if r['note']:
        print(f'note: {r["note"]}')


def _copy(source: pathlib.Path, target: pathlib.Path, read_with_numpy: bool) -> dict:
    """Copies the safetensors files of `source` into `target`, COPY_REPEATS times; the median time."""
    from safetensors import safe_open

    files = sorted(source.glob('*.safetensors'))
    times = []
    for _ in range(COPY_REPEATS):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        os.sync()
        start = time.perf_counter()
        for file in files:
            if read_with_numpy:
                with safe_open(str(file), framework='numpy') as tensors, open(target / file.name, 'wb') as out:
                    for name in tensors.keys():
                        out.write(tensors.get_tensor(name).data)
            else:
                shutil.copyfile(file, target / file.name)
        times.append(time.perf_counter() - start)
    nbytes = sum(f.stat().st_size for f in files)
    return {'seconds': statistics.median(times), 'bytes_read': nbytes, 'bytes_written': nbytes}


def _child(argv: list[str]) -> None:
    """Subprocess: `import HF OUT`, `export RUN OUT`, `copy HF DIR`, `numpy HF DIR` or `baseline`;
    each imports the same modules and starts JAX first."""
    import jax
    import safetensors  # noqa: F401 - the numpy row's reader, imported by every row alike

    import bam_jax.train.config  # noqa: F401 - export_hf imports it when called
    from bam_jax.hf import export_hf, import_hf

    jax.devices()
    anon = child.sample_anon_peak()
    result = {}
    if argv[0] == 'import':
        result = import_hf(argv[1], argv[2], dtype='float32', progress=False).to_dict()
    elif argv[0] == 'export':
        result = export_hf(argv[1], argv[2], fmt=FAMILY, dtype='float32', progress=False).to_dict()
    elif argv[0] in ('copy', 'numpy'):
        result = _copy(pathlib.Path(argv[1]), pathlib.Path(argv[2]), read_with_numpy=argv[0] == 'numpy')
    print(json.dumps({**result, **child.peaks(anon)}))


if __name__ == '__main__':
    _child(sys.argv[1:])
