"""`bam-jax`: the command line.

  bam-jax train --gin_file=F [--gin_file=F2 ...] [--gin.NAME=VALUE ...] --workdir=DIR
  bam-jax upcycle --method=M [--seed=DIR] --experts=DIR,DIR,... --out=DIR [--no_seed_expert] [--overwrite]
  bam-jax eval --workdir=DIR [--workdir=DIR ...] [--tasks=a,b [--num_fewshot=N] [--limit=N]]
               [--gin.NAME=VALUE ...] [--json]
  bam-jax generate --workdir=DIR (--prompt=TEXT [--prompt=TEXT ...] | --prompts=FILE.jsonl)
                   [--max_new_tokens=N] [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S]
                   [--stop=TEXT ...] [--json] [--gin.NAME=VALUE ...]
  bam-jax import-hf --hf_dir=DIR --out=DIR [--dtype=float32|bfloat16] [--overwrite]
  bam-jax export-hf --workdir=DIR --out=DIR [--format=auto|llama|...|bam_jax] [--dtype=bfloat16|float32]
                    [--max_shard_mb=N] [--overwrite] [--gin.NAME=VALUE ...]
  bam-jax prepare-data --gin_file=F [--gin_file=F2 ...] [--domains=a,b] [--skip_bad] [--gin.NAME=VALUE ...]
  bam-jax experts remove --workdir=MIX --expert=NAME --out=DIR
  bam-jax experts add --workdir=MIX --run=DENSE_RUN --out=DIR [--router_data=SOURCE] [--router_tokens=N]
  bam-jax experts replace --workdir=MIX --expert=NAME --run=DENSE_RUN --out=DIR

train, eval, generate and prepare-data also take --distributed: join a multi-process job (a
pod's hosts, or launch/run.sh --local_processes=N on one machine) through
jax.distributed.initialize(). prepare-data's workers then share each domain's input files.

Errors a user can fix print one line, `error: ...`, and exit with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

from bam_jax.errors import BamJaxError

EXIT_USER_ERROR = 1
EXIT_SIGTERM = 143


def _quiet_backends() -> None:
    # TensorFlow (under seqio's vocabularies) logs a wall of C++ messages at import; keep stderr readable.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    os.environ.setdefault('ABSL_MIN_LOG_LEVEL', '3')


def _split_gin_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--gin.NAME=VALUE` (T5X style) from the other arguments."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith('--gin.'):
            name, eq, value = arg[len('--gin.'):].partition('=')
            if not eq or not name:
                raise BamJaxError(f'bad override {arg!r}: expected --gin.NAME=VALUE')
            bindings.append(f'{name} = {value}')
        else:
            rest.append(arg)
    return rest, bindings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='bam-jax', description='Branch-Train-Mix: train dense seeds and experts, mix them into MoEs.',
        epilog='Any command also takes gin overrides: --gin.NAME=VALUE (strings need inner quotes).')
    commands = parser.add_subparsers(dest='command', required=True)
    for name, command in COMMANDS.items():
        sub = command.add_parser(commands, name)
        if command.every_worker:
            sub.add_argument('--distributed', action='store_true',
                             help='join a multi-process job: jax.distributed.initialize() (automatic on a TPU '
                                  'pod; launch/run.sh passes it)')
    return parser


def _train_parser(commands, name):
    train = commands.add_parser(name, help='train or resume a run (seed, branch, mix)')
    train.add_argument('--gin_file', action='append', required=True,
                       help='gin file; repeatable, later files override earlier ones')
    train.add_argument('--workdir', required=True, help='run directory: checkpoints, metrics, config')
    return train


def _upcycle_parser(commands, name):
    upcycle = commands.add_parser(
        name, help='mix dense checkpoints into one MoE checkpoint (BTX, BAM, sparse upcycling, Lory)',
        description='Builds the initial MoE of the mix stage from dense runs. Each DIR is a run workdir or a '
                    'checkpoint directory (its latest step is used). Writes OUT/checkpoints/0 and OUT/model.gin; '
                    'train it with: bam-jax train --gin_file=OUT/model.gin --gin_file=gin/mix_<method>.gin')
    upcycle.add_argument('--method', required=True, help='btx, bam, bam_shared_kv, sparse_upcycle or lory')
    upcycle.add_argument('--seed', default=None, help='the seed run: the first expert (see --no_seed_expert)')
    upcycle.add_argument('--experts', default='', help='comma-separated dense expert runs, in expert order')
    upcycle.add_argument('--out', required=True, help='output directory (written atomically)')
    upcycle.add_argument('--no_seed_expert', action='store_true',
                         help='the seed joins the averaged parameters but is not an expert')
    upcycle.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    upcycle.add_argument('--num_experts', type=int, default=4, help='sparse_upcycle: copies of the FFN (default 4)')
    upcycle.add_argument('--expert_split', type=int, default=1,
                         help='cut each FFN into this many experts of d_ff/split units (BTX ablation)')
    upcycle.add_argument('--router_seed', type=int, default=0, help='random seed of the new routers')
    upcycle.add_argument('--router_init', choices=('random', 'domain'), default='random',
                         help="routers' first rows: random, or each expert's domain direction, from its run's "
                              'training data (bam_jax/upcycle/router_init.py)')
    upcycle.add_argument('--router_data', default='',
                         help='with --router_init=domain: each input model\'s domain (a DataConfig.source: '
                              'seed, code, code:3,law:1 ...), comma-separated in input order (the seed\'s first); '
                              'default: each run\'s own DataConfig.source')
    upcycle.add_argument('--router_tokens', type=int, default=None,
                         help='with --router_init=domain: tokens read from each domain (default 32768)')
    upcycle.add_argument('--router_inputs', choices=('seed', 'layerwise'), default='seed',
                         help="with --router_init=domain: the router inputs from the dense seed, or from the "
                              'MoE layer by layer')
    return upcycle


def _generate_parser(commands, name):
    generate = commands.add_parser(
        name, help="complete prompts with a run's latest checkpoint (KV-cache decoding)",
        description="Completes each prompt with the run's latest checkpoint and its own vocabulary, under its "
                    'config.gin plus any --gin overrides. Greedy unless --temperature > 0. Prints the completions '
                    '(or JSON lines with --json); progress goes to stderr.')
    generate.add_argument('--workdir', required=True, help='the run directory')
    generate.add_argument('--prompt', action='append', default=[], help='a prompt; repeatable')
    generate.add_argument('--prompts', default=None,
                          help='a JSONL file, one prompt per line: {"prompt": "..."} or a JSON string')
    generate.add_argument('--max_new_tokens', type=int, default=64, help='new tokens per prompt (default 64)')
    generate.add_argument('--temperature', type=float, default=0.0, help='0 (default): greedy')
    generate.add_argument('--top_k', type=int, default=0, help='sample among the K most likely tokens (0: all)')
    generate.add_argument('--top_p', type=float, default=1.0, help='nucleus sampling threshold (1.0: off)')
    generate.add_argument('--seed', type=int, default=0, help='sampling seed')
    generate.add_argument('--stop', action='append', default=[], help='stop at this text; repeatable')
    generate.add_argument('--batch_size', type=int, default=16, help='prompts decoded together (default 16)')
    generate.add_argument('--json', action='store_true',
                          help='one JSON object per prompt on stdout: prompt, completion, prompt_ids, '
                               'completion_ids, stop_reason, start_id and input_ids (the start token, then '
                               'prompt_ids: what the model read)')
    return generate


def _prepare_parser(commands, name):
    prepare = commands.add_parser(
        name, help='tokenize the domains of gin files into prepared token files',
        description='Reads every domain the gin files name (the built-in corpora and the text_domain(...) '
                    'user domains), de-duplicates and splits it by content hash, tokenizes it with the run\'s '
                    'vocabulary and writes token files and a manifest to DataConfig.data_dir/DOMAIN (atomically).')
    prepare.add_argument('--gin_file', action='append', required=True, help='gin file; repeatable')
    prepare.add_argument('--domains', default='', help='comma-separated domains (default: all the files name)')
    prepare.add_argument('--skip_bad', action='store_true',
                         help='skip malformed lines and unreadable files, counting them, instead of stopping')
    return prepare


def _experts_parser(commands, name):
    experts = commands.add_parser(
        name, help="expert surgery on a mixed model: remove, add or replace an expert",
        description="Writes OUT, a copy of the mixed model MIX (its latest checkpoint) with one expert removed, "
                    "added from a dense run, or replaced by one; experts are named by their runs (seed, code, ...). "
                    'A new expert\'s router columns come from its domain. Train the routers alone with: bam-jax '
                    'train --gin_file=OUT/model.gin --gin_file=gin/mix_router_only.gin --workdir=DIR')
    operations = experts.add_subparsers(dest='operation', required=True, metavar='OPERATION')
    for operation, help_text in (('remove', 'drop an expert from every layer'),
                                 ('add', "a dense run's weights as a new expert"),
                                 ('replace', "an expert swapped for a dense run's weights")):
        sub = operations.add_parser(operation, help=help_text)
        sub.add_argument('--workdir', required=True, help='the mixed model: a mix run, or an upcycled model')
        if operation != 'add':
            sub.add_argument('--expert', required=True, help='the expert, by name (bam-jax eval lists them)')
        if operation != 'remove':
            sub.add_argument('--run', required=True, help='the dense run that gives the expert')
            sub.add_argument('--router_data', default='',
                             help="the new expert's domain (a DataConfig.source); default: the run's own")
            sub.add_argument('--router_tokens', type=int, default=None,
                             help='tokens read from its domain and from the mix data (default 32768)')
        sub.add_argument('--out', required=True, help='output directory (written atomically)')
        sub.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    return experts


def _eval_parser(commands, name):
    evaluate = commands.add_parser(
        name, help='held-out perplexity per domain, and the routing map of an MoE run',
        description="Evaluates a run's latest checkpoint under its own config.gin plus any --gin overrides "
                    "(e.g. --gin.MoEConfig.routing=\"'soft'\"). Prints a table (or JSON with --json) and writes "
                    'DIR/eval.json and, for expert models, DIR/routing_map.png.')
    evaluate.add_argument('--workdir', required=True, action='append',
                          help='the run directory; repeat it to evaluate several runs in one process')
    evaluate.add_argument('--json', action='store_true',
                          help='print the results as JSON on stdout, one object per line and run')
    evaluate.add_argument('--tasks', default='',
                          help='downstream tasks through lm-evaluation-harness, comma-separated: bam_jax\'s '
                               'offline bam_math, bam_code, bam_law, bam_general (group bam_domains) or any of '
                               'the harness\'s; scores go into eval.json under "tasks"')
    evaluate.add_argument('--num_fewshot', type=int, default=None, help='few-shot examples (default: each task\'s)')
    evaluate.add_argument('--limit', type=int, default=None, help='at most this many items per task')
    return evaluate


def _import_hf_parser(commands, name):
    import_hf = commands.add_parser(
        name, help='a Hugging Face Llama, Mistral, Qwen2 or Qwen3 model as a bam_jax checkpoint',
        description='Reads config.json, the safetensors weights and tokenizer.json of a Hugging Face model '
                    'directory and writes a bam_jax checkpoint directory: use it as INIT_CHECKPOINT, as '
                    '--seed/--experts of upcycle, or with eval and generate.')
    import_hf.add_argument('--hf_dir', required=True, help='the Hugging Face model directory')
    import_hf.add_argument('--out', required=True, help='output directory (written atomically)')
    import_hf.add_argument('--dtype', default='float32', help='stored dtype: float32 (default) or bfloat16')
    import_hf.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    return import_hf


def _export_hf_parser(commands, name):
    export_hf = commands.add_parser(
        name, help="a run's latest checkpoint as a Hugging Face model directory",
        description='Writes config.json, safetensors weights, the tokenizer and generation_config.json. '
                    '--format=auto picks the standard family that computes the model exactly, or bam_jax '
                    '(this project\'s modeling file, shipped in OUT: load with trust_remote_code=True).')
    export_hf.add_argument('--workdir', required=True, help='the run directory (or an upcycled/imported one)')
    export_hf.add_argument('--out', required=True, help='output directory (written atomically)')
    export_hf.add_argument('--format', default='auto', help='auto (default), llama, mistral, qwen2, qwen3, '
                                                            'mixtral, qwen3_moe, qwen2_moe or bam_jax')
    export_hf.add_argument('--dtype', default='bfloat16', help='bfloat16 (default) or float32')
    export_hf.add_argument('--max_shard_mb', type=int, default=5120,
                           help='largest safetensors file before sharding, in MiB (default 5120)')
    export_hf.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    return export_hf


def _import_hf(args, bindings) -> int:
    if bindings:
        raise BamJaxError('import-hf takes no --gin overrides')
    from bam_jax.hf import import_hf
    record = import_hf(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f'{record.architecture}: {record.tensors} tensors, {record.bytes_written / 2**20:.1f} MiB '
          f'({record.dtype}) in {record.seconds:.1f} s')
    print(f'wrote {args.out}; next: bam-jax upcycle --seed={args.out} --experts=... , or '
          f'bam-jax generate --workdir={args.out} --prompt=...')
    return 0


def _export_hf(args, bindings) -> int:
    if args.max_shard_mb < 1:
        raise BamJaxError(f'--max_shard_mb must be >= 1, got {args.max_shard_mb}')
    from bam_jax.hf import export_hf
    record = export_hf(args.workdir, args.out, fmt=args.format, dtype=args.dtype, bindings=bindings,
                       overwrite=args.overwrite, max_shard_bytes=args.max_shard_mb * 2**20)
    remote = ' (load with trust_remote_code=True)' if record.format == 'bam_jax' else ''
    print(f'{record.architecture}{remote}: {record.tensors} tensors in {len(record.files)} file(s), '
          f'{record.bytes_written / 2**20:.1f} MiB ({record.dtype}) in {record.seconds:.1f} s')
    if not record.tokenizer_files:
        print('no tokenizer written: the run reads a SentencePiece model (DataConfig.spm_path), which has no '
              'exact Hugging Face tokenizer here; ship it beside the export', file=sys.stderr)
    print(f'wrote {args.out}')
    return 0


def _generate(args, bindings) -> int:
    if bool(args.prompt) == bool(args.prompts):
        raise BamJaxError('give the prompts either as --prompt=TEXT (repeatable) or as --prompts=FILE.jsonl')
    if args.batch_size < 1:
        raise BamJaxError(f'--batch_size must be >= 1, got {args.batch_size}')
    from bam_jax.generate.command import generate_command, read_prompts
    from bam_jax.generate.sampling import Sampling
    prompts = args.prompt or read_prompts(args.prompts)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    generate_command(args.workdir, bindings, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                     seed=args.seed, stop=args.stop, batch_size=args.batch_size, as_json=args.json)
    return 0


def _eval(args, bindings) -> int:
    from bam_jax.evaluate.evaluator import eval_command
    tasks = [name.strip() for name in args.tasks.split(',') if name.strip()]
    if not tasks and (args.num_fewshot is not None or args.limit is not None):
        raise BamJaxError('--num_fewshot and --limit apply to --tasks; name the tasks')
    eval_command(args.workdir, bindings, as_json=args.json, tasks=tasks, num_fewshot=args.num_fewshot,
                 limit=args.limit)
    return 0


def _upcycle(args, bindings) -> int:
    if bindings:
        raise BamJaxError('upcycle takes no --gin overrides; routing is set in the mix stage')
    from bam_jax.upcycle import router_init, upcycle_checkpoints

    experts = [d for d in args.experts.split(',') if d]
    domains = None
    if args.router_init == 'domain':
        domains = router_init.run_domains(([args.seed] if args.seed else []) + experts, args.router_data)
    elif args.router_data or args.router_tokens is not None or args.router_inputs != 'seed':
        raise BamJaxError('--router_data, --router_tokens and --router_inputs apply to --router_init=domain')
    summary = upcycle_checkpoints(
        args.method, experts, args.out, seed=args.seed,
        seed_expert=not args.no_seed_expert, overwrite=args.overwrite, num_experts=args.num_experts,
        expert_split=args.expert_split, router_seed=args.router_seed, domains=domains,
        router_tokens=args.router_tokens or router_init.ROUTER_TOKENS, router_inputs=args.router_inputs)
    moe, lory = summary.model.moe, summary.model.lory
    ffn = (f'{lory.num_experts} merged FFN experts per layer' if lory else
           f'{moe.num_experts * moe.expert_split} FFN experts per layer')
    print(f'{args.method}: {len(summary.expert_models)} experts ({", ".join(summary.expert_models)}), '
          f'{ffn}; {summary.tensors} tensors, {summary.bytes_written / 2**20:.1f} MiB '
          f'in {summary.seconds:.1f} s')
    if summary.router_init != 'random':
        print(router_init.format_shares(summary.router_init))
    print(f'wrote {summary.out}; next: bam-jax train --gin_file={summary.out}/model.gin '
          f'--gin_file=gin/mix_{"btx" if args.method == "sparse_upcycle" else args.method}.gin --workdir=DIR')
    return 0


def _experts(args, bindings) -> int:
    if bindings:
        raise BamJaxError('experts takes no --gin overrides')
    from bam_jax.upcycle import router_init
    from bam_jax.upcycle.surgery_io import experts_command

    record = experts_command(args.operation, args.workdir, args.out, expert=getattr(args, 'expert', None),
                             run=getattr(args, 'run', None), overwrite=args.overwrite,
                             router_data=getattr(args, 'router_data', ''),
                             router_tokens=getattr(args, 'router_tokens', None) or router_init.ROUTER_TOKENS)
    print(f'experts {args.operation}: {", ".join(record.experts_before)} -> {", ".join(record.experts_after)}')
    if record.router is not None:
        shares = record.router.own_share
        print(f"its domain ({record.router.domain}) sends its expert "
              f"{sum(shares.values()) / len(shares):.3f} of its routing, mean over {len(shares)} routed layers")
    print(f'wrote {args.out}; evaluate: bam-jax eval --workdir={args.out}; train the routers alone: bam-jax train '
          f'--gin_file={args.out}/model.gin --gin_file=gin/mix_router_only.gin --workdir=DIR')
    return 0


def _prepare_data(args, bindings) -> int:
    from bam_jax.data.prepare import prepare_domain
    from bam_jax.data.prepare_pod import Workers, prepare_together
    from bam_jax.gin_config import parse_gin

    config = parse_gin(args.gin_file, bindings).data
    domains = [d.strip() for d in args.domains.split(',') if d.strip()] or list(config.domains)
    unknown = [d for d in domains if d not in config.domains]
    if unknown:
        raise BamJaxError(f"unknown domains {', '.join(unknown)}; the gin files name {', '.join(config.domains)}")
    workers = Workers.of_job() if args.distributed else Workers()
    say = print if workers.index == 0 else (lambda *_, **__: None)  # one table for the job
    names = []
    for domain in domains:
        if workers.count > 1:
            r = prepare_together(config, domain, workers, skip_bad=args.skip_bad)
        else:
            r = prepare_domain(config, domain, skip_bad=args.skip_bad)
        train, valid = r.splits.train, r.splits.validation
        if not names:  # the header with the first row, below what preparing it logged
            say(f'{"domain":<12} {"read":>9} {"duplicate":>9} {"train docs":>10} {"train tokens":>13} '
                f'{"valid docs":>10} {"valid tokens":>13} {"skipped":>7} {"seconds":>8}')
        say(f'{domain:<12} {r.documents_read:>9} {r.duplicates:>9} {train.documents:>10} '
            f'{train.tokens:>13} {valid.documents:>10} {valid.tokens:>13} {len(r.skipped):>7} '
            f'{r.seconds:>8.1f}', flush=True)
        names.append(r.name)
    say(f'wrote {", ".join(names)} under {config.data_dir}' +
        (f' with {workers.count} workers' if workers.count > 1 else ''))
    return 0


def _train(args, bindings) -> int:
    from bam_jax.gin_config import parse_gin
    from bam_jax.train import train
    configs = parse_gin(args.gin_file, bindings)
    result = train(args.workdir, configs)
    if result['stopped'] == 'sigterm':
        return EXIT_SIGTERM
    return 0


@dataclasses.dataclass(frozen=True)
class Command:
    """One `bam-jax` command. host: it works on the host's CPU and leaves the accelerators to a run
    beside it (JAX_PLATFORMS=cpu). every_worker: in a multi-process job (a pod's workers,
    launch/run.sh --local_processes) every process runs it and joins the job (--distributed);
    otherwise it runs once, as one process (a pod's worker 0). The launchers read this table."""
    run: Callable[[argparse.Namespace, list[str]], int]
    add_parser: Callable[..., argparse.ArgumentParser]
    host: bool
    every_worker: bool


COMMANDS = {
    'train': Command(_train, _train_parser, host=False, every_worker=True),
    'upcycle': Command(_upcycle, _upcycle_parser, host=True, every_worker=False),
    'experts': Command(_experts, _experts_parser, host=True, every_worker=False),
    'eval': Command(_eval, _eval_parser, host=False, every_worker=True),
    'generate': Command(_generate, _generate_parser, host=False, every_worker=True),
    'import-hf': Command(_import_hf, _import_hf_parser, host=True, every_worker=False),
    'export-hf': Command(_export_hf, _export_hf_parser, host=True, every_worker=False),
    'prepare-data': Command(_prepare_data, _prepare_parser, host=True, every_worker=True),
}


def main(argv: list[str] | None = None) -> int:
    _quiet_backends()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, bindings = _split_gin_overrides(argv)
        args = _parser().parse_args(rest)
        command = COMMANDS[args.command]
        if command.host:
            os.environ.setdefault('JAX_PLATFORMS', 'cpu')
        if command.every_worker:
            from bam_jax.parallel import maybe_initialize_distributed
            maybe_initialize_distributed(force=args.distributed)
        return command.run(args, bindings)
    except BamJaxError as e:
        # Everything worth keeping is already saved or was never written. Skip the interpreter's
        # teardown, and silence stderr before printing: Orbax's I/O threads can report their
        # closed event loops as tracebacks at this moment, burying the one line that matters.
        message = f'error: {str(e).strip().splitlines()[0]}\n'
        sys.stdout.flush()
        sys.stderr.flush()
        if sys.stderr is sys.__stderr__:
            stderr = os.dup(2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            os.write(stderr, message.encode())
        else:  # stderr is captured (called in process)
            sys.stderr.write(message)
        os._exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
