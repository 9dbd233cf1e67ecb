# ruff: noqa: F811 - the fixtures imported from upcycle_cases are test arguments
"""The upcycler (`bam-jax upcycle`) between real Orbax checkpoints: identity, exact expert
slices and averages, routers, the written model config, and the mix stage starting from the
result. (User errors and atomic output: test_upcycle_errors.py.)"""

import dataclasses
import json

import gin
import jax
import numpy as np
import pytest

from bam_jax import workdir as ckpt
from bam_jax.gin_config import parse_gin
from bam_jax.models import ModelConfig, abstract_model, flatten, merge_params, split_params
from bam_jax.models.params import unflatten
from bam_jax.models.routing import call_with_aux
from bam_jax.upcycle import upcycle_checkpoints

from helpers import cli_in_process
from upcycle_cases import ATTN, DENSE, FFN, MODEL, D, F, dense, mean, read_params, step_dir, upcycled  # noqa: F401 (fixtures)

# --- 8. the mix stage starts from the upcycled checkpoint -------------------------------------
# First in the file: it is the longest test.

def test_mix_stage_trains_from_the_upcycled_checkpoint_with_a_fresh_optimizer(upcycled, tmp_path, monkeypatch,
                                                                              capsys):
    out, upcycled_params = upcycled('bam', ['code', 'law'], seed='seed')
    workdir = tmp_path / 'bam'
    status, stdout, stderr = cli_in_process(
        monkeypatch, capsys, 'train', f'--gin_file={out / "model.gin"}', '--gin_file=gin/mix_bam.gin',
        '--gin.TRAIN_STEPS=1', '--gin.BATCH_SIZE=8', '--gin.SEQ_LEN=64', '--gin.TrainConfig.warmup_steps=1',
        '--gin.DataConfig.eval_domains=()', '--gin.DataConfig.math_documents=500', f'--workdir={workdir}')
    assert status == 0, stderr[-3000:]
    assert f'initialising parameters from {step_dir(out)}' in stdout
    # The warmup's first learning rate is 0: one step leaves the upcycled weights exactly as
    # they were, which a restored optimizer state (or a random init) would not.
    trained = read_params(workdir / 'checkpoints' / '1')
    assert trained.keys() == upcycled_params.keys()
    for path, value in upcycled_params.items():
        np.testing.assert_array_equal(trained[path], value, err_msg=path)
    record = json.loads((workdir / 'metrics.json').read_text())['train'][0]
    assert record['learning_rate'] == 0.0 and np.isfinite(record['loss']) and record['aux_loss'] > 0
    config = (workdir / 'config.gin').read_text().splitlines()
    assert f'INIT_CHECKPOINT = {str(out)!r}' in config
    assert "DataConfig.source = 'mix'" in config and 'MoAConfig.routing = \'soft\'' in config


# --- 1. copies of one dense model compute the dense model's function -------------------------

TEXT = (b'def add(a, b):\n    return a + b\n'
        b'The court held that the contract was void for want of consideration. '
        b'Q: What is 12 * 7? A: 84.\n')


def packed_batch(length: int = 48):
    """Two rows of byte tokens, packed: several documents per row, positions restart per document."""
    tokens = (np.frombuffer(TEXT, np.uint8)[:2 * length].astype(np.int32) + 3).reshape(2, length)
    docs = [(17, 13, 18), (30, 18)]
    segment_ids = np.stack([np.repeat(np.arange(1, len(d) + 1), d) for d in docs]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(n) for n in d]) for d in docs]).astype(np.int32)
    return tokens, segment_ids, positions


def logits_of(config: ModelConfig, params: dict, batch):
    graphdef, _ = split_params(abstract_model(config))
    model = merge_params(graphdef, unflatten({k: jax.numpy.asarray(v) for k, v in params.items()}))
    logits, aux = call_with_aux(model, *batch)
    return np.asarray(logits), aux


