"""Helpers shared by the test files: the CLI in a subprocess or in this process, its one-line user
errors, checkpoints, layers with numpy-drawn weights and random inputs. `from helpers import ...`
(tests/ has no __init__.py, so pytest puts tests/ itself on sys.path)."""

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bam_jax.models import split_params

REPO = pathlib.Path(__file__).resolve().parent.parent
CLI_DEVICES = 2  # CPU devices of a CLI subprocess (this process has 8)

# ---------------------------------------------------------------------------------------
# The CLI


def cli_args(command, *args):
    return [sys.executable, '-m', 'bam_jax.cli', command, *args]


def cli_env(devices=CLI_DEVICES):
    from conftest import FAST_COMPILE
    return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}')


def run_cli(command, *args, timeout=300, check=False) -> subprocess.CompletedProcess:
    """`bam-jax COMMAND ARGS`, run to its end in a subprocess on CLI_DEVICES CPU devices.

    check: assert that it succeeded (exit status 0).
    """
    proc = subprocess.run(cli_args(command, *args), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start_cli(command, *args, devices=CLI_DEVICES) -> subprocess.Popen:
    """`bam-jax COMMAND ARGS`, started in a subprocess (stdout and stderr piped, as text)."""
    return subprocess.Popen(cli_args(command, *args), cwd=REPO, env=cli_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli_in_process(monkeypatch, capsys, *args):
    """(exit status, stdout, stderr) of `bam-jax ARGS` run here; the CLI's os._exit becomes SystemExit."""
    from bam_jax import cli  # here, not at the top: the layer tests need none of the commands

    def leave(status):
        raise SystemExit(status)
    monkeypatch.setattr(os, '_exit', leave)
    try:
        status = cli.main(list(args))
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


EVAL_DEVICES = 2  # CPU devices of an eval subprocess


def start_eval(*args) -> subprocess.Popen:
    """`bam-jax eval ARGS`, started in a subprocess on EVAL_DEVICES devices."""
    return start_cli('eval', *args, devices=EVAL_DEVICES)


def finish(proc: subprocess.Popen) -> dict:
    """{'status', 'stdout', 'stderr'} of a started CLI process, once it ends."""
    stdout, stderr = proc.communicate(timeout=300)
    return {'status': proc.returncode, 'stdout': stdout, 'stderr': stderr}


def assert_one_line_error(result, *patterns):
    """A user error: exit status 1 and exactly one `error:` line on stderr, holding every pattern,
    and no traceback. result: a finished process (subprocess.CompletedProcess, or anything with
    returncode and stderr), or the pair (exit status, stderr) of an in-process run."""
    status, stderr = (result.returncode, result.stderr) if hasattr(result, 'returncode') else result
    assert status == 1, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, stderr[-2000:]
    assert 'Traceback' not in stderr
    for pattern in patterns:
        assert pattern in errors[0], errors[0]


# ---------------------------------------------------------------------------------------
# Runs

# tests/test_cli.py's SMALL, as gin bindings. TRAIN_STEPS=2 with stop_at_step=1: one step, and no
# validation pass during training (it runs at train_steps). Training reads one domain (quicker to
# set up than the seed mixture); evaluation covers all four.
SMALL_RUN = ["DataConfig.source = 'law'", 'TRAIN_STEPS = 2', 'TrainConfig.stop_at_step = 1', 'BATCH_SIZE = 8',
             'SEQ_LEN = 64', 'TrainConfig.checkpoint_every = 1', 'TrainConfig.warmup_steps = 1',
             'TrainConfig.log_every = 1', 'DataConfig.eval_batches = 1', 'DataConfig.math_documents = 500',
             'ModelConfig.num_layers = 1', "ModelConfig.dtype = 'float32'"]


def train_run(files, workdir, *bindings):
    """Trains one step as `bam-jax train --gin_file=... --gin.X=Y ... --workdir=W` does (with
    SMALL_RUN's bindings first), in this process."""
    from bam_jax.gin_config import parse_gin
    from bam_jax.train import train

    assert train(workdir, parse_gin(files, [*SMALL_RUN, *bindings]))['step'] == 1


def shared(tmp_path_factory, name, make):
    """DIR, made by make(DIR) once for all the xdist workers of this session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # the session's directory, above each worker's own
    directory = root / name
    with open(root / f'{name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / 'done').exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            (directory / 'done').touch()
    return directory


# ---------------------------------------------------------------------------------------
# Checkpoints


def restore(path):
    """Whatever Orbax's StandardCheckpointer saved at path (a step's params, opt_state, ...)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path)


def assert_same_state(step_dir_a, step_dir_b):
    """Two checkpoint steps hold bit-identical parameters and optimizer states."""
    for item in ('params', 'opt_state'):
        a, b = restore(step_dir_a / item), restore(step_dir_b / item)
        assert jax.tree.structure(a) == jax.tree.structure(b), item
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y, err_msg=item)


# ---------------------------------------------------------------------------------------
# Layers and inputs


def numpy_layer(build, draw):
    """(graphdef, params) of one layer with numpy-drawn weights, never initialised by JAX.

    build(rngs) -> the layer, built abstractly (nnx.eval_shape); draw(shapes) -> its weights, a
    tree of arrays given the layer's own tree of ShapeDtypeStructs. The two trees must have the
    same paths and shapes.
    """
    graphdef, shapes = split_params(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    params = draw(shapes)
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, shapes)
    return graphdef, params


def routed_ffn_params(d_model, d_ff, num_experts, *, seed, router_scale):
    """A routed FFN's weights (router/kernel [D, E]; experts/wi_gate, wi_up [E, D, F], wo [E, F, D])
    in float32: the router N(0, router_scale), each expert matrix N(0, 1/fan_in), so that the
    experts' outputs are O(1)."""
    rng = np.random.default_rng(seed)
    e, d, f = num_experts, d_model, d_ff
    params = {
        'router': {'kernel': rng.normal(0, router_scale, (d, e))},
        'experts': {'wi_gate': rng.normal(0, d ** -0.5, (e, d, f)),
                    'wi_up': rng.normal(0, d ** -0.5, (e, d, f)),
                    'wo': rng.normal(0, f ** -0.5, (e, f, d))},
    }
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def random_x(shape, seed=1):
    """Standard normal float32 inputs."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def packed_rows(vocab_size, batch, length, seed=0):
    """(inputs, targets, segment_ids, positions) of `batch` packed rows: two documents each,
    positions restarting at the second."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch, length + 1)).astype(np.int32)
    cut = rng.integers(3, length - 3, batch)
    idx = np.arange(length)[None]
    segment_ids = np.where(idx < cut[:, None], 1, 2).astype(np.int32)
    positions = np.where(idx < cut[:, None], idx, idx - cut[:, None]).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:], segment_ids, positions
