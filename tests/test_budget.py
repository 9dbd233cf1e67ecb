"""Training length from a budget: FLOPs, data-matched and compute-matched runs, checked by hand."""

import dataclasses
import json

import pytest

from bam_jax.data import DataConfig
from bam_jax.errors import BamJaxError
from bam_jax.gin_config import RunConfig
from bam_jax.models import ModelConfig
from bam_jax.models.config import MoAConfig, MoEConfig
from bam_jax.parallel import MeshConfig
from bam_jax.train import TrainConfig, train
from bam_jax.train.budget import read_budget, resolve_train_steps, run_budget, write_budget
from bam_jax.workdir.files import BUDGET as BUDGET_FILE

# D 32, 2 layers, H 4, K 2, Dh 8, F 64, V 384 (untied); sequences of 64 tokens, 8 per batch.
MODEL = ModelConfig(vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                    dtype='float32')
BATCH, SEQ = 8, 64
TOKENS_PER_STEP = BATCH * SEQ  # 512
# Dense, per layer: wq, wo 32*4*8 = 1024 each, wk, wv 32*2*8 = 512 each, SwiGLU 3*32*64 = 6144;
# unembedding 32*384 = 12288; scores and values 2 matmuls * 2 FLOPs * 64 positions * 4 heads * 8
# = 8192 per layer. Forward 2 * (2 * (3072 + 6144) + 12288) + 2 * 8192 = 77824; train 3x that.
DENSE_TRAIN_FLOPS_PER_TOKEN = 3 * 77_824
# BTX: dense attention, top-2 of 4 FFN experts plus a 32x4 router:
# 2 * (2 * (3072 + 2*6144 + 128) + 12288) + 2 * 8192 = 102912.
BTX = dataclasses.replace(MODEL, moe=MoEConfig(num_experts=4, top_k=2, gate='renormalize'))
BTX_TRAIN_FLOPS_PER_TOKEN = 3 * 102_912
# BAM: 4 attention experts with their own K/V (4*3072 + router 128), top-1 FFN (6144 + 128),
# 4 * 4 = 16 query heads of scores: 2 * (2 * (12416 + 6272) + 12288) + 2 * 32768 = 164864.
BAM = dataclasses.replace(MODEL, moe=MoEConfig(num_experts=4), moa=MoAConfig(num_experts=4))
BAM_TRAIN_FLOPS_PER_TOKEN = 3 * 164_864


def config(**kwargs) -> TrainConfig:
    return TrainConfig(batch_size=kwargs.pop('batch_size', BATCH), seq_len=SEQ, **kwargs)


def test_run_budget_by_hand():
    budget = run_budget(config(), MODEL, 7)
    assert budget == {'steps': 7, 'tokens': 7 * 512, 'tokens_per_step': 512,
                      'flops_per_token': DENSE_TRAIN_FLOPS_PER_TOKEN,
                      'flops': 7 * 512 * DENSE_TRAIN_FLOPS_PER_TOKEN}


def test_no_budget_keeps_train_steps():
    plain = config(train_steps=123)
    assert resolve_train_steps(plain, MODEL) is plain


@pytest.mark.parametrize('steps', [1.0, 10.4, 10.6, 250.0])
def test_flops_budget_gives_rounded_steps(steps):
    per_step = DENSE_TRAIN_FLOPS_PER_TOKEN * 8 * 64  # 119,537,664 FLOPs
    budget = steps * per_step
    resolved = resolve_train_steps(config(flops_budget=budget), MODEL)
    assert resolved.train_steps == round(budget / (DENSE_TRAIN_FLOPS_PER_TOKEN * 8 * 64)) == round(steps)
    assert resolved.flops_budget == budget and resolved.batch_size == BATCH  # nothing else changes


def test_tiny_flops_budget_trains_at_least_one_step():
    assert resolve_train_steps(config(flops_budget=1.0), MODEL).train_steps == 1


def test_match_tokens_reads_budget_json(tmp_path):
    write_budget(tmp_path, config(train_steps=30), MODEL, 30)
    assert read_budget(tmp_path)['tokens'] == 30 * 512
    # Same tokens per step: the same length; twice the batch: half; half the batch: twice.
    assert resolve_train_steps(config(match_run=str(tmp_path)), MODEL).train_steps == 30
    assert resolve_train_steps(config(match_run=str(tmp_path), batch_size=16), MODEL).train_steps == 15
    assert resolve_train_steps(config(match_run=str(tmp_path), batch_size=4), MODEL).train_steps == 60
    # Data matching ignores the model: a BAM run sees as many tokens.
    assert resolve_train_steps(config(match_run=str(tmp_path)), BAM).train_steps == 30