@pytest.mark.parametrize('method, base', [('btx', 'seed'), ('bam', 'seed'), ('bam_shared_kv', 'seed'),
                                          ('sparse_upcycle', 'seed'), ('bam', 'sequential'),
                                          ('bam', 'extras'), ('bam_shared_kv', 'extras')])
def test_copies_of_one_dense_model_compute_the_dense_logits(dense, upcycled, method, base):
    config, _ = DENSE[base]
    if method == 'sparse_upcycle':
        out, params = upcycled(method, [], seed=base, num_experts=3)
    else:  # the same checkpoint three times: as seed and as two experts
        out, params = upcycled(method, [base, base], seed=base)
    batch = packed_batch()
    expected, aux = logits_of(config, dense[base][1], batch)
    assert aux == {}
    assert np.abs(expected).max() > 1.0  # the check below is not about near-zero logits

    written = ckpt.read_model_config(step_dir(out))
    assert written.moe.num_experts == 3
    for ffn in (dict(routing='soft'), dict(routing='top_k', top_k=2, gate='renormalize')):
        moe = dataclasses.replace(written.moe, **ffn)  # evaluation: dropless
        moa = written.moa and dataclasses.replace(written.moa, routing='soft')
        routed = dataclasses.replace(written, moe=moe, moa=moa)
        got, aux = logits_of(routed, params, batch)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(),
                                   err_msg=f'{method} {ffn}')
        assert {f'layers/{i}/ffn' for i in range(2)} <= set(aux)
        assert ({f'layers/{i}/attn' for i in range(2)} <= set(aux)) == (written.moa is not None)
        for i in range(2):
            assert float(aux[f'layers/{i}/ffn']['dropped_fraction']) == 0.0


# --- 2. expert slices are the source tensors, bit for bit ------------------------------------

@pytest.mark.parametrize('method', ['btx', 'bam', 'bam_shared_kv'])
def test_expert_slices_are_the_source_tensors(dense, upcycled, method):
    out, params = upcycled(method, ['code', 'law'], seed='seed')
    sources = [dense[name][1] for name in ('seed', 'code', 'law')]  # seed first, then in the order given
    check_expert_slices(params, sources, method)
    summary = json.loads((out / 'upcycle.json').read_text())
    assert summary['expert_models'] == ['seed', str(dense['code'][0]), str(dense['law'][0])]
    assert summary['method'] == method and summary['tensors'] == len(params)


@pytest.mark.parametrize('method', ['btx', 'bam', 'bam_shared_kv'])
def test_biases_and_qk_norms_follow_their_projections(dense, upcycled, method):
    _, params = upcycled(method, ['extras2', 'extras'], seed='extras')
    check_expert_slices(params, [dense[name][1] for name in ('extras', 'extras2', 'extras')], method)


def check_expert_slices(params: dict, sources: list[dict], method: str):
    """FFNs (and BAM's attention projections, with their biases and q/k norms) are stacked
    from the sources bit for bit; every other tensor is their mean."""
    for layer in range(MODEL.num_layers):
        for name in FFN:
            stacked = params[f'layers/{layer}/ffn/experts/{name}']
            assert stacked.shape == (3, *sources[0][f'layers/{layer}/ffn/{name}'].shape)
            for i, source in enumerate(sources):
                np.testing.assert_array_equal(stacked[i], source[f'layers/{layer}/ffn/{name}'])
            assert f'layers/{layer}/ffn/{name}' not in params
        stacked_attn = {'btx': (), 'bam': ATTN, 'bam_shared_kv': ('wq', 'wo', 'bq', 'q_norm')}[method]
        for name in ATTN:
            if f'layers/{layer}/attn/{name}' not in sources[0]:
                continue  # an extra this model has not
            if name in stacked_attn:
                for i, source in enumerate(sources):
                    np.testing.assert_array_equal(params[f'layers/{layer}/attn/experts/{name}'][i],
                                                  source[f'layers/{layer}/attn/{name}'])
                assert f'layers/{layer}/attn/{name}' not in params
            else:  # btx attention, shared K/V: the mean of every input
                np.testing.assert_array_equal(params[f'layers/{layer}/attn/{name}'],
                                              mean([s[f'layers/{layer}/attn/{name}'] for s in sources]))
                assert f'layers/{layer}/attn/experts/{name}' not in params


