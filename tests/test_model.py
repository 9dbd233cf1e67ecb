"""The dense LM against independent references: a numpy forward pass, causality, packing,
the parameter naming contract and the published model sizes."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bam_jax.errors import BamJaxError
from bam_jax.models import (
    ModelConfig,
    abstract_model,
    build_model,
    count_params,
    flatten,
    merge_params,
    param_logical_names,
    split_params,
)
from bam_jax.parallel.sharding import LOGICAL_AXIS_RULES

from references import np_attention, np_rms_norm, np_swiglu

# Small but not degenerate: grouped-query attention (4 query heads over 2 K/V heads), a
# head_dim that differs from d_model // num_heads, and d_ff != d_model.
SMALL = dict(vocab_size=50, d_model=24, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, d_ff=40, dtype='float32')


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


def randomized(model, seed=0):
    """(graphdef, params) with every weight redrawn at unit-ish scale.

    The default init (std 0.02, unit norm scales) makes attention nearly uniform and the
    norm scales invisible, so a reference comparison would miss real mistakes.
    """
    graphdef, params = split_params(model)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if 'scale' in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        fan_in = x.shape[0] if 'wo' not in name else int(np.prod(x.shape[:-1]))
        if 'embedding' in name:
            fan_in = 1
        return jnp.asarray(rng.normal(0, fan_in ** -0.5, x.shape), jnp.float32)

    return graphdef, jax.tree_util.tree_map_with_path(draw, params)


def forward(graphdef, params, tokens, segment_ids=None, positions=None):
    return np.asarray(jax.jit(lambda p, t, s, q: merge_params(graphdef, p)(t, s, q))(
        params, tokens, segment_ids, positions))


# ---------------------------------------------------------------------------------------
# Plain numpy reference (float64), written from the equations, not from the model code
# (its parts: tests/references.py).

def np_forward(params, tokens, segment_ids, positions, cfg):
    """The whole LM for a batch, in float64. Returns [B, T, V]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def attention(h, w, pos, seg):
        return np_attention(h, w['wq'], w['wk'], w['wv'], w['wo'], pos, seg, cfg.rope_theta)

    out = []
    for row, seg, pos in zip(tokens, segment_ids, positions):
        x = p['embed']['embedding'][row]
        for i in range(cfg.num_layers):
            layer = p['layers'][str(i)]
            if cfg.parallel_block:
                h = np_rms_norm(x, layer['norm']['scale'], cfg.norm_eps)
                x = x + attention(h, layer['attn'], pos, seg) + np_swiglu(h, **layer['ffn'])
            else:
                h = np_rms_norm(x, layer['attn_norm']['scale'], cfg.norm_eps)
                x = x + attention(h, layer['attn'], pos, seg)
                x = x + np_swiglu(np_rms_norm(x, layer['ffn_norm']['scale'], cfg.norm_eps), **layer['ffn'])
        x = np_rms_norm(x, p['final_norm']['scale'], cfg.norm_eps)
        if cfg.tie_embeddings:
            out.append(x @ p['embed']['embedding'].T)
        else:
            out.append(x @ p['unembed']['kernel'])
    return np.stack(out)


