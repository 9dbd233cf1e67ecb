"""`bam-jax train` end to end: seed -> branch, and every user error as one line, exit 1."""

import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from bam_jax.models import flatten

from helpers import assert_one_line_error, cli_in_process, restore, run_cli, shared

SMALL = ['--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=8', '--gin.SEQ_LEN=64',
         '--gin.TrainConfig.checkpoint_every=1', '--gin.TrainConfig.eval_every=2',
         '--gin.TrainConfig.warmup_steps=1', '--gin.TrainConfig.log_every=1',
         '--gin.DataConfig.eval_batches=1',
         '--gin.DataConfig.math_documents=500', '--gin.ModelConfig.num_layers=1',
         "--gin.ModelConfig.dtype='float32'"]
SEED = ['--gin_file=gin/models/tiny.gin', '--gin_file=gin/seed.gin', *SMALL]
BRANCH = ['--gin_file=gin/models/tiny.gin', '--gin_file=gin/branch.gin', *SMALL]


def bam_jax(*args, check=True):
    """`bam-jax train ARGS` in a subprocess; check: assert that it succeeded."""
    return run_cli('train', *args, check=check)


def params(step_dir):
    return restore(step_dir / 'params')


def train_here(*args):
    """`bam-jax train ARGS` in this process (no start-up to pay); asserts that it succeeded."""
    from bam_jax import cli
    assert cli.main(['train', *args]) == 0


@pytest.fixture(scope='module')
def seed_run(tmp_path_factory):
    """A seed run through the CLI, made once for all the xdist workers (tests copy it to change it)."""
    return shared(tmp_path_factory, 'cli_seed_run', lambda d: bam_jax(*SEED, f'--workdir={d / "seed"}')) / 'seed'


def test_seed_run_writes_checkpoints_config_and_metrics(seed_run):
    assert sorted(p.name for p in (seed_run / 'checkpoints').iterdir() if p.name.isdigit()) == ['1', '2']
    metrics = json.loads((seed_run / 'metrics.json').read_text())
    assert [r['step'] for r in metrics['train']] == [1, 2]
    evaluated = metrics['eval'][-1]
    for domain in ('general', 'code', 'law', 'math'):
        assert np.isclose(evaluated[f'{domain}/perplexity'], np.exp(evaluated[f'{domain}/loss']))
    config = (seed_run / 'config.gin').read_text()
    for line in ('TRAIN_STEPS = 2', 'TrainConfig.train_steps = %TRAIN_STEPS', "DataConfig.source = 'seed'"):
        assert line in config.splitlines()
    assert list((seed_run / 'tb').iterdir()), 'no TensorBoard events'


def test_branch_starts_from_seed_params_with_fresh_optimizer(seed_run, tmp_path):
    workdir = tmp_path / 'code'
    train_here(*BRANCH, "--gin.DOMAIN='code'", f"--gin.INIT_CHECKPOINT='{seed_run}'", f'--workdir={workdir}')
    # The warmup's first learning rate is 0, so after one step the branch still holds the seed's
    # final weights exactly; a restored optimizer state would have moved them.
    seed_final = flatten(params(seed_run / 'checkpoints' / '2'))
    branch_first = flatten(params(workdir / 'checkpoints' / '1'))
    assert seed_final.keys() == branch_first.keys()
    for path, value in seed_final.items():
        np.testing.assert_array_equal(value, branch_first[path], err_msg=path)
    config = (workdir / 'config.gin').read_text()
    for line in ("DOMAIN = 'code'", 'DataConfig.source = %DOMAIN', 'TrainConfig.lr_multiplier = 0.5'):
        assert line in config.splitlines()
    branch_lr = json.loads((workdir / 'metrics.json').read_text())['train'][1]['learning_rate']
    seed_lr = json.loads((seed_run / 'metrics.json').read_text())['train'][1]['learning_rate']
    assert branch_lr == pytest.approx(seed_lr / 2)


