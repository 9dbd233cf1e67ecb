"""launch/run.sh and launch/pipeline.sh: the commands they would run (--dry-run), locally and on a pod."""

import os
import pathlib
import shlex
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent


def dry_run(*args, **env):
    proc = subprocess.run(['bash', 'launch/run.sh', '--dry-run', *args], cwd=REPO, capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith('TPU_')}, **env},
                          timeout=60, check=True)
    return proc.stdout.splitlines()


def commands(lines):
    return [shlex.split(line) for line in lines if not line.startswith('== ')]


def test_pod_runs_every_worker_with_distributed():
    lines = dry_run('train', '--gin_file=gin/seed.gin', '--workdir=runs/seed',
                    TPU_NAME='pod-a', TPU_ZONE='us-central2-b', TPU_PROJECT='proj', REMOTE_DIR='/srv/bam_jax')
    (cmd,) = commands(lines)
    assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod-a']
    assert {'--zone=us-central2-b', '--worker=all', '--project=proj'} <= set(cmd)
    remote = next(a for a in cmd if a.startswith('--command='))[len('--command='):]
    assert remote.startswith('cd /srv/bam_jax && .venv/bin/bam-jax train ')
    assert remote.endswith(' --distributed') and '--workdir=runs/seed' in remote


def test_pipeline_dry_run_lists_every_stage_in_order():
    lines = dry_run('pipeline', OUT='out', DOMAINS='code math', SEED_STEPS='7', MIX_STEPS='5')
    stages = [line[3:] for line in lines if line.startswith('== ')]
    assert stages == ['seed', 'branch_code', 'branch_math', 'upcycle_btx', 'upcycle_bam', 'upcycle_bam_shared_kv',
                      'mix_btx', 'mix_bam', 'mix_bam_compute', 'mix_bam_shared_kv', 'mix_bam_shared_kv_compute',
                      'eval_seed', 'eval_code', 'eval_math', 'eval_btx', 'eval_bam', 'eval_bam_shared_kv',
                      'eval_bam_compute', 'eval_bam_shared_kv_compute', 'compare']
    cmds = commands(lines)
    assert '--gin.TRAIN_STEPS=7' in cmds[0] and '--workdir=out/seed' in cmds[0]
    assert "--gin.INIT_CHECKPOINT='out/seed'" in cmds[1]
    assert '--experts=out/code,out/math' in cmds[3] and '--seed=out/seed' in cmds[3]
    mix_bam_compute = cmds[8]
    assert '--gin_file=out/bam_init/model.gin' in mix_bam_compute and '--gin_file=gin/mix_bam.gin' in mix_bam_compute
    assert "--gin.TrainConfig.match_run='out/btx'" in mix_bam_compute
    assert "--gin.TrainConfig.match='flops'" in mix_bam_compute
    assert not (REPO / 'out').exists()  # a dry run writes nothing


def test_pipeline_on_pods_spreads_branches_over_slices():
    lines = dry_run('pipeline', 'branch', OUT='out', DOMAINS='code law math', BRANCH_TPUS='s1 s2',
                    TPU_ZONE='z')
    slices = [cmd[5] for cmd in commands(lines)]
    assert slices == ['s1', 's2', 's1']  # round robin
    assert all('--worker=all' in cmd for cmd in commands(lines))
