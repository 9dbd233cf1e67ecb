"""The one model check where a checkpoint meets a model: a routing change is a setting (taken and
recorded, on resume and at eval), a shape change is refused."""

import json
import shutil

import pytest

from bam_jax.errors import BamJaxError
from bam_jax.evaluate.evaluator import evaluate_run
from bam_jax.gin_config import load_run_config, parse_gin
from bam_jax.models import ModelConfig
from bam_jax.models.config import LoryConfig, MoAConfig, MoEConfig, first_difference, setting_changes
from bam_jax.train import train
from bam_jax.workdir import files

from helpers import shared

BTX = ['gin/models/tiny.gin', 'gin/arch/btx.gin', 'gin/seed.gin']
SMALL = ['ModelConfig.d_model = 32', 'ModelConfig.d_ff = 64', 'ModelConfig.num_layers = 2',
         'BATCH_SIZE = 8', 'SEQ_LEN = 64', 'TrainConfig.warmup_steps = 1', 'TrainConfig.eval_every = 100',
         "DataConfig.eval_domains = ('math',)", 'DataConfig.eval_batches = 1', 'DataConfig.math_documents = 200']


def train_run(workdir, steps, *bindings):
    return train(workdir, parse_gin(BTX, [*SMALL, f'TRAIN_STEPS = {steps}', *bindings]))


@pytest.fixture(scope='module')
def btx_run(tmp_path_factory):
    """A tiny BTX run (top-2 routing) trained 2 steps, made once for all the xdist workers."""
    return shared(tmp_path_factory, 'workdir_btx_run', lambda d: train_run(d / 'run', 2)) / 'run'


def test_settings_and_differences_by_hand():
    top2 = ModelConfig(moe=MoEConfig(num_experts=4, top_k=2, gate='renormalize'))
    top1 = ModelConfig(moe=MoEConfig(num_experts=4, top_k=1), dtype='float32')
    assert setting_changes(top2, top1) == {'dtype': ['bfloat16', 'float32'], 'moe.gate': ['renormalize', 'softmax'],
                                           'moe.top_k': [2, 1]}
    assert first_difference(top2.architecture(), top1.architecture()) is None
    lory = ModelConfig(lory=LoryConfig(num_experts=4, segment_len=64))
    assert first_difference(top2.architecture(), lory.architecture()) == (
        'moe', {'num_experts': 4, 'expert_split': 1}, None)
    assert setting_changes(lory, ModelConfig(lory=LoryConfig(num_experts=4))) == {'lory.segment_len': [64, 32]}
    bam = ModelConfig(moe=MoEConfig(num_experts=4), moa=MoAConfig(num_experts=4, shared_kv=True))
    assert first_difference(bam.architecture(), ModelConfig(moe=MoEConfig(num_experts=4), moa=MoAConfig(
        num_experts=4)).architecture()) == ('moa', {'num_experts': 4, 'shared_kv': True},
                                           {'num_experts': 4, 'shared_kv': False})


def test_resume_takes_a_routing_change_and_records_it(btx_run, tmp_path, capsys):
    workdir = tmp_path / 'run'
    shutil.copytree(btx_run, workdir)
    result = train_run(workdir, 3, 'MoEConfig.top_k = 1', 'MoEConfig.gate = "softmax"')
    assert result['step'] == 3
    assert 'settings changed since that checkpoint: moe.gate ' in capsys.readouterr().out
    metrics = json.loads((workdir / files.METRICS).read_text())
    assert metrics['settings'] == [{'step': 2, 'changed': {'moe.gate': ['renormalize', 'softmax'],
                                                           'moe.top_k': [2, 1]}}]
    assert [r['step'] for r in metrics['train']] == [2, 3]  # the last step of each invocation


def test_resume_refuses_another_architecture(btx_run, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(btx_run, workdir)
    with pytest.raises(BamJaxError, match=r'holds a run of a different model: moe is \{.num_experts.: 4, '
                                          r'.expert_split.: 1\} there, \{.num_experts.: 2, .expert_split.: 1\} here'):
        train_run(workdir, 3, 'MoEConfig.num_experts = 2')
    with pytest.raises(BamJaxError, match='holds a run of a different model: d_ff is 64 there, 128 here'):
        train_run(workdir, 3, 'ModelConfig.d_ff = 128')
    assert sorted(p.name for p in (workdir / files.CHECKPOINTS).iterdir()) == ['2']


def test_eval_takes_a_routing_change_and_records_it(btx_run):
    soft = load_run_config(btx_run, ["MoEConfig.routing = 'soft'"])
    load_run_config(btx_run, [])  # gin now binds top_k: evaluation reads the configs it is given, not gin
    changed = evaluate_run(btx_run, soft, progress=lambda line: None)
    assert changed['settings_changed'] == {'moe.routing': ['top_k', 'soft']}
    assert evaluate_run(btx_run, load_run_config(btx_run, []), progress=lambda line: None)['settings_changed'] == {}
    split = load_run_config(btx_run, ['MoEConfig.expert_split = 2'])
    with pytest.raises(BamJaxError, match='holds a run of a different model: moe is'):
        evaluate_run(btx_run, split, progress=lambda line: None)
