"""Two JAX processes on this machine (launch/run.sh --local_processes=2: 2 × 4 emulated devices,
joined by jax.distributed over loopback) against this process's 8 devices: a seed run, a BTX mix
with its 8 experts spread over both processes, checkpoints restored across process counts,
SIGTERM and a lost process.

Two processes compute what one does up to the order of the cross-device sums: the gradients'
all-reduce runs through the CPU collectives (gloo) between processes and through XLA's own
reduction within one, so float32 sums differ in the last bits, which Adam carries on. The
parameters after 4 steps agree to TOLERANCE, two orders below how far they moved.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest

from bam_jax.workdir import latest_step_dir, read_param_shapes
from bam_jax.workdir.tensors import CheckpointReader

from helpers import REPO, cli_env, shared

TOLERANCE = 1e-5
HEARTBEAT = 5  # seconds: how soon the job notices a lost process
SEED_FILES = ['gin/models/tiny.gin', 'gin/seed.gin']
RUN = ["DataConfig.source = 'code'", 'TRAIN_STEPS = 1000', 'BATCH_SIZE = 8', 'SEQ_LEN = 32',
       'TrainConfig.warmup_steps = 1', 'TrainConfig.checkpoint_every = 1', 'TrainConfig.keep_checkpoints = 100',
       'TrainConfig.eval_every = 100000', 'DataConfig.eval_batches = 1', 'ModelConfig.num_layers = 1',
       "ModelConfig.dtype = 'float32'"]
MIX = ['MeshConfig.expert = 8']  # 8 experts (2 models × expert_split 4), one per device of both processes


def _flags(files, bindings):
    return [f'--gin_file={f}' for f in files] + [f'--gin.{b.replace(" = ", "=")}' for b in bindings]


def start_job(files, bindings, workdir, log):
    """`launch/run.sh --local_processes=2 train ...`, started; its output goes to `log`."""
    env = dict(cli_env(), BAM_JAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT))
    with open(log, 'w') as out:
        return subprocess.Popen(['bash', 'launch/run.sh', '--local_processes=2', 'train', *_flags(files, bindings),
                                 f'--workdir={workdir}'], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def train_here(files, bindings, workdir):
    from bam_jax.gin_config import parse_gin
    from bam_jax.train import train
    gin.clear_config()
    return train(workdir, parse_gin(files, bindings))


def params(step_dir):
    reader = CheckpointReader(step_dir)
    return {k: reader.read(k) for k in read_param_shapes(step_dir)}


def assert_close(step_a, step_b, moved_from=None):
    a, b = params(step_a), params(step_b)
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= TOLERANCE, (step_a, step_b, worst)
    if moved_from is not None:
        start = params(moved_from)
        assert max(float(np.max(np.abs(a[k] - start[k]))) for k in a) > 100 * TOLERANCE


def keep_steps(workdir, upto):
    """The run as it was at step `upto`: later checkpoints removed."""
    for step_dir in (workdir / 'checkpoints').iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > upto:
            subprocess.run(['rm', '-rf', str(step_dir)], check=True)


def wait_for(predicate, proc, timeout=300):
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f'the job ended early with status {proc.returncode}'
        assert time.monotonic() < end, 'timed out'
        time.sleep(0.5)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A seed run on two processes, stopped by SIGTERM after step 4, and one on this process to
    step 4; a BTX model upcycled from them; its mix trained 4 steps on this process. Made once
    for all the xdist workers."""
    root = shared(tmp_path_factory, 'multiprocess', _make_runs)
    sigterm = json.loads((root / 'sigterm.json').read_text())
    return root, [str(root / 'btx_init' / 'model.gin'), 'gin/mix_btx.gin'], sigterm