def test_match_tokens_of_a_hand_written_budget(tmp_path):
    (tmp_path / BUDGET_FILE).write_text(json.dumps({'steps': 1, 'tokens': 10_000, 'flops': 1.0}))
    # 10000 / 512 = 19.53
    assert resolve_train_steps(config(match_run=str(tmp_path)), MODEL).train_steps == 20


def test_match_flops_of_btx_gives_bam_fewer_steps(tmp_path):
    btx_run = tmp_path / 'btx'
    btx_run.mkdir()
    write_budget(btx_run, config(train_steps=100), BTX, 100)
    btx_flops = 100 * 512 * BTX_TRAIN_FLOPS_PER_TOKEN
    assert read_budget(btx_run)['flops'] == btx_flops
    bam = resolve_train_steps(config(match_run=str(btx_run), match='flops'), BAM)
    # 100 * 102912 / 164864 = 62.42: compute-matched, BAM trains fewer steps.
    assert bam.train_steps == round(btx_flops / (BAM_TRAIN_FLOPS_PER_TOKEN * 512)) == 62
    # Data-matched instead: as many steps as BTX.
    assert resolve_train_steps(config(match_run=str(btx_run), match='tokens'), BAM).train_steps == 100
    # Compute-matched at twice the batch: half the steps (62.42 / 2 = 31.21).
    assert resolve_train_steps(config(match_run=str(btx_run), match='flops', batch_size=16), BAM).train_steps == 31


def test_match_run_that_has_not_finished(tmp_path):
    write_budget(tmp_path, config(train_steps=100), MODEL, 40)  # stopped at step 40 of 100
    with pytest.raises(BamJaxError, match='has not finished training'):
        resolve_train_steps(config(match_run=str(tmp_path)), MODEL)


def test_flops_budget_and_match_run_together(tmp_path):
    write_budget(tmp_path, config(), MODEL, 3)
    with pytest.raises(BamJaxError, match='flops_budget or TrainConfig.match_run, not both'):
        resolve_train_steps(config(flops_budget=1e9, match_run=str(tmp_path)), MODEL)


def test_unknown_match(tmp_path):
    write_budget(tmp_path, config(), MODEL, 3)
    with pytest.raises(BamJaxError, match="match='steps' must be 'tokens' or 'flops'"):
        resolve_train_steps(config(match_run=str(tmp_path), match='steps'), MODEL)


def test_match_run_without_budget_json(tmp_path):
    with pytest.raises(BamJaxError, match=f'{tmp_path / BUDGET_FILE} does not exist'):
        resolve_train_steps(config(match_run=str(tmp_path)), MODEL)


def test_match_run_with_damaged_budget_json(tmp_path):
    (tmp_path / BUDGET_FILE).write_text('{"steps": ')
    with pytest.raises(BamJaxError, match='cannot read'):
        resolve_train_steps(config(match_run=str(tmp_path)), MODEL)


@pytest.mark.parametrize('budget', [0, -1e9])
def test_non_positive_flops_budget(budget):
    with pytest.raises(BamJaxError, match='flops_budget must be positive'):
        config(flops_budget=budget)


def test_train_writes_budget_and_a_matched_run_trains_the_derived_steps(tmp_path):
    # No eval domains: the validation pass at the last step has nothing to do (and nothing to compile).
    data = DataConfig(source='law', eval_domains=())
    mesh = MeshConfig(data=2, fsdp=2, tensor=2)
    run = config(train_steps=2, warmup_steps=1, checkpoint_every=100, eval_every=100, log_every=1)
    first = train(tmp_path / 'first', RunConfig(train=run, model=MODEL, data=data, mesh=mesh))
    assert first['step'] == 2
    budget = json.loads((tmp_path / 'first' / BUDGET_FILE).read_text())
    assert budget['steps'] == 2
    assert budget['tokens'] == 2 * 8 * 64
    assert budget['flops'] == 2 * 8 * 64 * DENSE_TRAIN_FLOPS_PER_TOKEN

    # Data-matched at half the batch: 1024 tokens / (4 * 64) = 4 steps.
    matched = dataclasses.replace(run, batch_size=4, train_steps=1000, match_run=str(tmp_path / 'first'))
    second = train(tmp_path / 'second', RunConfig(train=matched, model=MODEL, data=data, mesh=mesh))
    assert second['step'] == 4 and second['stopped'] == 'finished'
    budget = json.loads((tmp_path / 'second' / BUDGET_FILE).read_text())
    assert budget['steps'] == 4 and budget['tokens'] == 2 * 8 * 64
