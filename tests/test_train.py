"""Trainer: schedule, accumulation, exact resume, non-finite stop; on real seqio data."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from bam_jax.data import DataConfig
from bam_jax.errors import BamJaxError
from bam_jax.gin_config import RunConfig
from bam_jax.models import ModelConfig, build_model, split_params
from bam_jax.models.config import MoAConfig, MoEConfig
from bam_jax.parallel import MeshConfig
from bam_jax.train import TrainConfig, train
from bam_jax.train.optimizer import learning_rate_schedule, make_optimizer
from bam_jax.train.step import make_train_step

from helpers import assert_same_state, restore

MODEL = ModelConfig(vocab_size=384, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=64,
                    dtype='float32')
# A small shuffle buffer: a small saved data state in each checkpoint.
DATA = DataConfig(source='seed', eval_domains=('code', 'math'), eval_batches=1, math_documents=500)
RUN = TrainConfig(train_steps=6, batch_size=8, seq_len=64, warmup_steps=2, checkpoint_every=2,
                  eval_every=3, log_every=1, learning_rate=3e-3)
MESH = MeshConfig(data=2, fsdp=2, tensor=2)
# BAM with sampled FFN routing: resuming must also restore the routing samples.
BAM_SAMPLED = dataclasses.replace(MODEL, moe=MoEConfig(num_experts=4, routing='sample_top1'),
                                  moa=MoAConfig(num_experts=2, shared_kv=True))


def test_schedule_matches_hand_computation():
    config = TrainConfig(train_steps=100, warmup_steps=10, learning_rate=1e-3, lr_multiplier=0.5)
    schedule = learning_rate_schedule(config)
    peak, end = 5e-4, 5e-5
    for step in (0, 5, 10):
        assert float(schedule(step)) == pytest.approx(peak * step / 10, rel=1e-6)
    for step in (10, 40, 75, 100):
        progress = (step - 10) / 90
        expected = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    graphdef, params = split_params(build_model(MODEL))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 259, (8, 33)).astype(np.int32)
    segments = np.ones((8, 32), np.int32)
    segments[:, 20:] = 2
    positions = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(8, 0).astype(np.int32)
    weights = np.ones((8, 32), np.float32)
    weights[3, 25:] = 0  # uneven token counts per micro-batch: the mean must be over tokens
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segments,
                 positions=positions, loss_weights=weights)
    optimizer = make_optimizer(RUN)
    results = []
    for accum in (1, 4):
        step = jax.jit(make_train_step(graphdef, optimizer, accum))
        results.append(step(params, optimizer.init(params), batch, jax.random.key(0)))
    (p1, _, m1), (p4, _, m4) = results
    assert float(m1['loss']) == pytest.approx(float(m4['loss']), rel=1e-6)
    assert float(m1['grad_norm']) == pytest.approx(float(m4['grad_norm']), rel=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# BAM with sampled routing on a mesh with every kind of axis: the hardest case of resuming (the
# dense path is the same code with fewer states to restore).
@pytest.mark.parametrize('model, mesh', [(BAM_SAMPLED, MeshConfig(fsdp=2, expert=2, tensor=2))], ids=['bam_sampled'])
def test_stop_and_resume_equals_straight_run_bit_for_bit(tmp_path, model, mesh):
    straight = train(tmp_path / 'straight', RunConfig(train=RUN, model=model, data=DATA, mesh=mesh))
    stopping = RunConfig(train=dataclasses.replace(RUN, stop_at_step=3), model=model, data=DATA, mesh=mesh)
    stopped = train(tmp_path / 'resumed', stopping)
    assert stopped['step'] == 3 and stopped['stopped'] == 'stop_at_step'
    resumed = train(tmp_path / 'resumed', RunConfig(train=RUN, model=model, data=DATA, mesh=mesh))
    assert resumed['step'] == straight['step'] == 6

    assert_same_state(tmp_path / 'straight' / 'checkpoints' / '6', tmp_path / 'resumed' / 'checkpoints' / '6')
    # The logged losses agree step by step, so the data position was restored too.
    logs = [json.loads((tmp_path / run / 'metrics.json').read_text()) for run in ('straight', 'resumed')]
    assert [r['loss'] for r in logs[0]['train']] == [r['loss'] for r in logs[1]['train']]
    assert [r['step'] for r in logs[1]['train']] == list(range(1, 7))
    assert {'code/perplexity', 'math/loss', 'average/perplexity'} <= set(logs[0]['eval'][0])
    if model.moe:  # every routed layer's metrics are logged
        record = logs[0]['train'][0]
        assert record['aux_loss'] > 0
        assert {'router/layers/0/ffn/entropy', 'router/layers/0/ffn/dropped_fraction',
                'router/layers/0/attn/load/1', 'router/layers/0/attn/z_loss'} <= set(record)


def test_a_training_length_past_the_model_length_is_refused(tmp_path):
    short = dataclasses.replace(MODEL, max_length=32)
    with pytest.raises(BamJaxError, match=r'TrainConfig.seq_len 64 is longer than the model reads '
                                          r'\(ModelConfig.max_length 32\)'):
        train(tmp_path, RunConfig(train=RUN, model=short, data=DATA, mesh=MESH))
    assert not tmp_path.joinpath('checkpoints').exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    train(tmp_path, RunConfig(train=dataclasses.replace(RUN, train_steps=2, warmup_steps=0), model=MODEL, data=DATA,
                              mesh=MESH))
    good = restore(tmp_path / 'checkpoints' / '2' / 'params')
    exploding = dataclasses.replace(RUN, train_steps=5, warmup_steps=0, learning_rate=1e38,
                                    grad_clip_norm=1e38, checkpoint_every=1)
    with pytest.raises(BamJaxError, match='non-finite.*last good checkpoint is step 2'):
        train(tmp_path, RunConfig(train=exploding, model=MODEL, data=DATA, mesh=MESH))
    saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert saved == [2]
    for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(restore(tmp_path / 'checkpoints' / '2' / 'params'))):
        np.testing.assert_array_equal(x, y)
