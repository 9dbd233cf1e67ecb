"""A micro run of the whole pipeline (launch/pipeline.sh): every stage's outputs exist and agree
with each other, and a second run skips every finished stage."""

import json
import math
import os
import pathlib
import subprocess

import pytest

from helpers import shared

REPO = pathlib.Path(__file__).resolve().parent.parent
MIXES = ['btx_top1']  # the others: launch/run.sh --dry-run pipeline (test_launch.py)
DOMAINS = ['code', 'math']


def _pipeline(out):
    env = {**os.environ, 'OUT': str(out), 'DOMAINS': 'code', 'MIXES': ' '.join(MIXES),
           'SEED_STEPS': '2', 'BRANCH_STEPS': '2', 'MIX_STEPS': '8', 'BATCH_SIZE': '8', 'SEQ_LEN': '32',
           'TASKS': '',  # downstream tasks: tests/test_harness.py, test_compare.py, test_launch.py
           'EXTRA': "--gin.TrainConfig.warmup_steps=1 --gin.DataConfig.eval_batches=1 --gin.ModelConfig.num_layers=1 "
                    "--gin.DataConfig.eval_domains=['code','math'] --gin.DataConfig.math_documents=500"}
    env = {k: v for k, v in env.items() if not k.startswith('TPU_')}
    proc = subprocess.run(['bash', 'launch/pipeline.sh'], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
    """(OUT, stdout): the micro run, made once for all the xdist workers."""
    directory = shared(tmp_path_factory, 'pipeline', lambda d: (d / 'stdout').write_text(_pipeline(d / 'out')))
    return directory / 'out', (directory / 'stdout').read_text()


def _json(path):
    return json.loads(path.read_text())


def test_every_stage_leaves_its_outputs(pipeline):
    out, _ = pipeline
    runs = ['seed', 'code', *MIXES]
    for name in runs:
        assert (out / name / 'checkpoints').is_dir() and (out / name / 'config.gin').is_file(), name
        perplexity = _json(out / name / 'eval.json')['perplexity']
        assert set(perplexity) == {*DOMAINS, 'average'} and all(math.isfinite(v) for v in perplexity.values())
    assert (out / 'btx_init' / 'model.gin').is_file() and (out / 'btx_init' / 'upcycle.json').is_file()
    for name in MIXES:  # MoE runs have a routing map
        assert (out / name / 'routing_map.png').stat().st_size > 0
    comparison = _json(out / 'comparison.json')
    assert sorted(comparison['perplexity']) == sorted(runs)
    assert comparison['perplexity']['btx_top1'] == _json(out / 'btx_top1' / 'eval.json')['perplexity']
    assert (out / 'comparison.md').read_text().startswith('| run |')
    assert sorted(p.name for p in (out / '.done').iterdir()) == sorted(
        ['seed', 'branch_code', 'upcycle_btx', *[f'mix_{m}' for m in MIXES],
         *[f'eval_{r}' for r in runs]])


def test_the_baseline_trains_its_budget(pipeline):
    """(The runs matched to it: test_budget.py, and test_launch.py for the flags they get.)"""
    out, _ = pipeline
    top1 = _json(out / 'btx_top1' / 'budget.json')
    assert top1['steps'] == 8 and top1['finished'] and top1['tokens'] == 8 * 8 * 32


def test_upcycled_experts_come_from_the_runs(pipeline):
    out, _ = pipeline
    meta = _json(out / 'btx_init' / 'upcycle.json')
    assert meta['method'] == 'btx'
    assert [pathlib.Path(p).name for p in meta['expert_models']] == ['seed', 'code']
    assert [pathlib.Path(i['step_dir']).parts[-3:] for i in meta['inputs']] == [
        (run, 'checkpoints', '2') for run in ('seed', 'code')]


def test_a_second_run_skips_every_finished_stage(pipeline):
    out, _ = pipeline
    stdout = _pipeline(out)
    stages = [line for line in stdout.splitlines() if line.startswith('== ')]
    assert len(stages) == 1 + 1 + 1 + len(MIXES) + 2 + len(MIXES) + 1  # seed, branch, upcycle, mixes, evals, compare
    assert all(line.endswith(': finished before, skipped') for line in stages[:-1])
    assert stages[-1] == '== compare'
