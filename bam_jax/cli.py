"""`bam-jax`: the command line.

  bam-jax train --gin_file=F [--gin_file=F2 ...] [--gin.NAME=VALUE ...] --workdir=DIR

Errors a user can fix print one line, `error: ...`, and exit with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from bam_jax.errors import BamJaxError

EXIT_USER_ERROR = 1
EXIT_SIGTERM = 143


def _quiet_backends() -> None:
    # TensorFlow (seqio's data path) logs a wall of C++ messages at import; keep stderr readable.
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
    train = commands.add_parser('train', help='train or resume a run (seed, branch, mix)')
    train.add_argument('--gin_file', action='append', required=True,
                       help='gin file; repeatable, later files override earlier ones')
    train.add_argument('--workdir', required=True, help='run directory: checkpoints, metrics, config')
    train.add_argument('--distributed', action='store_true',
                       help='call jax.distributed.initialize() (automatic on a multi-host TPU pod)')
    return parser


def _train(args, bindings) -> int:
    from bam_jax.parallel import maybe_initialize_distributed
    maybe_initialize_distributed(force=args.distributed)
    from bam_jax.gin_config import parse_gin
    from bam_jax.train import train
    parse_gin(args.gin_file, bindings)
    result = train(args.workdir)
    if result['stopped'] == 'sigterm':
        return EXIT_SIGTERM
    return 0


def main(argv: list[str] | None = None) -> int:
    _quiet_backends()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, bindings = _split_gin_overrides(argv)
        args = _parser().parse_args(rest)
        return {'train': _train}[args.command](args, bindings)
    except BamJaxError as e:
        print(f'error: {str(e).strip().splitlines()[0]}', file=sys.stderr)
        # Everything worth keeping is already saved or was never written. Skip the interpreter's
        # teardown, where Orbax's I/O threads can report their closed event loops as tracebacks.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
