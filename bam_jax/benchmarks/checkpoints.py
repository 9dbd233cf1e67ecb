"""Size, save time and restore time of a training checkpoint, zstd-compressed against uncompressed.

The state: the upcycle table's shape (d_model 1024, d_ff 4096, 8 layers, vocab 32,000, untied,
float32: 200M parameters, 799 MB) with random normal weights, and its AdamW state after one
step of random gradients (first and second moments: twice the weights' bytes), as JAX arrays.
Both variants are saved by RunCheckpoints (the trainer's own saver), `compression=True` being
Orbax's default zstd that training used before. Each is saved and restored REPEATS times, the two
variants interleaved (the order alternating from one repeat to the next), so a drift in this
machine's speed touches both alike; every save starts after os.sync().

  MB          params and opt_state on disk (every file of the two items)
  save s      RunCheckpoints.save until the checkpoint is committed (save, then wait); median
  blocking s  the part a training step waits for (save returns once the arrays are copied to host)
  CPU s       the process's user + system CPU seconds over the whole save (or restore): what the
              background save takes from a training step on the same cores
  restore s   RunCheckpoints.restore of params and opt_state onto the CPU device; median

The trained row re-saves `make demo`'s seed checkpoint (runs/demo/seed, if present: a small
model trained 300 steps, with its real AdamW state) both ways and compares sizes only.
"""

from __future__ import annotations

import os
import pathlib
import resource
import shutil
import statistics
import tempfile
import time

import numpy as np

REPEATS = 3
VARIANTS = ('zstd', 'plain')
DEMO_SEED = pathlib.Path(__file__).resolve().parents[2] / 'runs' / 'demo' / 'seed'


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def training_state(model: dict):
    """(ModelConfig, params, opt_state): random weights and AdamW moments after one step."""
    import jax
    import optax

    from bam_jax.models import ModelConfig, abstract_model, split_params

    config = ModelConfig(**model)
    _, shapes = split_params(abstract_model(config))
    rng = np.random.default_rng(0)

    def normal(shape, scale):
        return jax.numpy.asarray(rng.standard_normal(shape, np.float32) * np.float32(scale))

    params = jax.tree.map(lambda s: normal(s.shape, 0.02), shapes)
    grads = jax.tree.map(lambda s: normal(s.shape, 1e-3), shapes)
    optimizer = optax.adamw(1e-4)
    _, opt_state = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    jax.block_until_ready(opt_state)
    return config, params, opt_state


def _item_bytes(step_dir: pathlib.Path) -> dict:
    from bam_jax.benchmarks.child import file_bytes
    return {item: file_bytes(pathlib.Path(str(step_dir)) / item) for item in ('params', 'opt_state')}


def save(workdir: pathlib.Path, compression: bool, config, params, opt_state) -> dict:
    """Saves one checkpoint of the state; its times and its items' bytes on disk."""
    from bam_jax.workdir import RunCheckpoints

    shutil.rmtree(workdir, ignore_errors=True)
    os.sync()
    cpu, start = _cpu_seconds(), time.perf_counter()
    checkpoints = RunCheckpoints(workdir, keep=1, compression=compression)
    checkpoints.save(1, params, opt_state, {'step': 1, 'data_position': 1, 'seed': 0}, config)
    blocking = time.perf_counter() - start
    checkpoints.close()  # waits for the background save
    seconds = time.perf_counter() - start
    return {'save_seconds': seconds, 'blocking_seconds': blocking, 'save_cpu_seconds': _cpu_seconds() - cpu,
            **_item_bytes(checkpoints.step_dir(1))}


def restore(workdir: pathlib.Path, params, opt_state) -> dict:
    """Restores params and opt_state onto the CPU device; its times."""
    import jax

    from bam_jax.workdir import RunCheckpoints

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    on_device = lambda tree: jax.tree.map(lambda _: device, tree)  # noqa: E731
    cpu, start = _cpu_seconds(), time.perf_counter()
    with RunCheckpoints(workdir, keep=1) as checkpoints:
        restored = checkpoints.restore(1, abstract(params), on_device(params), abstract(opt_state),
                                       on_device(opt_state))
        jax.block_until_ready(restored[:2])
    return {'restore_seconds': time.perf_counter() - start, 'restore_cpu_seconds': _cpu_seconds() - cpu}


def _median_row(runs: list[dict]) -> dict:
    row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    row.update(save_seconds_range=[min(r['save_seconds'] for r in runs), max(r['save_seconds'] for r in runs)])
    return row


