"""`make bench`: speed of the train step and of decoding for dense, BTX, BAM and Lory models, of
the upcycler, of the Hugging Face import and export, of a resume's data work and of the prepared
data path, routers initialised from domains, and training checkpoints' compression, as eight
tables and JSON ({"train_step": [rows], "decode": [rows], "upcycle": {...}, "hf_io": {...},
"resume": {...}, "data": {...}, "routers": {...}, "checkpoints": {...}}, null for a table not run).

  python -m bam_jax.benchmarks [--model gin/models/X.gin]
                               [--archs dense,btx,btx_dropless,bam,bam_dropless,bam_shared_kv,lory4,lory8]
                               [--decode_archs dense,btx,bam,bam_shared_kv,lory4]
                               [--batch N] [--seq_len T] [--steps S]
                               [--tables train,decode,upcycle,hf_io,resume,data,routers,checkpoints]
                               [--resume_position N] [--router_runs runs/demo]

Every architecture is timed in the same run on the same model size. BTX has 4 FFN experts
with top-1 routing, so its active parameters are the dense model's (plus a router); BAM adds
4 soft-routed attention experts (expert KV or shared KV). btx_dropless and bam_dropless train
the same models without a capacity (MoEConfig.dropless: every assignment computed, sorted by
expert, through jax.lax.ragged_dot); their model FLOPs are the capacity rows' (the chosen
experts only), so the FLOP-rate columns compare the two directly. On CPU, XLA computes
ragged_dot densely, every row against every group's weights (E times the chosen experts'
FLOPs), so CPU dropless rows are expected to be slower; on TPU and GPU it is a grouped matmul.
lory4 and lory8 merge 4 or 8 FFN experts per segment of --lory_segment_len tokens (the dense
model's active size plus the merge, E/T of an FFN, shown as "merge"). The decode table
(decode.py) times prefill and the decode loop of the generation engine, at batch 1 and 16, in the
BAM paper's setting and at long context, with each model's cache size and its decode speed
relative to BTX. The upcycle table (upcycle.py) times `bam-jax upcycle --method=btx` of 4 dense
200M checkpoints end to end, from uncompressed and from zstd inputs, against mergekit-moe merging
the same weights and against copies of their files, and measures peak memory.
The hf_io table (hf_io.py) does the same for `import-hf` of a Llama model and `export-hf` of the
result, against copies of its safetensors file. The resume table (resume.py) times the data
work of a resume at --resume_position against a fresh start.
The data table (data.py) times `prepare-data`'s work (byte vocabulary, and a 32k BPE tokenizer
against its bare encode_batch), the prepared-data training stream, its memory over a 200 MB and a
2 GB domain, and a start at batch 1,000,000. The routers table (routers.py) upcycles `make demo`'s
seed and experts with random and domain-initialised routers and evaluates them before any mix
training (skipped without those runs). The checkpoints table (checkpoints.py) saves and restores
a 200M model's training checkpoint (weights and AdamW state) with and without zstd: bytes on
disk, seconds and CPU seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

ARCHS = ('dense', 'btx', 'btx_dropless', 'bam', 'bam_dropless', 'bam_shared_kv', 'lory4', 'lory8')
TABLES = ('train', 'decode', 'upcycle', 'hf_io', 'resume', 'data', 'routers', 'checkpoints')


def arch_config(dense, arch: str, lory_segment_len: int = 64):
    """The bench's variant `arch` of the dense ModelConfig."""
    from bam_jax.models.config import LoryConfig, MoAConfig, MoEConfig

    if arch.startswith('lory'):
        return dataclasses.replace(dense, lory=LoryConfig(num_experts=int(arch[4:]), segment_len=lory_segment_len))

    top1 = MoEConfig(num_experts=4, routing='top_k', top_k=1, gate='softmax')
    dropless = dataclasses.replace(top1, dropless=True)
    return {
        'dense': dense,
        'btx': dataclasses.replace(dense, moe=top1),
        'btx_dropless': dataclasses.replace(dense, moe=dropless),
        'bam': dataclasses.replace(dense, moe=top1, moa=MoAConfig(num_experts=4, shared_kv=False)),
        'bam_dropless': dataclasses.replace(dense, moe=dropless, moa=MoAConfig(num_experts=4, shared_kv=False)),
        'bam_shared_kv': dataclasses.replace(dense, moe=top1, moa=MoAConfig(num_experts=4, shared_kv=True)),
    }[arch]


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m bam_jax.benchmarks')
    parser.add_argument('--model', default=None, help='model gin file (default: the bench shape below)')
    parser.add_argument('--archs', default=','.join(ARCHS),
                        help=f'comma list of {ARCHS}; dense always runs, as the baseline')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--seq_len', type=int, default=256)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--lory_segment_len', type=int, default=64,
                        help='Lory segment length; must divide --seq_len so no segment is padded')
    parser.add_argument('--dtype', default=None,
                        help='compute dtype (default: bfloat16 on accelerators, float32 on CPU)')
    parser.add_argument('--decode_archs', default='dense,btx,bam,bam_shared_kv,lory4',
                        help='the decode table\'s architectures (from the same list); btx is the reference')
    parser.add_argument('--tables', default=','.join(TABLES), help=f'comma list of {TABLES}')
    parser.add_argument('--resume_position', type=int, default=1_000_000,
                        help='resume table: the data position (batches of 8 x 1024 tokens) to resume at')
    parser.add_argument('--router_runs', default='runs/demo',
                        help="routers table: the directory of make demo's seed, code, law and math runs")
    parser.add_argument('--out', default='runs/bench/results.json')
    args = parser.parse_args()
    archs = ['dense'] + [a for a in args.archs.split(',') if a and a != 'dense']
    args.decode_archs = [a for a in args.decode_archs.split(',') if a]
    args.tables = [t for t in args.tables.split(',') if t]
    unknown = sorted(set(archs + args.decode_archs) - set(ARCHS))
    if unknown:
        parser.error(f'unknown architectures {unknown}; choose from {ARCHS}')
    if set(args.tables) - set(TABLES):
        parser.error(f'unknown --tables {sorted(set(args.tables) - set(TABLES))}; choose from {TABLES}')
    if any(a.startswith('lory') for a in archs) and args.seq_len % args.lory_segment_len:
        parser.error(f'--lory_segment_len {args.lory_segment_len} does not divide --seq_len {args.seq_len}')
    args.archs = archs
    return args