# Configuration errors go through the same main() in this process (no start-up to pay); the
# checkpoint errors below run in a subprocess of their own, where Orbax's I/O threads are alive
# when the one line is printed.

def train_in_process(monkeypatch, capsys, *args):
    status, _, err = cli_in_process(monkeypatch, capsys, 'train', *args)
    return status, err


def test_unknown_gin_binding(tmp_path, monkeypatch, capsys):
    failed = train_in_process(monkeypatch, capsys, *SEED, '--gin.TrainConfig.no_such_field=3',
                              f'--workdir={tmp_path / "w"}')
    assert_one_line_error(failed, 'no_such_field')
    assert not (tmp_path / 'w').exists()


def test_missing_gin_file(tmp_path, monkeypatch, capsys):
    failed = train_in_process(monkeypatch, capsys, '--gin_file=gin/models/no_such.gin', f'--workdir={tmp_path / "w"}')
    assert_one_line_error(failed, 'gin/models/no_such.gin not found')


def test_branch_without_init_checkpoint(tmp_path, monkeypatch, capsys):
    failed = train_in_process(monkeypatch, capsys, *BRANCH, "--gin.DOMAIN='code'", f'--workdir={tmp_path / "w"}')
    assert_one_line_error(failed, 'INIT_CHECKPOINT')
    assert not (tmp_path / 'w').exists()


def test_missing_init_checkpoint(tmp_path, monkeypatch, capsys):
    failed = train_in_process(monkeypatch, capsys, *BRANCH, "--gin.DOMAIN='code'",
                              f"--gin.INIT_CHECKPOINT='{tmp_path / 'nope'}'", f'--workdir={tmp_path / "w"}')
    assert_one_line_error(failed, 'does not exist')
    assert not (tmp_path / 'w').exists()


def test_init_checkpoint_that_is_not_a_checkpoint(tmp_path, monkeypatch, capsys):
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / 'notes.txt').write_text('hello')
    failed = train_in_process(monkeypatch, capsys, *BRANCH, "--gin.DOMAIN='code'",
                              f"--gin.INIT_CHECKPOINT='{tmp_path / 'junk'}'", f'--workdir={tmp_path / "w"}')
    assert_one_line_error(failed, 'is not a bam_jax checkpoint')


def test_damaged_init_checkpoint(seed_run, tmp_path):
    damaged = tmp_path / 'damaged'
    subprocess.run(['cp', '-r', str(seed_run / 'checkpoints' / '2'), str(damaged)], check=True)
    for f in (damaged / 'params').rglob('*'):
        if f.is_file() and f.name not in ('_METADATA', 'commit_success.txt'):
            f.write_bytes(b'\0' * 16)
    proc = bam_jax(*BRANCH, "--gin.DOMAIN='code'", f"--gin.INIT_CHECKPOINT='{damaged}'",
                   f'--workdir={tmp_path / "w"}', check=False)
    # A failed read can leave TensorStore callbacks that print, from a native thread, a traceback
    # of Orbax's closed event loop (asyncio's call_soon_threadsafe), sometimes before the CLI
    # silences stderr; its last line can even be cut by the error line, which then follows its
    # indentation, or the exit can cut it right after its first line. That known noise aside, the
    # error is one line and nothing else fails.
    lines = [line.lstrip() if line.lstrip().startswith('error: ') else line for line in proc.stderr.splitlines()]
    noise = [i for i, line in enumerate(lines) if line.startswith('Traceback') and i + 1 < len(lines)
             and ('asyncio/base_events.py' in lines[i + 1] or lines[i + 1].startswith('error: '))]
    kept = '\n'.join(line for i, line in enumerate(lines) if i not in noise)
    assert_one_line_error((proc.returncode, kept), 'cannot read the parameters')