def test_no_seed_expert_keeps_the_seed_in_the_averages_only(dense, upcycled):
    out, params = upcycled('bam_shared_kv', ['law', 'code'], seed='seed', seed_expert=False)
    experts = [dense['law'][1], dense['code'][1]]  # the order given, without the seed
    everyone = [dense[name][1] for name in ('seed', 'law', 'code')]
    for layer in range(MODEL.num_layers):
        for path in [f'ffn/experts/{n}' for n in FFN] + ['attn/experts/wq', 'attn/experts/wo']:
            stacked = params[f'layers/{layer}/{path}']
            assert stacked.shape[0] == 2
            for i, source in enumerate(experts):
                np.testing.assert_array_equal(stacked[i], source[f'layers/{layer}/{path.replace("experts/", "")}'])
        for name in ('wk', 'wv'):
            np.testing.assert_array_equal(params[f'layers/{layer}/attn/{name}'],
                                          mean([s[f'layers/{layer}/attn/{name}'] for s in everyone]))
        assert params[f'layers/{layer}/ffn/router/kernel'].shape == (D, 2)
        assert params[f'layers/{layer}/attn/router/kernel'].shape == (D, 2)
    for path in ('embed/embedding', 'unembed/kernel', 'final_norm/scale', 'layers/1/norm/scale'):
        np.testing.assert_array_equal(params[path], mean([s[path] for s in everyone]))
    config = ckpt.read_model_config(step_dir(out))
    assert config.moe.num_experts == config.moa.num_experts == 2
    assert json.loads((out / 'upcycle.json').read_text())['expert_models'] == [
        str(dense['law'][0]), str(dense['code'][0])]


def test_sparse_upcycle_copies_one_ffn_into_every_expert(dense, upcycled):
    out, params = upcycled('sparse_upcycle', ['code'], num_experts=4)
    source = dense['code'][1]
    for layer in range(MODEL.num_layers):
        for name in FFN:
            stacked = params[f'layers/{layer}/ffn/experts/{name}']
            assert stacked.shape[0] == 4
            for i in range(4):
                np.testing.assert_array_equal(stacked[i], source[f'layers/{layer}/ffn/{name}'])
        assert params[f'layers/{layer}/ffn/router/kernel'].shape == (D, 4)
    for path, value in source.items():  # everything else is the model's own tensor
        if '/ffn/' not in path:
            np.testing.assert_array_equal(params[path], value)
    config = ckpt.read_model_config(step_dir(out))
    assert (config.moe.num_experts, config.moe.expert_split, config.moa) == (4, 1, None)


def test_expert_split_cuts_each_ffn_into_consecutive_chunks(dense, upcycled):
    out, params = upcycled('btx', ['code'], seed='seed', expert_split=2)
    sources = [dense['seed'][1], dense['code'][1]]
    half = F // 2
    for layer in range(MODEL.num_layers):
        gate, up, wo = (params[f'layers/{layer}/ffn/experts/{n}'] for n in FFN)
        assert gate.shape == up.shape == (4, D, half) and wo.shape == (4, half, D)
        for i, source in enumerate(sources):
            for c in range(2):
                units = slice(c * half, (c + 1) * half)
                np.testing.assert_array_equal(gate[i * 2 + c], source[f'layers/{layer}/ffn/wi_gate'][:, units])
                np.testing.assert_array_equal(up[i * 2 + c], source[f'layers/{layer}/ffn/wi_up'][:, units])
                np.testing.assert_array_equal(wo[i * 2 + c], source[f'layers/{layer}/ffn/wo'][units, :])
        assert params[f'layers/{layer}/ffn/router/kernel'].shape == (D, 4)
    config = ckpt.read_model_config(step_dir(out))
    assert (config.moe.num_experts, config.moe.expert_split, config.moe.num_routed_experts) == (2, 2, 4)


# --- 3. averaged tensors are the numpy means -------------------------------------------------