def packed_batch(cfg, seed=1):
    """Two rows: one packs three documents (with padding), the other is one document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0],
                            [1] * 12], np.int32)
    positions = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 0],
                          list(range(12))], np.int32)
    return tokens, segment_ids, positions


# ---------------------------------------------------------------------------------------
# Numerics against the reference.

@pytest.mark.parametrize('parallel_block', [True, False], ids=['parallel', 'sequential'])
@pytest.mark.parametrize('tie_embeddings', [False, True], ids=['untied', 'tied'])
def test_matches_numpy_reference(parallel_block, tie_embeddings):
    cfg = small_config(parallel_block=parallel_block, tie_embeddings=tie_embeddings)
    graphdef, params = randomized(build_model(cfg))
    tokens, segment_ids, positions = packed_batch(cfg)
    got = forward(graphdef, params, tokens, segment_ids, positions)
    want = np_forward(params, tokens, segment_ids, positions, cfg)
    assert got.dtype == np.float32 and got.shape == (2, 12, cfg.vocab_size)
    # Logits are O(1) with the redrawn weights, so a mistake shows far above this tolerance.
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_default_segments_and_positions_are_one_document():
    cfg = small_config()
    graphdef, params = randomized(build_model(cfg))
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    ones = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(9, dtype=np.int32), tokens.shape)
    got = np.asarray(jax.jit(lambda p, t: merge_params(graphdef, p)(t))(params, tokens))
    np.testing.assert_allclose(got, np_forward(params, tokens, ones, positions, cfg),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('parallel_block', [True, False], ids=['parallel', 'sequential'])
def test_bfloat16_compute_stays_close(parallel_block):
    cfg = small_config(dtype='bfloat16', parallel_block=parallel_block)
    model = build_model(cfg)
    graphdef, params = randomized(model)
    # Weights stay float32 whatever the compute dtype; the logits come back in float32.
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(split_params(model)[1]))
    tokens, segment_ids, positions = packed_batch(cfg)
    got = forward(graphdef, params, tokens, segment_ids, positions)
    want = np_forward(params, tokens, segment_ids, positions, cfg)
    assert got.dtype == np.float32
    # bfloat16 has an 8-bit mantissa: expect percent-level error, not a different function.
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.05 * scale
    assert not np.allclose(got, want, rtol=1e-5, atol=1e-5), 'bfloat16 compute was not used'


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_parameters_are_float32(dtype):
    _, params = split_params(build_model(small_config(dtype=dtype)))
    for path, value in flatten(params).items():
        assert value.dtype == jnp.float32, path


# ---------------------------------------------------------------------------------------
# Causality and packing.

@pytest.mark.parametrize('parallel_block', [True, False], ids=['parallel', 'sequential'])
def test_causality(parallel_block):
    cfg = small_config(parallel_block=parallel_block)
    graphdef, params = randomized(build_model(cfg))
    length = 10
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, length)).astype(np.int32)
    run = jax.jit(lambda t: merge_params(graphdef, params)(t))
    base = np.asarray(run(tokens))
    for t in (0, 4, length - 1):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        logits = np.asarray(run(changed))
        # Masked scores are exactly zero after softmax, so the past is bit-for-bit unchanged.
        np.testing.assert_array_equal(logits[:, :t], base[:, :t])
        moved = np.abs(logits[:, t:] - base[:, t:]).max(axis=-1)  # [B, T - t]
        assert (moved > 1e-6).all(), f'token {t} did not reach every later position: {moved}'


@pytest.mark.parametrize('parallel_block', [True, False], ids=['parallel', 'sequential'])
def test_packed_document_equals_document_alone(parallel_block):
    cfg = small_config(parallel_block=parallel_block)
    graphdef, params = randomized(build_model(cfg))
    rng = np.random.default_rng(4)
    doc1 = rng.integers(0, cfg.vocab_size, 5).astype(np.int32)
    doc2 = rng.integers(0, cfg.vocab_size, 7).astype(np.int32)
    packed = np.concatenate([doc1, doc2])[None]
    segment_ids = np.array([[1] * 5 + [2] * 7], np.int32)
    positions = np.array([list(range(5)) + list(range(7))], np.int32)
    together = forward(graphdef, params, packed, segment_ids, positions)

    alone = forward(graphdef, params, doc2[None], np.ones((1, 7), np.int32),
                    np.arange(7, dtype=np.int32)[None])
    np.testing.assert_allclose(together[:, 5:], alone, rtol=1e-5, atol=1e-5)
    doc1_alone = forward(graphdef, params, doc1[None], np.ones((1, 5), np.int32),
                         np.arange(5, dtype=np.int32)[None])
    np.testing.assert_allclose(together[:, :5], doc1_alone, rtol=1e-5, atol=1e-5)

    # Another first document (even at every position) must not leak into the second.
    other = packed.copy()
    other[0, :5] = (other[0, :5] + 7) % cfg.vocab_size
    changed = forward(graphdef, params, other, segment_ids, positions)
    np.testing.assert_array_equal(changed[:, 5:], together[:, 5:])
    assert not np.allclose(changed[:, :5], together[:, :5])


# ---------------------------------------------------------------------------------------
# Parameter naming contract (docs/checkpoint_format.md).

def expected_layout(cfg):
    """Path -> (shape, logical axis names), written from the documented contract."""
    d, h, k, dh, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                         cfg.d_ff, cfg.vocab_size)
    layout = {'embed/embedding': ((v, d), ('vocab', 'embed')),
              'final_norm/scale': ((d,), ('norm',))}
    if not cfg.tie_embeddings:
        layout['unembed/kernel'] = ((d, v), ('embed', 'vocab'))
    norms = ['norm'] if cfg.parallel_block else ['attn_norm', 'ffn_norm']
    for i in range(cfg.num_layers):
        prefix = f'layers/{i}/'
        for norm in norms:
            layout[prefix + f'{norm}/scale'] = ((d,), ('norm',))
        layout.update({
            prefix + 'attn/wq': ((d, h, dh), ('embed', 'q_heads', 'head_dim')),
            prefix + 'attn/wk': ((d, k, dh), ('embed', 'kv_heads', 'head_dim')),
            prefix + 'attn/wv': ((d, k, dh), ('embed', 'kv_heads', 'head_dim')),
            prefix + 'attn/wo': ((h, dh, d), ('q_heads', 'head_dim', 'embed')),
            prefix + 'ffn/wi_gate': ((d, f), ('embed', 'mlp')),
            prefix + 'ffn/wi_up': ((d, f), ('embed', 'mlp')),
            prefix + 'ffn/wo': ((f, d), ('mlp', 'embed')),
        })
    return layout


def all_keys_are_strings(tree):
    if not isinstance(tree, dict):
        return True
    return all(isinstance(k, str) and all_keys_are_strings(v) for k, v in tree.items())


@pytest.mark.parametrize('parallel_block', [True, False], ids=['parallel', 'sequential'])
@pytest.mark.parametrize('tie_embeddings', [False, True], ids=['untied', 'tied'])
def test_parameter_paths_shapes_and_logical_names(parallel_block, tie_embeddings):
    cfg = small_config(num_layers=3, parallel_block=parallel_block, tie_embeddings=tie_embeddings)
    model = build_model(cfg)
    _, params = split_params(model)
    names = param_logical_names(model)
    assert all_keys_are_strings(params) and all_keys_are_strings(names)

    want = expected_layout(cfg)
    flat, flat_names = flatten(params), flatten(names)
    assert sorted(flat) == sorted(want)
    assert sorted(flat_names) == sorted(want)
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for path, (shape, axes) in want.items():
        assert flat[path].shape == shape, path
        assert len(flat_names[path]) == flat[path].ndim, path
        assert set(flat_names[path]) <= known, path
        assert flat_names[path] == axes, path


def test_abstract_model_has_names_and_no_arrays():
    cfg = small_config()
    model = abstract_model(cfg)
    _, params = split_params(model)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params))
    flat = flatten(param_logical_names(model))
    assert sorted(flat) == sorted(expected_layout(cfg))


def test_merge_params_uses_the_given_weights():
    cfg = small_config()
    graphdef, params = randomized(build_model(cfg))
    tokens = np.arange(6, dtype=np.int32)[None]
    before = forward(graphdef, params, tokens)
    params['layers']['1']['ffn']['wo'] = params['layers']['1']['ffn']['wo'] * 2
    assert not np.allclose(forward(graphdef, params, tokens), before)


# ---------------------------------------------------------------------------------------
# Configs and model sizes.

def closed_form_count(cfg):
    """Parameters of the dense LM, counted from its equations."""
    d, h, k, dh, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                         cfg.d_ff, cfg.vocab_size)
    attn = d * h * dh * 2 + d * k * dh * 2
    ffn = 3 * d * f
    norms = d if cfg.parallel_block else 2 * d
    embeddings = v * d * (1 if cfg.tie_embeddings else 2)
    return embeddings + d + cfg.num_layers * (attn + ffn + norms)


@pytest.mark.parametrize('gin_file, target', [
    ('gin/models/tiny.gin', 1.0e6),
    ('gin/models/small_590m.gin', 590e6),
    ('gin/models/large_2b.gin', 2.0e9),
])
def test_gin_model_sizes(gin_file, target, request):
    gin.parse_config_file(str(request.config.rootpath / gin_file))
    cfg = ModelConfig()
    n = count_params(abstract_model(cfg))
    assert n == closed_form_count(cfg)
    tolerance = 0.15 if 'tiny' in gin_file else 0.03  # "about 1M" for tiny; 3% for the paper sizes
    assert abs(n - target) <= tolerance * target, f'{gin_file}: {n:,} parameters'


def test_gin_large_uses_gqa_and_tied_embeddings(request):
    gin.parse_config_file(str(request.config.rootpath / 'gin/models/large_2b.gin'))
    cfg = ModelConfig()
    assert cfg.tie_embeddings and cfg.resolved_head_dim == 128
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.num_kv_heads < cfg.num_heads
    assert 'unembed' not in split_params(abstract_model(cfg))[1]


@pytest.mark.parametrize('bad, message', [
    (dict(num_heads=6, num_kv_heads=4), 'multiple of num_kv_heads'),
    (dict(num_heads=4, num_kv_heads=3), 'multiple of num_kv_heads'),
    (dict(d_model=30, num_heads=4, num_kv_heads=4, head_dim=0), 'not divisible'),
    (dict(head_dim=7), 'even'),
    (dict(dtype='float33'), 'not a dtype'),
])
def test_bad_config_raises(bad, message):
    with pytest.raises(BamJaxError, match=message):
        small_config(**bad)


def test_config_round_trips_through_dict():
    cfg = small_config(parallel_block=False, tie_embeddings=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BamJaxError, match='unknown'):
        ModelConfig.from_dict({**cfg.to_dict(), 'num_experts': 4})
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(ModelConfig)}
