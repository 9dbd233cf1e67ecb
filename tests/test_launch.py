"""launch/run.sh and launch/pipeline.sh: the commands they would run (--dry-run), locally and on a pod."""

import os
import pathlib
import shlex
import subprocess

from bam_jax.cli import COMMANDS

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
    (cmd,) = commands(dry_run('prepare-data', '--gin_file=gin/seed.gin', TPU_NAME='pod-a', TPU_ZONE='z'))
    assert '--worker=all' in cmd  # every worker prepares its share of the input files
    remote = next(a for a in cmd if a.startswith('--command='))
    assert remote.endswith('prepare-data --gin_file=gin/seed.gin --distributed')


def test_pod_runs_host_commands_once_on_worker_0():
    lines = dry_run('upcycle', '--method=btx', '--seed=a', '--out=c', TPU_NAME='pod-a', TPU_ZONE='z')
    (cmd,) = commands(lines)
    assert '--worker=0' in cmd
    remote = next(a for a in cmd if a.startswith('--command='))
    assert remote.endswith('bam-jax upcycle --method=btx --seed=a --out=c')  # no --distributed


def test_pod_places_every_command_as_the_cli_table_says():
    for name, command in COMMANDS.items():
        (cmd,) = commands(dry_run(name, '--x=1', TPU_NAME='pod-a', TPU_ZONE='z'))
        remote = next(a for a in cmd if a.startswith('--command='))
        assert ('--worker=all' in cmd) == command.every_worker, name
        assert remote.endswith(' --distributed') == command.every_worker, name
    proc = subprocess.run(['bash', 'launch/run.sh', '--dry-run', 'trian'], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, 'TPU_NAME': 'pod-a', 'TPU_ZONE': 'z'}, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "launch/run.sh: unknown command 'trian'"


def test_local_processes_start_the_local_job():
    (cmd,) = commands(dry_run('--local_processes=2', '--local_devices=4', 'train', '--workdir=runs/seed'))
    assert cmd[1:] == ['-m', 'bam_jax.local_job', '--processes=2', '--devices_per_process=4', '--',
                       'train', '--workdir=runs/seed']
    lines = dry_run('pipeline', 'seed', 'upcycle', 'mix', 'eval', OUT='out', MIXES='btx_top1', LOCAL_PROCESSES='2')
    cmds = dict(zip([line[3:] for line in lines if line.startswith('== ')], commands(lines)))
    for stage in ('seed', 'mix_btx_top1', 'eval seed code law math btx_top1'):
        assert cmds[stage][1:5] == ['-m', 'bam_jax.local_job', '--processes=2', '--'], stage
    assert cmds['upcycle_btx'][0].endswith('.venv/bin/bam-jax')  # host work: one process


def test_pipeline_dry_run_lists_every_stage_in_order():
    lines = dry_run('pipeline', OUT='out', DOMAINS='code math', SEED_STEPS='7', MIX_STEPS='5', RERUNS='bam')
    stages = [line[3:] for line in lines if line.startswith('== ')]
    mixes = ['btx_top1', 'btx_top2', 'bam', 'bam_compute', 'bam_shared_kv', 'bam_shared_kv_compute', 'lory',
             'bam_seed1']
    assert stages == ['seed', 'branch_code', 'branch_math', 'upcycle_btx', 'upcycle_bam', 'upcycle_bam_shared_kv',
                      'upcycle_lory', 'upcycle_bam_seed1', *[f'mix_{m}' for m in mixes],
                      'eval ' + ' '.join(['seed', 'code', 'math', *mixes]), 'compare']
    cmds = dict(zip(stages, commands(lines)))
    assert '--gin.TRAIN_STEPS=7' in cmds['seed'] and '--workdir=out/seed' in cmds['seed']
    assert "--gin.INIT_CHECKPOINT='out/seed'" in cmds['branch_code']
    assert '--experts=out/code,out/math' in cmds['upcycle_btx'] and '--seed=out/seed' in cmds['upcycle_btx']
    assert '--method=lory' in cmds['upcycle_lory'] and '--out=out/lory_init' in cmds['upcycle_lory']
    assert '--router_seed=1' in cmds['upcycle_bam_seed1'] and '--out=out/bam_seed1_init' in cmds['upcycle_bam_seed1']
    assert '--gin_file=gin/mix_btx_top1.gin' in cmds['mix_btx_top1']
    assert not any('match' in arg for arg in cmds['mix_btx_top1'])  # the baseline the others match
    mix_bam_compute = cmds['mix_bam_compute']
    assert '--gin_file=out/bam_init/model.gin' in mix_bam_compute and '--gin_file=gin/mix_bam.gin' in mix_bam_compute
    assert "--gin.TrainConfig.match_run='out/btx_top1'" in mix_bam_compute
    assert "--gin.TrainConfig.match='flops'" in mix_bam_compute
    mix_lory = cmds['mix_lory']
    assert '--gin_file=out/lory_init/model.gin' in mix_lory and '--gin_file=gin/mix_lory.gin' in mix_lory
    assert "--gin.TrainConfig.match='tokens'" in mix_lory and '--workdir=out/lory' in mix_lory
    rerun = cmds['mix_bam_seed1']
    assert '--gin_file=out/bam_seed1_init/model.gin' in rerun and '--gin.TrainConfig.seed=1' in rerun
    assert "--gin.TrainConfig.match='tokens'" in rerun and '--workdir=out/bam_seed1' in rerun
    assert cmds['eval ' + stages[-2][5:]] == [str(REPO / '.venv/bin/bam-jax'), 'eval', *[  # one process: shared
        f'--workdir=out/{r}' for r in ['seed', 'code', 'math', *mixes]], '--gin.TrainConfig.seq_len=256',  # batches
        '--tasks=bam_domains']
    compare = cmds['compare']
    assert '--rerun' in compare and 'bam=out/bam_seed1' in compare
    orders = [compare[i + 1] for i, arg in enumerate(compare) if arg == '--order']
    assert orders == ['bam,bam_shared_kv,btx_top1,seed', 'bam_compute,bam_shared_kv_compute,btx_top1,seed']
    assert not (REPO / 'out').exists()  # a dry run writes nothing