def _print_train_table(rows: list[dict], args: argparse.Namespace, dtype: str, devices: str) -> None:
    header = (f'{"model":<24} {"params":>9} {"step ms":>9} {"vs dense":>8} {"tokens/s":>10} '
              f'{"GFLOP/tok":>10} {"TFLOP/s":>8} {"rate/dense":>10} {"MFU":>6} {"merge":>6}')
    print(header)
    print('-' * len(header))
    for r in rows:
        merge = f'{r["lory_merge_overhead"]:>6.1%}' if r['lory_merge_overhead'] else f'{"-":>6}'
        print(f'{r["name"]:<24} {r["params"] / 1e6:>8.1f}M {r["step_time_s"] * 1e3:>9.1f} '
              f'{r["step_time_vs_dense"]:>7.2f}x {r["tokens_per_s"]:>10,.0f} '
              f'{r["flops_per_token"] / 1e9:>10.3f} {r["achieved_flops"] / 1e12:>8.3f} '
              f'{r["flop_rate_vs_dense"]:>10.2f} {r["mfu"]:>6.1%} {merge}')
    dropless = ''
    if any(r['arch'].endswith('_dropless') for r in rows):
        dropless = '; *_dropless: none, the same model FLOPs'
        if devices.lower().endswith('cpu'):
            dropless += ', slower on CPU, where ragged_dot computes every group densely'
    print(f'config: {dtype}, batch {args.batch} x seq_len {args.seq_len}, {args.steps} timed steps (median), '
          f'{devices}; experts: 4 FFN top-1 (capacity factor 1.25{dropless}), 4 soft attention; '
          f'Lory segments of {args.lory_segment_len} tokens (merge: E/T of an FFN per token)')
    print(f'MFU peak: {rows[0]["peak_flops"] / 1e12:.3f} TFLOP/s ({rows[0]["peak_source"]})')


