"""launch/gpu_check.sh: the accelerator check runs end to end on the CPU with its tiny shape, in a
process that cannot import seqio, TensorFlow, lm_eval, tensorboardX or gcsfs (as on the lent GPU
machine's image); it refuses its full shape there in one line, keeps to its time budget, and
judges its goals by hand-checkable rules."""

import json
import os
import pathlib
import subprocess
import sys

from bam_jax.benchmarks.gpu_check import ROWS, judge, main

from blocked_imports import BLOCKED
from helpers import cli_env

REPO = pathlib.Path(__file__).resolve().parent.parent
BLOCKER = str(REPO / 'tests' / 'blocked_imports.py')
# What must work on a machine without the data, harness, TensorBoard and bucket libraries.
ACCELERATOR_PATHS = ('bam_jax.models', 'bam_jax.parallel', 'bam_jax.train.step', 'bam_jax.generate',
                     'bam_jax.upcycle', 'bam_jax.hf', 'bam_jax.benchmarks.gpu_check', 'bam_jax.benchmarks.decode',
                     'bam_jax.benchmarks.train_step', 'bam_jax.benchmarks.upcycle', 'bam_jax.benchmarks.hf_io',
                     'bam_jax.cli', 'bam_jax.data')


def test_goals_are_judged_against_the_dense_row():
    rows = judge([{'name': 'dense', 'step_time_s': 1.0, 'achieved_flops': 6.0, 'mfu': 0.60},
                  {'name': 'btx', 'step_time_s': 1.2, 'achieved_flops': 5.0, 'mfu': 0.50},
                  {'name': 'bam', 'step_time_s': 2.0, 'achieved_flops': 4.5, 'mfu': 0.45},
                  {'name': 'bam_shared_kv', 'skipped': 'time budget spent'}])
    dense, btx, bam, shared = rows
    assert dense['meets_goal'] and dense['goal'] == 'mfu >= 0.55'
    assert btx['vs_dense'] == 1.2 and btx['rate_vs_dense'] == 5.0 / 6.0 and not btx['meets_goal']
    assert bam['meets_goal']  # exactly at the 45% goal
    assert 'meets_goal' not in shared and 'vs_dense' not in shared


def test_accelerator_paths_import_without_the_data_libraries():
    code = (f'import importlib, sys\nfor name in {ACCELERATOR_PATHS!r}: importlib.import_module(name)\n'
            f'print(sorted(m for m in sys.modules if m.partition(".")[0] in {BLOCKED!r}))')
    done = subprocess.run([sys.executable, BLOCKER, '-c', code], cwd=REPO, env=cli_env(1), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == '[]'


def test_blocked_libraries_really_cannot_be_imported():
    done = subprocess.run([sys.executable, BLOCKER, '-c', 'import bam_jax.data.hf_tokenizer'], cwd=REPO,
                          env=cli_env(1), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "No module named 'seqio' (blocked)" in done.stderr


def test_smoke_run_without_the_data_libraries_prints_the_report_and_saves_every_row(tmp_path):
    # One CPU device, as the check's target is one GPU.
    out = tmp_path / 'check.json'
    done = subprocess.run([sys.executable, BLOCKER, '-m', 'bam_jax.benchmarks.gpu_check', '--smoke', f'--out={out}'],
                          cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['smoke'] and [r['name'] for r in report['train']] == [name for name, _, _ in ROWS]
    for row in report['train']:
        assert 'skipped' not in row, row
        assert row['step_time_s'] > 0 and row['achieved_flops'] > 0
        assert row['attention_impl'] == ('plain' if row['name'].endswith('_plain') else 'xla')
    assert [r['arch'] for r in report['decode']] == ['dense', 'btx', 'bam', 'bam_shared_kv']
    for row in report['decode']:
        assert row['batch_1']['decode_tokens_per_s'] > 0 and row['batch_2']['decode_tokens_per_s'] > 0
        assert row['batch_2']['vs_btx'] == row['batch_2']['decode_tokens_per_s'] / \
            report['decode'][1]['batch_2']['decode_tokens_per_s']
    assert report['software']['jax'] and report['software']['backend'] == 'cpu'
    assert 'smoke run: goals not judged' in done.stdout and 'vs BTX b1/b2' in done.stdout
    assert f'jax {report["software"]["jax"]}' in done.stdout.splitlines()[0]


def test_a_spent_budget_skips_every_row_and_still_reports(tmp_path, capsys):
    out = tmp_path / 'check.json'
    assert main(['--smoke', '--budget_s=0', f'--out={out}']) == 0
    report = json.loads(out.read_text())
    assert all(row['skipped'] == 'time budget spent' for row in report['train'] + report['decode'])
    printed = capsys.readouterr().out
    assert 'dense_plain          plain skipped: time budget spent' in printed
    assert 'bam_shared_kv  paper   skipped: time budget spent' in printed


def test_full_shape_needs_an_accelerator(tmp_path):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHON': str(pathlib.Path(os.sys.executable))}
    done = subprocess.run(['bash', 'launch/gpu_check.sh', f'--out={tmp_path / "x.json"}'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ('error: no fused attention kernel on cpu; run with --smoke, '
                                                     'or on a GPU or TPU')