def test_pipeline_runs_only_the_chosen_mixes():
    lines = dry_run('pipeline', 'upcycle', 'mix', 'compare', OUT='out', MIXES='btx_top1 bam_shared_kv_compute')
    stages = [line[3:] for line in lines if line.startswith('== ')]
    assert stages == ['upcycle_btx', 'upcycle_bam_shared_kv', 'mix_btx_top1', 'mix_bam_shared_kv_compute', 'compare']
    assert '--order' not in commands(lines)[-1]  # no ordering has all its runs

    lines = dry_run('pipeline', 'upcycle', 'mix', OUT='out', MIXES='btx_top1 lory', RERUNS='lory')
    stages = [line[3:] for line in lines if line.startswith('== ')]
    assert stages == ['upcycle_btx', 'upcycle_lory', 'upcycle_lory_seed1', 'mix_btx_top1', 'mix_lory',
                      'mix_lory_seed1']
    cmds = dict(zip(stages, commands(lines)))
    assert '--method=lory' in cmds['upcycle_lory_seed1'] and '--gin_file=gin/mix_lory.gin' in cmds['mix_lory_seed1']


def test_pipeline_from_hugging_face_models_imports_instead_of_training_the_seed_and_branches():
    lines = dry_run('pipeline', OUT='out', HF_SEED='/m/base', HF_EXPERTS='/m/base-coder,/m/base-math',
                    MIXES='btx_top1 bam')
    stages = [line[3:] for line in lines if line.startswith('== ')]
    assert stages == ['import_seed', 'import_base-coder', 'import_base-math', 'upcycle_btx', 'upcycle_bam',
                      'mix_btx_top1', 'mix_bam', 'eval seed base-coder base-math btx_top1 bam', 'compare',
                      'export_btx_top1', 'export_bam']
    cmds = dict(zip(stages, commands(lines)))
    assert cmds['import_base-coder'][1:] == ['import-hf', '--hf_dir=/m/base-coder', '--out=out/base-coder',
                                             '--overwrite']
    assert '--experts=out/base-coder,out/base-math' in cmds['upcycle_bam']
    assert cmds['export_bam'][1:] == ['export-hf', '--workdir=out/bam', '--out=out/hf/bam', '--dtype=bfloat16',
                                      '--overwrite']
    named = dry_run('pipeline', 'import', OUT='out', HF_SEED='/m/base', HF_EXPERTS='/m/a,/m/b', DOMAINS='code math')
    assert [line[3:] for line in named if line.startswith('== ')] == ['import_seed', 'import_code', 'import_math']


def test_pipeline_refuses_unknown_mixes():
    for env in ({'MIXES': 'btx_top1 moe'}, {'MIXES': 'bam'}, {'MIXES': 'btx_top1', 'RERUNS': 'lory'},
                {'HF_EXPERTS': '/m/a'}, {'HF_SEED': '/m/s'},
                {'HF_SEED': '/m/s', 'HF_EXPERTS': '/m/a', 'DOMAINS': 'a b'}):
        proc = subprocess.run(['bash', 'launch/pipeline.sh', '--dry-run'], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, 'OUT': 'out', **env}, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith('error: ') and proc.stdout == '', env


def test_pipeline_on_pods_spreads_branches_over_slices():
    lines = dry_run('pipeline', 'branch', OUT='out', DOMAINS='code law math', BRANCH_TPUS='s1 s2',
                    TPU_ZONE='z')
    slices = [cmd[5] for cmd in commands(lines)]
    assert slices == ['s1', 's2', 's1']  # round robin
    assert all('--worker=all' in cmd for cmd in commands(lines))


def test_pipeline_on_a_pod_writes_its_runs_to_a_bucket():
    lines = dry_run('pipeline', OUT='gs://bucket/bam', TPU_NAME='pod-a', TPU_ZONE='z', DOMAINS='code math',
                    MIXES='btx_top1 bam', TASKS='')
    stages = [line[3:] for line in lines if line.startswith('== ')]
    assert stages == ['seed', 'branch_code', 'branch_math', 'upcycle_btx', 'upcycle_bam', 'mix_btx_top1', 'mix_bam',
                      'eval seed code math btx_top1 bam', 'compare']
    for stage, cmd in zip(stages, commands(lines)):
        if stage == 'compare':  # reads the runs' small JSON files, here
            assert cmd[1:4] == ['-m', 'bam_jax.evaluate.compare', '--out'] and cmd[4] == 'gs://bucket/bam'
            continue
        assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod-a'], stage
        remote = next(a for a in cmd if a.startswith('--command='))
        host_work = stage.startswith('upcycle')
        assert ('--worker=0' if host_work else '--worker=all') in cmd, stage
        assert remote.endswith(' --distributed') != host_work, stage
        assert 'gs://bucket/bam/' in remote, stage
    remotes = [next(a for a in cmd if a.startswith('--command=')) for cmd in commands(lines)[:-1]]
    assert "--gin.INIT_CHECKPOINT=\\'gs://bucket/bam/seed\\'" in remotes[1]
    assert '--gin_file=gs://bucket/bam/bam_init/model.gin' in remotes[6]
    assert not (REPO / 'gs:').exists() and not (REPO / 'runs' / '.done' / 'gs___bucket_bam').exists()