def measure(directory: pathlib.Path, model: dict) -> dict:
    """Saves and restores the state both ways, interleaved; the median of each measure."""
    import jax

    print('  building a 200M model\'s weights and AdamW state ...', flush=True)
    config, params, opt_state = training_state(model)
    runs = {variant: [] for variant in VARIANTS}
    for repeat in range(REPEATS):
        for variant in (VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]):
            workdir = directory / variant
            record = save(workdir, variant == 'zstd', config, params, opt_state)
            record.update(restore(workdir, params, opt_state))
            runs[variant].append(record)
            print(f'  {variant}: saved in {record["save_seconds"]:.1f} s, restored in '
                  f'{record["restore_seconds"]:.1f} s', flush=True)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    return {'model': model, 'repeats': REPEATS, 'param_bytes': nbytes(params), 'opt_state_bytes': nbytes(opt_state),
            'rows': {variant: _median_row(records) for variant, records in runs.items()},
            'runs': runs, 'trained': trained_sizes(directory / 'trained')}


def trained_sizes(directory: pathlib.Path) -> dict | None:
    """make demo's seed checkpoint (params, AdamW state) re-saved both ways: bytes on disk."""
    import orbax.checkpoint as ocp

    from bam_jax import workdir
    from bam_jax.workdir import RunCheckpoints

    if not DEMO_SEED.exists():
        return None
    step_dir = workdir.resolve_checkpoint(DEMO_SEED)
    config = workdir.read_model_config(step_dir)
    with ocp.StandardCheckpointer() as checkpointer:
        params, opt_state = (checkpointer.restore(step_dir / item) for item in ('params', 'opt_state'))
    found = {'step_dir': str(step_dir)}
    for variant in VARIANTS:
        with RunCheckpoints(directory / variant, keep=1, compression=variant == 'zstd') as checkpoints:
            checkpoints.save(1, params, opt_state, {'step': 1, 'data_position': 1, 'seed': 0}, config)
        found[variant] = _item_bytes(checkpoints.step_dir(1))
    return found


def run() -> dict:
    from bam_jax.benchmarks.upcycle import BENCH_MODEL

    with tempfile.TemporaryDirectory(prefix='bam_jax_bench_checkpoints_') as directory:
        return measure(pathlib.Path(directory), BENCH_MODEL)


def _saving(zstd: dict, plain: dict) -> float:
    """The share of the bytes zstd saves."""
    return 1 - (zstd['params'] + zstd['opt_state']) / (plain['params'] + plain['opt_state'])


def print_table(r: dict) -> None:
    header = (f'{"checkpoints (200M + AdamW)":<28} {"params MB":>9} {"opt MB":>7} {"saved":>6} {"save s":>7} '
              f'{"blocking s":>10} {"save CPU s":>10} {"restore s":>9} {"restore CPU s":>13}')
    print(header)
    print('-' * len(header))
    zstd, plain = r['rows']['zstd'], r['rows']['plain']
    for label, row in (('zstd (Orbax default)', zstd), ('uncompressed', plain)):
        print(f'{label:<28} {row["params"] / 1e6:>9,.0f} {row["opt_state"] / 1e6:>7,.0f} '
              f'{_saving(row, plain):>6.1%} {row["save_seconds"]:>7.2f} {row["blocking_seconds"]:>10.2f} '
              f'{row["save_cpu_seconds"]:>10.2f} {row["restore_seconds"]:>9.2f} {row["restore_cpu_seconds"]:>13.2f}')
    print(f'{"tensor bytes":<28} {r["param_bytes"] / 1e6:>9,.0f} {r["opt_state_bytes"] / 1e6:>7,.0f}')
    trained = r['trained']
    if trained:
        print(f'{"demo seed (trained), zstd":<28} {trained["zstd"]["params"] / 1e6:>9,.1f} '
              f'{trained["zstd"]["opt_state"] / 1e6:>7,.1f} {_saving(trained["zstd"], trained["plain"]):>6.1%}')
        print(f'{"demo seed, uncompressed":<28} {trained["plain"]["params"] / 1e6:>9,.1f} '
              f'{trained["plain"]["opt_state"] / 1e6:>7,.1f} {0:>6.1%}')
    gb = (r['param_bytes'] + r['opt_state_bytes']) / 1e9
    print(f'config: random float32 weights and one step\'s AdamW moments, {gb:.2f} GB of tensors; median of '
          f'{r["repeats"]} interleaved saves and restores each; saved: bytes zstd saves against uncompressed')
    print(f'zstd costs {(zstd["save_cpu_seconds"] - plain["save_cpu_seconds"]) / gb:.1f} CPU-s per GB saved and '
          f'{(zstd["restore_cpu_seconds"] - plain["restore_cpu_seconds"]) / gb:.1f} per GB restored; rule: keep it '
          'only if it saves 15% or more of the bytes')
