"""launch/gpu_check.sh: the accelerator check runs end to end on the CPU with its tiny shape,
refuses its full shape there in one line, and judges its goals by hand-checkable rules."""

import json
import os
import pathlib
import subprocess

from bam_jax.benchmarks.gpu_check import ROWS, judge, main

REPO = pathlib.Path(__file__).resolve().parent.parent


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


def test_smoke_run_prints_the_report_and_saves_every_row(tmp_path, capsys):
    # In this process (the suite's 8 CPU devices); the shell script itself: the test below.
    out = tmp_path / 'check.json'
    assert main(['--smoke', f'--out={out}']) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report['smoke'] and [r['name'] for r in report['train']] == [name for name, _, _ in ROWS]
    for row in report['train']:
        assert 'skipped' not in row, row
        assert row['step_time_s'] > 0 and row['achieved_flops'] > 0
        assert row['attention_impl'] == ('plain' if row['name'].endswith('_plain') else 'xla')
    assert [r['arch'] for r in report['decode']] == ['dense', 'btx', 'bam', 'bam_shared_kv']
    assert all(r['batch_1']['decode_tokens_per_s'] > 0 and r['batch_2']['decode_tokens_per_s'] > 0
               for r in report['decode'])
    assert 'smoke run: goals not judged' in printed and 'vs BTX b1/b2' in printed


def test_full_shape_needs_an_accelerator(tmp_path):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHON': str(pathlib.Path(os.sys.executable))}
    done = subprocess.run(['bash', 'launch/gpu_check.sh', f'--out={tmp_path / "x.json"}'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ('error: no fused attention kernel on cpu; run with --smoke, '
                                                     'or on a GPU or TPU')
