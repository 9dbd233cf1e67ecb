"""Expert surgery (bam_jax/upcycle/surgery.py, `bam-jax experts`) and router-only training.

The invariances: an expert that routing never selects can be removed, or added, without changing
a logit (top-1 with renormalised gates: a chosen expert's gate is 1 whatever the others; ties go
to the lower index, so an expert whose router column copies an earlier one's is never chosen);
removing an expert drops exactly its slices; router-only training moves the routers and nothing
else, bit for bit."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from bam_jax.errors import BamJaxError
from bam_jax.models import ModelConfig, abstract_model, merge_params, split_params
from bam_jax.models.config import MoEConfig
from bam_jax.models.params import unflatten
from bam_jax.upcycle import surgery
from bam_jax.upcycle.core import UpcycleSpec, upcycle
from bam_jax.workdir import resolve_checkpoint
from bam_jax.workdir.tensors import CheckpointReader

from helpers import assert_one_line_error
from upcycle_cases import dense, random_params  # noqa: F401 - the dense fixture

CONFIG = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, d_ff=32, dtype='float32')
TOP1 = dict(routing='top_k', top_k=1, gate='renormalize')
NAMES = ('seed', 'code', 'law', 'math')


def mixed(method, expert_split=1):
    models = [random_params(CONFIG, seed) for seed in range(4)]
    spec = UpcycleSpec(method, 4, (0, 1, 2, 3), expert_split=expert_split, model_names=NAMES)
    params, config = upcycle(models, CONFIG, spec)
    if config.moe:
        config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, **TOP1))
    return params, config, models


def logits(params, config):
    graphdef, _ = split_params(abstract_model(config))
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 16))
    return np.asarray(jax.jit(lambda p: merge_params(graphdef, p)(tokens))(unflatten(params)))


def never_chosen(params, config, copy_of, expert):
    """params with `expert`'s router columns (every FFN router) copying expert `copy_of`'s."""
    params = dict(params)
    c = config.moe.expert_split
    for path in [p for p in params if p.endswith('ffn/router/kernel')]:
        kernel = np.array(params[path])
        kernel[:, expert * c:(expert + 1) * c] = kernel[:, copy_of * c:(copy_of + 1) * c]
        params[path] = kernel
    return params


@pytest.mark.parametrize('expert_split', [1, 2])
def test_removing_an_expert_routing_never_selects_leaves_the_logits(expert_split):
    params, config, _ = mixed('btx', expert_split)
    params = never_chosen(params, config, copy_of=1, expert=3)
    removed, smaller = surgery.remove_expert(params, config, 'math')
    assert smaller.expert_names == ('seed', 'code', 'law') and smaller.moe.num_experts == 3
    assert removed['layers/0/ffn/experts/wi_gate'].shape[0] == 3 * expert_split
    assert removed['layers/1/ffn/router/kernel'].shape == (CONFIG.d_model, 3 * expert_split)
    np.testing.assert_allclose(logits(removed, smaller), logits(params, config), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('method', ['bam', 'lory'])
def test_removing_drops_exactly_the_experts_slices_in_every_layer(method):
    params, config, _ = mixed(method)
    removed, smaller = surgery.remove_expert(params, config, 'code')
    layers = [layer for layer in (smaller.moe, smaller.moa, smaller.lory) if layer is not None]
    assert [layer.num_experts for layer in layers] == [3] * len(layers)
    assert smaller.expert_names == ('seed', 'law', 'math')
    for path, value in params.items():
        if '/experts/' in path:
            np.testing.assert_array_equal(removed[path], np.delete(value, 1, axis=0))
        elif path.endswith('router/kernel'):
            np.testing.assert_array_equal(removed[path], np.delete(value, 1, axis=1))
        else:
            assert removed[path] is value
    assert set(removed) == set(params)


def test_adding_an_expert_whose_rows_never_win_leaves_the_logits():
    params, config, models = mixed('btx')
    smaller_params, smaller = surgery.remove_expert(params, config, 'math')
    columns = {p: smaller_params[p][:, 0] for p in smaller_params if p.endswith('router/kernel')}
    grown, bigger = surgery.insert_expert(smaller_params, smaller, models[3], 'math', 3, columns)
    assert bigger.expert_names == ('seed', 'code', 'law', 'math')
    np.testing.assert_array_equal(grown['layers/0/ffn/experts/wo'][3], models[3]['layers/0/ffn/wo'])
    np.testing.assert_allclose(logits(grown, bigger), logits(smaller_params, smaller), rtol=1e-6, atol=1e-6)
    # put back where it was, with its own columns: the model it was removed from
    columns = {p: params[p][:, 3] for p in columns}
    again, same = surgery.insert_expert(smaller_params, smaller, models[3], 'math', 3, columns)
    assert same == config and all(np.array_equal(again[p], params[p]) for p in params)


def test_replacing_swaps_the_weights_in_place():
    params, config, models = mixed('bam_shared_kv')
    columns = {p: np.full(CONFIG.d_model, 0.5, np.float32) for p in params if p.endswith('router/kernel')}
    swapped, renamed = surgery.replace_expert(params, config, 'law', models[0], 'law_v2', columns)
    assert renamed.expert_names == ('seed', 'code', 'law_v2', 'math')
    np.testing.assert_array_equal(swapped['layers/1/attn/experts/wq'][2], models[0]['layers/1/attn/wq'])
    assert 'layers/1/attn/experts/wk' not in swapped  # shared K/V stay shared
    np.testing.assert_array_equal(swapped['layers/0/attn/router/kernel'][:, 2], columns['layers/0/attn/router/kernel'])
    router = 'layers/0/attn/router/kernel'
    np.testing.assert_array_equal(swapped[router][:, 1], params[router][:, 1])


def test_bad_surgery_is_refused():
    params, config, models = mixed('btx')
    with pytest.raises(BamJaxError, match="no expert named 'nope'; the model's experts are seed, code, law, math"):
        surgery.remove_expert(params, config, 'nope')
    one = dataclasses.replace(config, moe=dataclasses.replace(config.moe, num_experts=1), expert_names=('seed',))
    with pytest.raises(BamJaxError, match='only expert left'):
        surgery.remove_expert(params, one, 'seed')
    wide = random_params(dataclasses.replace(CONFIG, d_ff=64), 9)
    columns = {p: params[p][:, 0] for p in params if p.endswith('router/kernel')}
    with pytest.raises(BamJaxError, match='another shape'):
        surgery.insert_expert(params, config, wide, 'wide', 4, columns)
    with pytest.raises(BamJaxError, match="named 'code' already"):
        surgery.insert_expert(params, config, models[0], 'code', 4, columns)


def test_top_k_comes_down_to_the_experts_left():
    params, config, _ = mixed('btx')
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, top_k=4))
    for name in ('math', 'law'):
        params, config = surgery.remove_expert(params, config, name)
    assert config.moe == dataclasses.replace(MoEConfig(num_experts=2, top_k=2, gate='renormalize'),
                                             load_balance_weight=config.moe.load_balance_weight,
                                             z_loss_weight=config.moe.z_loss_weight)


def _write_config(directory, source):
    (directory / 'config.gin').write_text(
        f"DataConfig.source = '{source}'\nDataConfig.math_documents = 60\nTrainConfig.seq_len = 32\n")


def test_the_commands_write_a_model_eval_and_training_read(dense, tmp_path, cli):  # noqa: F811
    for name, source in (('seed', 'math'), ('code', 'code'), ('law', 'law')):
        _write_config(dense[name][0], source)
    mix = tmp_path / 'mix'
    cli('upcycle', '--method=bam', f'--seed={dense["seed"][0]}', f'--experts={dense["code"][0]}',
            f'--out={mix}', check=True)
    removed = tmp_path / 'removed'
    done = cli('experts', 'remove', f'--workdir={mix}', '--expert=code', f'--out={removed}', check=True)
    assert 'math, code -> math' in done.stdout
    evaluated = cli('eval', f'--workdir={removed}', '--json', '--gin.DataConfig.eval_batches=1',
                        '--gin.TrainConfig.seq_len=32', '--gin.DataConfig.math_documents=60', check=True)
    result = json.loads(evaluated.stdout.splitlines()[-1])
    assert result['experts'] == {'ffn': ['math'], 'attn': ['math']}
    generated = cli('generate', f'--workdir={removed}', '--prompt=Problem', '--max_new_tokens=3', '--json',
                        '--gin.TrainConfig.seq_len=32', check=True)  # the KV cache follows the expert count
    assert len(json.loads(generated.stdout.splitlines()[-1])['completion_ids']) <= 3
    added = tmp_path / 'added'
    done = cli('experts', 'add', f'--workdir={removed}', f'--run={dense["law"][0]}', '--router_tokens=256',
                   f'--out={added}', check=True)
    record = json.loads((added / 'experts.json').read_text())
    assert record['experts_after'] == ['math', 'law'] and record['router']['domain'] == 'law'
    assert set(record['router']['own_share']) == {'layers/0/ffn', 'layers/0/attn', 'layers/1/ffn', 'layers/1/attn'}
    # the routers alone train: everything else stays bit for bit
    trained = tmp_path / 'router_only'
    cli('train', f'--gin_file={added}/model.gin', '--gin_file=gin/mix_router_only.gin', '--gin.TRAIN_STEPS=2',
            '--gin.BATCH_SIZE=8', '--gin.SEQ_LEN=32', "--gin.DataConfig.source='math'",
            '--gin.DataConfig.math_documents=60', '--gin.DataConfig.eval_batches=1', '--gin.TrainConfig.warmup_steps=1',
            f'--workdir={trained}', check=True)
    before, after = (CheckpointReader(resolve_checkpoint(d)) for d in (added, trained))
    moved = [p for p in before.nbytes if before.read(p).tobytes() != after.read(p).tobytes()]
    assert moved and all(p.endswith('/router/kernel') for p in moved)
    # bad input: one line each, nothing written
    for args, message in [(['remove', f'--workdir={added}', '--expert=nope'], "no expert named 'nope'"),
                          (['add', f'--workdir={added}', f'--run={dense["wide"][0]}'], 'another shape'),
                          (['add', f'--workdir={added}', f'--run={added}'], 'a mixed model'),
                          (['remove', f'--workdir={removed}', '--expert=math'], 'only expert left')]:
        assert_one_line_error(cli('experts', *args, f'--out={tmp_path / "bad"}'), message)
    assert not (tmp_path / 'bad').exists()


def test_with_soft_routing_an_added_expert_moves_the_output_by_its_weight_only():
    """BAM's soft attention experts: out = sum_e p_e y_e, so after an expert joins with weight w,
    out' = (1 - w) out + w y_new, where y_new is the new expert alone (gate 1)."""
    from flax import nnx

    from bam_jax.models.attention_kernels import self_attention_mask
    from bam_jax.models.moa import MoAttention
    from bam_jax.models.sublayer import Context

    params, config, models = mixed('bam')
    prefix = 'layers/0/attn/'
    layer_params = lambda flat: {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}  # noqa: E731
    smaller_params, smaller = surgery.remove_expert(params, config, 'math')
    column = np.random.default_rng(1).standard_normal(CONFIG.d_model).astype(np.float32) * 0.5
    columns = {p: column for p in smaller_params if p.endswith('router/kernel')}
    grown, bigger = surgery.insert_expert(smaller_params, smaller, models[3], 'math', 3, columns)
    x = np.random.default_rng(2).standard_normal((2, 8, CONFIG.d_model)).astype(np.float32)
    positions = np.broadcast_to(np.arange(8), (2, 8))
    mask = self_attention_mask(np.ones((2, 8), np.int32), CONFIG, True)

    def attention(flat, cfg):
        graphdef, _ = split_params(MoAttention(cfg, rngs=nnx.Rngs(0)))
        layer = merge_params(graphdef, unflatten(layer_params(flat)))
        return np.asarray(layer(x, Context(positions, mask, None))[0], np.float64)

    alone = dataclasses.replace(bigger, moa=dataclasses.replace(bigger.moa, num_experts=1), moe=None, expert_names=())
    only_new = {k: v[3:4] if '/experts/' in k else v[:, 3:4] for k, v in grown.items() if k.startswith(prefix)}
    logits = x @ grown[prefix + 'router/kernel']
    weight = np.exp(logits[..., 3] - logits.max(-1)) / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)
    weight = weight[..., None]
    expected = (1 - weight) * attention(smaller_params, smaller) + weight * attention(only_new, alone)
    np.testing.assert_allclose(attention(grown, bigger), expected, rtol=1e-5, atol=1e-5)
    assert 0 < weight.min() and weight.max() < 1
