"""Lory's dense warm-up: the switch keeps the model's function, the step count and schedule run on,
and a run stopped before or after the switch resumes to the straight run's weights bit for bit."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from bam_jax.data import DataConfig
from bam_jax.errors import BamJaxError
from bam_jax.gin_config import RunConfig
from bam_jax.models import ModelConfig, build_model, merge_params, split_params
from bam_jax.models.config import LoryConfig
from bam_jax.parallel import MeshConfig
from bam_jax.train import TrainConfig, dense_warmup, train
from bam_jax.train.optimizer import learning_rate_schedule, make_optimizer

from helpers import assert_same_state

LORY = ModelConfig(vocab_size=384, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=64,
                   dtype='float32', lory=LoryConfig(num_experts=3, segment_len=16))
DATA = DataConfig(source='seed', eval_domains=('code',), eval_batches=1, math_documents=500)
# 6 steps, the first 3 dense.
RUN = TrainConfig(train_steps=6, batch_size=8, seq_len=64, warmup_steps=2, checkpoint_every=2,
                  eval_every=3, log_every=1, learning_rate=3e-3, dense_warmup_fraction=0.5)
MESH = MeshConfig(data=2, fsdp=2, tensor=2)


def test_warmup_steps_and_config_checks():
    assert dense_warmup.warmup_steps(RUN, LORY) == 3
    assert dense_warmup.warmup_steps(dataclasses.replace(RUN, train_steps=2000, dense_warmup_fraction=0.05),
                                     LORY) == 100
    assert dense_warmup.warmup_steps(RUN, dataclasses.replace(LORY, lory=None)) == 0
    with pytest.raises(BamJaxError, match='dense_warmup_fraction'):
        TrainConfig(dense_warmup_fraction=1.0)


def test_converted_model_computes_the_dense_function():
    dense = dense_warmup.dense_model(LORY)
    _, params = split_params(build_model(dense, seed=1))
    lory = dense_warmup.lory_params(LORY, params, seed=0)
    graphdef, expected = split_params(build_model(LORY))
    assert jax.tree.map(np.shape, lory) == jax.tree.map(np.shape, expected)
    experts = lory['layers']['0']['ffn']['experts']['wi_gate']
    np.testing.assert_array_equal(experts, np.broadcast_to(params['layers']['0']['ffn']['wi_gate'], experts.shape))
    assert np.std(lory['layers']['0']['ffn']['router']['kernel']) > 0  # a real router, not zeros

    tokens = np.random.default_rng(0).integers(1, 384, (2, 64)).astype(np.int32)
    want = merge_params(split_params(build_model(dense))[0], params)(tokens)
    got = merge_params(graphdef, lory)(tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # Adam's moments tile like the weights; the router's start at zero.
    opt_state = make_optimizer(RUN).init(params)
    opt_state = jax.tree.map(lambda x: x + 1.0 if x.ndim else x, opt_state)
    converted = dense_warmup.lory_opt_state(LORY, params, opt_state, seed=0)
    want_state = jax.eval_shape(make_optimizer(RUN).init, lory)
    assert jax.tree.structure(converted) == jax.tree.structure(want_state)
    mu = converted[1][0].mu['layers']['0']['ffn']
    assert np.all(mu['experts']['wo'] == 1.0) and np.all(mu['router']['kernel'] == 0.0)


def test_switch_continues_the_run_and_resumes_across_it(tmp_path, capsys):
    straight = train(tmp_path / 'straight', RunConfig(train=RUN, model=LORY, data=DATA, mesh=MESH))
    assert straight['step'] == 6 and straight['stopped'] == 'finished'
    assert 'dense warm-up done, switching to Lory' in capsys.readouterr().out

    # One step count and one learning-rate schedule across both phases.
    dense_log = json.loads((tmp_path / 'straight' / 'dense_warmup' / 'metrics.json').read_text())['train']
    lory_log = json.loads((tmp_path / 'straight' / 'metrics.json').read_text())['train']
    assert [r['step'] for r in dense_log] == [1, 2, 3] and [r['step'] for r in lory_log] == [4, 5, 6]
    schedule = learning_rate_schedule(RUN)
    for record in dense_log + lory_log:
        assert record['learning_rate'] == pytest.approx(float(schedule(record['step'] - 1)), rel=1e-6)
    assert 'router/layers/0/ffn/entropy' in lory_log[0]

    # Stop just after the switch (a warm-up and the switch in one invocation), then finish.
    first = train(tmp_path / 'resumed', RunConfig(train=dataclasses.replace(RUN, stop_at_step=4), model=LORY, data=DATA,
                                                       mesh=MESH))
    assert first['step'] == 4 and first['stopped'] == 'stop_at_step'
    assert not (tmp_path / 'resumed' / 'checkpoints' / '2').exists()  # the warm-up's checkpoints are its own
    assert train(tmp_path / 'resumed', RunConfig(train=RUN, model=LORY, data=DATA, mesh=MESH))['step'] == 6
    assert_same_state(tmp_path / 'straight' / 'checkpoints' / '6', tmp_path / 'resumed' / 'checkpoints' / '6')
    resumed_log = json.loads((tmp_path / 'resumed' / 'metrics.json').read_text())['train']
    assert [r['loss'] for r in resumed_log] == [r['loss'] for r in lory_log]