def _make_runs(root):
    job = start_job(SEED_FILES, RUN, root / 'seed2', root / 'seed2.log')
    train_here(SEED_FILES, [*RUN, 'TrainConfig.stop_at_step = 4'], root / 'seed1')
    wait_for(lambda: (root / 'seed2/checkpoints/4').is_dir(), job)
    job.send_signal(signal.SIGTERM)
    (root / 'sigterm.json').write_text(json.dumps({'status': job.wait(timeout=120),
                                                   'log': (root / 'seed2.log').read_text()}))
    from bam_jax.upcycle import upcycle_checkpoints
    upcycle_checkpoints('btx', [str(root / 'seed2/checkpoints/4')], str(root / 'btx_init'),
                        seed=str(root / 'seed1'), expert_split=4)
    mix_files = [str(root / 'btx_init' / 'model.gin'), 'gin/mix_btx.gin']
    train_here(mix_files, [*RUN, *MIX, 'TrainConfig.stop_at_step = 4'], root / 'mix1')


def test_two_processes_train_the_seed_as_one(runs):
    root, _, _ = runs
    assert_close(root / 'seed2/checkpoints/4', root / 'seed1/checkpoints/4', moved_from=root / 'seed1/checkpoints/1')


def test_sigterm_saves_once_and_stops_every_process(runs):
    """Both processes stop at the same step (JAX's preemption sync point), after one save."""
    root, _, sigterm = runs
    assert sigterm['status'] == 143, sigterm['log'][-3000:]
    saved = int(sigterm['log'].split('SIGTERM: saved step ')[1].split(',')[0])
    assert saved >= 4 and latest_step_dir(root / 'seed2/checkpoints').name == str(saved)
    assert 'waiting up to' not in sigterm['log']  # no process failed


def test_a_two_process_checkpoint_resumes_on_one_process(runs, tmp_path):
    root, _, _ = runs
    subprocess.run(['cp', '-r', str(root / 'seed2'), str(tmp_path / 'run')], check=True)
    keep_steps(tmp_path / 'run', 2)
    result = train_here(SEED_FILES, [*RUN, 'TrainConfig.stop_at_step = 4'], tmp_path / 'run')
    assert result['step'] == 4
    assert_close(tmp_path / 'run/checkpoints/4', root / 'seed2/checkpoints/4')


def test_btx_experts_over_two_processes_and_a_lost_process(runs, tmp_path):
    """The one-process mix, resumed at step 2 by two processes holding 4 experts each, trains
    steps 3 and 4 as one process did; a SIGKILLed process then ends the other within the
    heartbeat, and the run goes on from its last checkpoint."""
    root, mix_files, _ = runs
    run = tmp_path / 'mix'
    subprocess.run(['cp', '-r', str(root / 'mix1'), str(run)], check=True)
    keep_steps(run, 2)
    job = start_job(mix_files, [*RUN, *MIX], run, tmp_path / 'job.log')
    wait_for(lambda: (run / 'checkpoints/5').is_dir(), job)
    assert 'resuming' in (tmp_path / 'job.log').read_text()
    victim = _process(job.pid, 1)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    status = job.wait(timeout=HEARTBEAT + 90)
    log = (tmp_path / 'job.log').read_text()
    assert status != 0 and 'process 1 was killed by SIGKILL' in log
    assert 'killing them' not in log  # process 0 stopped by itself, with JAX's error
    assert 'another task died' in log or 'stopped sending heartbeats' in log, log[-3000:]
    assert time.monotonic() - killed_at < HEARTBEAT + 60
    assert_close(run / 'checkpoints/4', root / 'mix1/checkpoints/4', moved_from=root / 'mix1/checkpoints/2')
    last = int(latest_step_dir(run / 'checkpoints').name)  # the rerun continues from there
    assert train_here(mix_files, [*RUN, *MIX, f'TrainConfig.stop_at_step = {last + 1}'], run)['step'] == last + 1


def _process(launcher_pid, process_id):
    """The pid of JAX process `process_id` among the launcher's children."""
    children = subprocess.run(['pgrep', '-P', str(launcher_pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        env = pathlib.Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
        if f'JAX_PROCESS_ID={process_id}'.encode() in env:
            return int(pid)
    raise AssertionError(f'no process {process_id} among {children} ({sys.platform})')