@pytest.mark.parametrize('method', ['btx', 'bam', 'bam_shared_kv'])
def test_shared_tensors_are_the_means_of_the_inputs(dense, upcycled, method):
    _, params = upcycled(method, ['code', 'law'], seed='seed')
    sources = [dense[name][1] for name in ('seed', 'code', 'law')]
    averaged = [p for p in sources[0] if p in params]  # kept under its dense name
    attention = {'btx': ('wq', 'wk', 'wv', 'wo'), 'bam': (), 'bam_shared_kv': ('wk', 'wv')}[method]
    assert sorted(averaged) == sorted(['embed/embedding', 'unembed/kernel', 'final_norm/scale'] + [
        f'layers/{i}/{name}' for i in range(MODEL.num_layers)
        for name in ['norm/scale', *(f'attn/{a}' for a in attention)]])
    for path in averaged:
        expected = mean([s[path] for s in sources])
        assert params[path].dtype == np.float32
        np.testing.assert_array_equal(params[path], expected, err_msg=path)
        assert not np.array_equal(params[path], sources[0][path])  # the inputs really differ


# --- 4. routers ------------------------------------------------------------------------------

def test_routers_are_fresh_reproducible_and_distinct(dense, upcycled, tmp_path):
    _, params = upcycled('bam', ['code', 'law'], seed='seed')
    routers = {p: v for p, v in params.items() if p.endswith('router/kernel')}
    assert sorted(routers) == [f'layers/{i}/{kind}/router/kernel' for i in range(2) for kind in ('attn', 'ffn')]
    for path, kernel in routers.items():
        assert kernel.shape == (D, 3) and kernel.dtype == np.float32
        assert np.all(np.isfinite(kernel))
        assert 0.5 * MODEL.init_std < kernel.std() < 2 * MODEL.init_std, path
        assert len(np.unique(kernel)) == kernel.size  # random, not a constant or a copy
    values = list(routers.values())
    for i in range(len(values)):
        for j in range(i):
            assert not np.array_equal(values[i], values[j])

    # A router depends on the router seed (default 0) and its path only: another run, here
    # BTX, draws the same FFN routers.
    _, same = upcycled('btx', ['code', 'law'], seed='seed')
    for path in routers:
        if '/ffn/' in path:
            np.testing.assert_array_equal(same[path], routers[path])
    other = tmp_path / 'other'
    upcycle_checkpoints('bam', [str(dense['code'][0]), str(dense['law'][0])], other, seed=str(dense['seed'][0]),
                        router_seed=1, progress=False)
    other = read_params(step_dir(other))
    assert other.keys() == params.keys()
    for path, value in params.items():
        if path in routers:
            assert not np.array_equal(other[path], value), path
        else:
            np.testing.assert_array_equal(other[path], value)


# --- 5. the written tree and config ----------------------------------------------------------

@pytest.mark.parametrize('method, experts, kwargs', [
    ('btx', ['code', 'law'], {}), ('bam', ['code', 'law'], {}), ('bam_shared_kv', ['code', 'law'], {}),
    ('sparse_upcycle', ['code'], dict(num_experts=4)), ('btx', ['code'], dict(expert_split=2)),
    ('bam', ['sequential', 'sequential'], {}), ('lory', ['code', 'law'], {}),
])
def test_output_is_the_moe_of_the_written_config_and_its_gin_rebuilds_it(dense, upcycled, method, experts, kwargs):
    base = 'sequential' if 'sequential' in experts else 'seed'
    seed = None if method == 'sparse_upcycle' else base
    out, params = upcycled(method, experts, seed=seed, **kwargs)
    config = ckpt.read_model_config(step_dir(out))
    assert dataclasses.replace(config, moe=None, moa=None, lory=None, expert_names=()) == DENSE[base][0]
    assert (config.moa is None) == (method in ('btx', 'sparse_upcycle', 'lory'))
    assert (config.moe is None) == (config.lory is not None) == (method == 'lory')
    if config.moa:
        assert config.moa.shared_kv == (method == 'bam_shared_kv')
    expected = {k: v.shape for k, v in flatten(split_params(abstract_model(config))[1]).items()}
    stored = ckpt.read_param_shapes(step_dir(out))
    assert {k: tuple(v[0]) for k, v in stored.items()} == expected
    assert {k: v.shape for k, v in params.items()} == expected
    assert all(v.dtype == np.float32 for v in params.values())
    assert ckpt.resolve_checkpoint(out) == step_dir(out)
    assert sorted(p.name for p in step_dir(out).iterdir() if not p.name.startswith('_')) == ['model', 'params']
    assert sorted(p.name for p in out.iterdir()) == ['checkpoints', 'model.gin', 'upcycle.json']

    parse_gin([str(out / 'model.gin')], [])
    assert ModelConfig() == config
    assert gin.query_parameter('%INIT_CHECKPOINT') == str(out)
    gin.clear_config()  # from_dict below must fill no field from model.gin's bindings
    summary = json.loads((out / 'upcycle.json').read_text())
    assert ModelConfig.from_dict(summary['model']) == config
    assert summary['out'] == str(out) and summary['expert_split'] == kwargs.get('expert_split', 1)