def test_workdir_of_a_different_model(seed_run):
    before = sorted(p.name for p in (seed_run / 'checkpoints').iterdir())
    proc = bam_jax(*SEED, '--gin.ModelConfig.d_model=64', f'--workdir={seed_run}', check=False)
    assert_one_line_error(proc, 'holds a run of a different model: d_model is 128 there, 64 here')
    assert sorted(p.name for p in (seed_run / 'checkpoints').iterdir()) == before


def test_sigterm_saves_and_exits(tmp_path, monkeypatch, capsys):
    # In this process: a thread sends SIGTERM once the first step is logged; the trainer's handler
    # (installed only in the main thread, where the test must run) turns it into a stop.
    assert threading.current_thread() is threading.main_thread()
    workdir = tmp_path / 'w'
    args = [a for a in SEED if not a.startswith('--gin.TRAIN_STEPS')]

    def send_sigterm():
        deadline = time.time() + 240
        while not (workdir / 'metrics.json').exists() and time.time() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=send_sigterm, daemon=True).start()
    status, _, stderr = cli_in_process(monkeypatch, capsys, 'train', *args, '--gin.TRAIN_STEPS=100000',
                                       '--gin.TrainConfig.checkpoint_every=100000', '--gin.TrainConfig.log_every=1',
                                       f'--workdir={workdir}')
    assert status == 143, stderr[-2000:]
    steps = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 100000
    state = json.loads(next((workdir / 'checkpoints' / str(steps[0]) / 'train_state').glob('metadata')).read_text())
    assert state['step'] == steps[0] == state['data_position']


@pytest.mark.parametrize('arch, extra', [
    ('btx', []),
    ('bam', ['--gin.ModelConfig.parallel_block=False']),
    ('bam_shared_kv', ['--gin.MeshConfig.data=4', '--gin.MeshConfig.expert=2']),
])
def test_expert_architectures_train_from_scratch(tmp_path, arch, extra, monkeypatch, capsys):
    # In this process (8 devices): the same main() as a subprocess, without its start-up. One step
    # on one domain, stopped before the validation pass (the eval tests cover it).
    status, _, err = cli_in_process(monkeypatch, capsys, 'train', '--gin_file=gin/models/tiny.gin',
                                    f'--gin_file=gin/arch/{arch}.gin', '--gin_file=gin/seed.gin', *SMALL, *extra,
                                    "--gin.DataConfig.source='law'", '--gin.TrainConfig.stop_at_step=1',
                                    f'--workdir={tmp_path}')
    assert status == 0, err[-3000:]
    step_dir = tmp_path / 'checkpoints' / '1'
    shapes = {k: v.shape for k, v in flatten(params(step_dir)).items()}
    # tiny: D 128, H 4, K 2, Dh 32, F 512; 4 experts of each kind
    assert shapes['layers/0/ffn/experts/wi_gate'] == (4, 128, 512)
    assert shapes['layers/0/ffn/router/kernel'] == (128, 4)
    assert 'layers/0/ffn/wi_gate' not in shapes
    if arch == 'btx':
        assert shapes['layers/0/attn/wq'] == (128, 4, 32)
    else:
        assert shapes['layers/0/attn/experts/wq'] == (4, 128, 4, 32)
        kv = 'attn/wk' if arch == 'bam_shared_kv' else 'attn/experts/wk'
        assert shapes[f'layers/0/{kv}'] == ((128, 2, 32) if arch == 'bam_shared_kv' else (4, 128, 2, 32))
    model = json.loads((step_dir / 'model' / 'metadata').read_text())
    assert model['moe']['num_experts'] == 4 and (model['moa'] is None) == (arch == 'btx')
    record = json.loads((tmp_path / 'metrics.json').read_text())['train'][-1]
    assert record['aux_loss'] > 0 and 0 <= record['router/layers/0/ffn/dropped_fraction'] < 1
    loads = [record[f'router/layers/0/ffn/load/{e}'] for e in range(4)]
    assert np.isclose(sum(loads), 1.0)
