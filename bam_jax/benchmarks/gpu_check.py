"""The accelerator check: one run, one report, against the goals an accelerator must meet.

  python -m bam_jax.benchmarks.gpu_check [--smoke] [--out runs/gpu_check.json] [--budget_s 390]
  (launch/gpu_check.sh wraps it; docs/accelerator_check.md: running it on a lent GPU machine)

On one GPU (or TPU chip) it trains, on synthetic batches, BAM's small model (gin/models/
small_590m.gin, 590M parameters, bfloat16) as dense, BTX (4 FFN experts, top-1: the dense
model's active size), BAM expert-KV and BAM shared-KV, with the fused attention kernel of the
platform (cudnn on GPU, splash on TPU); then BTX trained dropless, and dense and BAM with the
plain attention. Each training row gives the step time, the achieved model FLOP rate and MFU against the
chip's data-sheet bf16 peak (attention FLOPs counted over the full T x T, as for every kernel).
Goals: dense MFU >= 55%, BAM (both) MFU >= 45%, BTX step time <= 1.10x dense. Then the decode
table of bam_jax/benchmarks/decode.py (prefill and the decode loop, batch 1 and 16, the paper's
setting) for dense, BTX and both BAMs.

Rows run in order of importance (the training rows with goals, the decode table, the other
training rows); once `--budget_s` is spent, the rest are listed as skipped, and a row that fails
(a kernel refusing a shape, memory, an API of another jax version) is listed with its error, so
the report always comes out, with the versions of jax and flax it ran with. It imports neither
seqio, TensorFlow, lm_eval, tensorboardX nor gcsfs. --smoke runs the same code on a tiny shape in
float32 with the 'xla' kernel (any platform, a minute on a CPU): it checks the script, not the
goals.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import pathlib
import platform
import sys
import time

GOALS = {'dense': ('mfu', 0.55), 'bam': ('mfu', 0.45), 'bam_shared_kv': ('mfu', 0.45), 'btx': ('vs_dense', 1.10)}
FUSED = {'gpu': 'cudnn', 'tpu': 'splash'}
# (row name, architecture of benchmarks/__main__.py, attention kernel: 'fused' or 'plain')
ROWS = (('dense', 'dense', 'fused'), ('btx', 'btx', 'fused'), ('bam', 'bam', 'fused'),
        ('bam_shared_kv', 'bam_shared_kv', 'fused'), ('btx_dropless', 'btx_dropless', 'fused'),
        ('dense_plain', 'dense', 'plain'), ('bam_plain', 'bam', 'plain'))
DECODE_ARCHS = ('dense', 'btx', 'bam', 'bam_shared_kv')
# No row starts after this many seconds: with start-up and the last row, the check stays within 8
# minutes on one H100/H200, so a 15-minute lease has room for the machine's start and a rerun.
BUDGET_S = 390.0


@dataclasses.dataclass(frozen=True)
class Shape:
    model: dict
    batch: int  # per device
    seq_len: int
    steps: int
    decode_settings: tuple
    decode_batches: tuple


FULL = Shape(model=dict(vocab_size=256000, d_model=1024, num_layers=6, num_heads=8, num_kv_heads=8, d_ff=2048,
                        tie_embeddings=False, dtype='bfloat16'),
             batch=8, seq_len=2048, steps=8, decode_settings=(('paper', 256, 16),), decode_batches=(1, 16))
SMOKE = Shape(model=dict(vocab_size=384, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64,
                         dtype='float32'),
              batch=1, seq_len=32, steps=1, decode_settings=(('paper', 16, 3),), decode_batches=(1, 2))


def _attempt(row: dict, deadline: float, log, measure) -> dict:
    """`row` with the figures `measure()` returns, or with why it has none ('skipped'): the budget
    was spent before it started, or it failed (a kernel refusing a shape, memory, an API of another
    jax version), which must not cost the rows after it."""
    if time.perf_counter() > deadline:
        return {**row, 'skipped': 'time budget spent'}
    try:
        return {**row, **measure()}
    except Exception as e:  # noqa: BLE001
        lines = str(e).strip().splitlines()
        row = {**row, 'skipped': f'failed: {type(e).__name__}: {lines[0][:200] if lines else ""}'}
        log(f'  {row["skipped"]}')
        return row


def _train_row(name: str, arch: str, impl: str, dense, shape: Shape, peak: tuple, deadline: float, log) -> dict:
    import jax

    from bam_jax.benchmarks.__main__ import arch_config
    from bam_jax.benchmarks.train_step import time_train_step

    def measure():
        log(f'timing {name} ({impl} attention) ...')
        config = dataclasses.replace(arch_config(dense, arch), attention_impl=impl)
        figures = time_train_step(config, shape.batch * jax.device_count(), shape.seq_len, shape.steps)
        return {**figures, 'mfu': figures['achieved_flops'] / peak[0]}

    row = {'name': name, 'arch': arch, 'attention_impl': impl, 'peak_flops': peak[0], 'peak_source': peak[1]}
    return _attempt(row, deadline, log, measure)


def _decode_row(arch: str, config, setting: tuple, shape: Shape, deadline: float, log) -> dict:
    from bam_jax.benchmarks import decode

    def measure():
        log(f'timing decode {arch}, {setting[0]} ({setting[1]} + {setting[2]} tokens) ...')
        return decode.time_row(arch, config, setting, shape.decode_batches)

    row = {'arch': arch, 'setting': setting[0], 'prompt_len': setting[1], 'new_tokens': setting[2]}
    return _attempt(row, deadline, log, measure)


def run_rows(shape: Shape, fused: str, deadline: float, log) -> tuple[list[dict], list[dict]]:
    """(training rows in ROWS' order, judged; decode rows), timed in order of importance: the
    training rows with goals, then the decode table, then the other training rows. No row starts
    after `deadline`, so the whole check ends within about one row of it."""
    from bam_jax.benchmarks import decode
    from bam_jax.benchmarks.__main__ import arch_config
    from bam_jax.benchmarks.peak import peak_flops
    from bam_jax.models import ModelConfig

    dense = ModelConfig(**shape.model)
    peak = peak_flops(dense.compute_dtype)

    def train(rows):
        return {name: _train_row(name, arch, fused if kernel == 'fused' else 'plain', dense, shape, peak, deadline, log)
                for name, arch, kernel in rows}

    timed = train([row for row in ROWS if row[0] in GOALS])
    decode_rows = [_decode_row(arch, dataclasses.replace(arch_config(dense, arch), attention_impl=fused), setting,
                               shape, deadline, log)
                   for setting in shape.decode_settings for arch in DECODE_ARCHS]
    timed.update(train([row for row in ROWS if row[0] not in GOALS]))
    return judge([timed[name] for name, _, _ in ROWS]), decode.compare_to_btx(decode_rows, shape.decode_batches)


def judge(rows: list[dict]) -> list[dict]:
    """Adds each timed row's step time and FLOP rate relative to the first (dense) row, and its
    goal (GOALS) with whether it is met."""
    base = rows[0]
    for row in rows:
        if 'skipped' not in row and 'skipped' not in base:
            row['vs_dense'] = row['step_time_s'] / base['step_time_s']
            row['rate_vs_dense'] = row['achieved_flops'] / base['achieved_flops']
        metric, goal = GOALS.get(row['name'], (None, None))
        if metric and metric in row:
            row['goal'] = f'{metric} {"<=" if metric == "vs_dense" else ">="} {goal:g}'
            row['meets_goal'] = row[metric] <= goal if metric == 'vs_dense' else row[metric] >= goal
    return rows


def print_train_table(rows: list[dict], shape: Shape, smoke: bool) -> None:
    header = (f'{"row":<16} {"attention":>9} {"params":>9} {"step ms":>9} {"vs dense":>8} {"TFLOP/s":>8} '
              f'{"rate/dense":>10} {"MFU":>6}  {"goal":<15} {"met":<4}')
    print(header)
    print('-' * len(header))
    for r in rows:
        if 'skipped' in r:
            print(f'{r["name"]:<16} {r["attention_impl"]:>9} skipped: {r["skipped"]}')
            continue
        met = '-' if smoke or 'meets_goal' not in r else ('yes' if r['meets_goal'] else 'NO')
        print(f'{r["name"]:<16} {r["attention_impl"]:>9} {r["params"] / 1e6:>8.1f}M {r["step_time_s"] * 1e3:>9.1f} '
              f'{r.get("vs_dense", float("nan")):>7.2f}x {r["achieved_flops"] / 1e12:>8.2f} '
              f'{r.get("rate_vs_dense", float("nan")):>10.2f} {r["mfu"]:>6.1%}  {r.get("goal", "-"):<15} {met:<4}')
    m = shape.model
    print(f'config: {m["dtype"]}, d_model {m["d_model"]}, {m["num_layers"]} layers, d_ff {m["d_ff"]}, vocab '
          f'{m["vocab_size"]}; batch {shape.batch} x {shape.seq_len} per device, {shape.steps} timed steps (median); '
          f'experts: 4 FFN top-1 (capacity 1.25 unless dropless), 4 soft attention')
    print(f'MFU peak: {rows[0]["peak_flops"] / 1e12:.1f} TFLOP/s ({rows[0]["peak_source"]})'
          + ('; smoke run: goals not judged' if smoke else ''))


def software() -> dict:
    """The versions the check ran with: the lent machines' images move on without notice."""
    import jax

    versions = {'python': platform.python_version()}
    for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorstore', 'numpy'):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions['backend'] = jax.default_backend()
    versions['platform_version'] = jax.devices()[0].client.platform_version.strip()  # CUDA's, on a GPU
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bam_jax.benchmarks.gpu_check')
    parser.add_argument('--smoke', action='store_true', help='a tiny float32 shape on any platform')
    parser.add_argument('--budget_s', type=float, default=BUDGET_S,
                        help='start no row (training or decode) after this many seconds')
    parser.add_argument('--out', default='runs/gpu_check.json')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import jax

    shape = SMOKE if args.smoke else FULL
    backend = jax.default_backend()
    fused = 'xla' if args.smoke else FUSED.get(backend)
    if fused is None:  # before the heavy imports: a mistaken launch fails at once
        print(f'error: no fused attention kernel on {backend}; run with --smoke, or on a GPU or TPU', file=sys.stderr)
        return 1
    from bam_jax.benchmarks import decode

    devices = f'{jax.device_count()} x {jax.devices()[0].device_kind}'
    versions = software()
    print(f'accelerator check on {devices}, {"smoke shape" if args.smoke else "full shape"}; '
          + ', '.join(f'{name} {version}' for name, version in versions.items()), flush=True)
    log = lambda message: print(message, flush=True)  # noqa: E731
    rows, decode_rows = run_rows(shape, fused, start + args.budget_s, log)
    print()
    print_train_table(rows, shape, args.smoke)
    print()
    decode.print_table(decode_rows, f'decode: greedy, no EOS, {fused} prefill attention (decoding reads the cache '
                                    f'with the plain kernel); {devices}', shape.decode_batches)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'devices': devices, 'software': versions, 'smoke': args.smoke, 'train': rows,
                               'decode': decode_rows, 'seconds': time.perf_counter() - start}, indent=1, default=str))
    print(f'saved {out} ({time.perf_counter() - start:.0f} s)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
