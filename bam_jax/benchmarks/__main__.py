"""`make bench`: speed of the train step, printed as a table and saved as JSON.

  python -m bam_jax.benchmarks [--model gin/models/X.gin] [--batch N] [--seq_len T] [--steps S]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def main() -> None:
    parser = argparse.ArgumentParser(prog='python -m bam_jax.benchmarks')
    parser.add_argument('--model', default=None, help='model gin file (default: the bench shape below)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--seq_len', type=int, default=256)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--dtype', default=None,
                        help='compute dtype (default: bfloat16 on accelerators, float32 on CPU)')
    parser.add_argument('--out', default='runs/bench/results.json')
    args = parser.parse_args()

    import gin
    import jax

    from bam_jax.benchmarks.peak import peak_flops
    from bam_jax.benchmarks.train_step import time_train_step
    from bam_jax.gin_config import parse_gin
    from bam_jax.models import ModelConfig

    on_cpu = jax.devices()[0].platform == 'cpu'
    dtype = args.dtype or ('float32' if on_cpu else 'bfloat16')
    if args.model:
        parse_gin([args.model], [f"ModelConfig.dtype = '{dtype}'"])
        model = ModelConfig()
        gin.clear_config()
        name = pathlib.Path(args.model).stem
    else:
        # ~13M parameters: big enough for matmuls to dominate on a CPU, small enough to run in seconds.
        model = ModelConfig(vocab_size=384, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8,
                            d_ff=1536, dtype=dtype)
        name = 'bench_13m'

    peak, peak_source = peak_flops(jax.numpy.dtype(dtype))
    row = time_train_step(model, args.batch, args.seq_len, args.steps)
    row.update(name=f'dense {name}', dtype=dtype, batch=args.batch, seq_len=args.seq_len,
               devices=f'{jax.device_count()} x {jax.devices()[0].device_kind}',
               peak_flops=peak, peak_source=peak_source, mfu=row['achieved_flops'] / peak)
    rows = [row]

    header = (f'{"model":<20} {"params":>10} {"dtype":>9} {"step ms":>9} {"tokens/s":>10} '
              f'{"GFLOP/tok":>10} {"TFLOP/s":>8} {"MFU":>6}')
    print(header)
    print('-' * len(header))
    for r in rows:
        print(f'{r["name"]:<20} {r["params"] / 1e6:>9.1f}M {r["dtype"]:>9} {r["step_time_s"] * 1e3:>9.1f} '
              f'{r["tokens_per_s"]:>10,.0f} {r["flops_per_token"] / 1e9:>10.3f} '
              f'{r["achieved_flops"] / 1e12:>8.3f} {r["mfu"]:>6.1%}')
    print(f'config: batch {args.batch} x seq_len {args.seq_len}, {args.steps} timed steps (median), '
          f'{rows[0]["devices"]}')
    print(f'MFU peak: {peak / 1e12:.3f} TFLOP/s ({peak_source})')
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f'saved {out}')


if __name__ == '__main__':
    main()