def main() -> None:
    args = _args()
    import gin
    import jax

    from bam_jax.gin_config import parse_gin
    from bam_jax.models import ModelConfig

    on_cpu = jax.devices()[0].platform == 'cpu'
    dtype = args.dtype or ('float32' if on_cpu else 'bfloat16')
    if args.model:
        parse_gin([args.model], [f"ModelConfig.dtype = '{dtype}'"])
        dense = ModelConfig()
        gin.clear_config()
        name = pathlib.Path(args.model).stem
    else:
        # ~14M parameters: big enough for matmuls to dominate on a CPU, small enough to run in seconds.
        dense = ModelConfig(vocab_size=384, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8,
                            d_ff=1536, dtype=dtype)
        name = 'bench_14m'

    devices = f'{jax.device_count()} x {jax.devices()[0].device_kind}'
    results = {'train_step': None, 'decode': None, 'upcycle': None, 'hf_io': None, 'resume': None, 'data': None,
               'routers': None, 'checkpoints': None}
    if 'train' in args.tables:
        results['train_step'] = _train_table(dense, name, dtype, devices, args)
    if 'decode' in args.tables:
        from bam_jax.benchmarks import decode
        configs = {arch: arch_config(dense, arch, args.lory_segment_len) for arch in args.decode_archs}
        print()
        results['decode'] = decode.run(configs)
        decode.print_table(results['decode'], f'config: {name}, {dtype}, {devices}; greedy, no EOS; prefill includes '
                                              'the first new token; tok/s: the decode loop\'s new tokens per second '
                                              '(all rows); cache: K/V (and Lory\'s merged FFNs) at batch 16')
    _module_tables(args, results)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f'saved {out}')


def _module_tables(args: argparse.Namespace, results: dict) -> None:
    """The tables whose module does its own work: module.run(*arguments), then print_table."""
    import importlib

    tables = [('upcycle', 'timing upcycle (btx, 4 x 200M), mergekit-moe and copies of the inputs', ()),
              ('hf_io', 'timing import-hf and export-hf (llama) and copies of their input', ()),
              ('resume', f'timing a resume at batch {args.resume_position:,}', (args.resume_position,)),
              ('data', 'timing data preparation and the prepared-data stream', ()),
              ('routers', "upcycling make demo's runs with random and domain routers, and evaluating them",
               (args.router_runs,)),
              ('checkpoints', 'saving a training checkpoint (200M + AdamW) with and without zstd', ())]
    for table, message, arguments in tables:  # each table is the module of its name
        if table in args.tables:
            bench = importlib.import_module(f'bam_jax.benchmarks.{table}')
            print(f'\n{message} ...', flush=True)
            results[table] = bench.run(*arguments)
            bench.print_table(results[table])


def _train_table(dense, name: str, dtype: str, devices: str, args: argparse.Namespace) -> list[dict]:
    import jax

    from bam_jax.benchmarks.peak import peak_flops
    from bam_jax.benchmarks.train_step import time_train_step
    from bam_jax.models.flops import lory_merge_overhead

    peak, peak_source = peak_flops(jax.numpy.dtype(dtype))
    rows = []
    for arch in args.archs:
        print(f'timing {arch} ...', flush=True)
        model = arch_config(dense, arch, args.lory_segment_len)
        row = time_train_step(model, args.batch, args.seq_len, args.steps)
        row.update(name=f'{arch} {name}', arch=arch, dtype=dtype, batch=args.batch, seq_len=args.seq_len,
                   devices=devices, peak_flops=peak, peak_source=peak_source,
                   mfu=row['achieved_flops'] / peak, lory_merge_overhead=lory_merge_overhead(model))
        rows.append(row)
    for r in rows:
        r['step_time_vs_dense'] = r['step_time_s'] / rows[0]['step_time_s']
        r['flop_rate_vs_dense'] = r['achieved_flops'] / rows[0]['achieved_flops']
    _print_train_table(rows, args, dtype, devices)
    return rows


if __name__ == '__main__':
    main()