# --- 5b. Lory: the btx tensors under Lory's model ---------------------------------------------

def test_lory_stacks_the_ffns_in_order_and_averages_the_rest(dense, upcycled):
    out, params = upcycled('lory', ['code', 'law'], seed='seed')
    sources = [dense[name][1] for name in ('seed', 'code', 'law')]
    reference = {}  # numpy only: expert i is model i's FFN, every other tensor the plain mean
    for path in sources[0]:
        layer, _, name = path.partition('/ffn/')
        if name:
            reference[f'{layer}/ffn/experts/{name}'] = np.stack([s[path] for s in sources])
        else:
            reference[path] = mean([s[path] for s in sources])
    routers = [f'layers/{i}/ffn/router/kernel' for i in range(MODEL.num_layers)]
    assert sorted(params) == sorted([*reference, *routers])
    for path, expected in reference.items():
        np.testing.assert_array_equal(params[path], expected, err_msg=path)
    _, btx = upcycled('btx', ['code', 'law'], seed='seed')  # the same router seed and paths: the same routers
    for path in routers:
        assert params[path].shape == (D, 3)
        np.testing.assert_array_equal(params[path], btx[path])

    config = ckpt.read_model_config(step_dir(out))
    assert config.moe is None and config.moa is None
    assert config.lory.num_experts == 3
    text = (out / 'model.gin').read_text().splitlines()
    assert {'ModelConfig.lory = @LoryConfig()', 'ModelConfig.moe = None', 'LoryConfig.num_experts = 3'} <= set(text)
    # The mix stage's files on top: Lory's routing (gin/routing/lory.gin), the upcycled model,
    # similarity batching.
    parse_gin([str(out / 'model.gin'), 'gin/mix_lory.gin'], [])
    assert ModelConfig().architecture() == config.architecture()
    assert (ModelConfig().lory.segment_len, ModelConfig().lory.z_loss_weight) == (32, 0.0)
    assert gin.query_parameter('DataConfig.similarity_batching') is True
    assert gin.query_parameter('%INIT_CHECKPOINT') == str(out)


@pytest.mark.parametrize('segment_len', [32, 5])
def test_lory_of_copies_of_one_dense_model_computes_the_dense_logits(dense, upcycled, segment_len):
    out, params = upcycled('lory', ['seed', 'seed'], seed='seed')
    batch = packed_batch()
    expected, _ = logits_of(MODEL, dense['seed'][1], batch)
    assert np.abs(expected).max() > 1.0
    config = ckpt.read_model_config(step_dir(out))
    lory = dataclasses.replace(config, lory=dataclasses.replace(config.lory, segment_len=segment_len))
    got, aux = logits_of(lory, params, batch)  # any merge of identical experts is that expert
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    for i in range(MODEL.num_layers):
        assert float(aux[f'layers/{i}/ffn']['dropped_fraction']) == 0.0
