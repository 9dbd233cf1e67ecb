"""Attention experts (bam_jax/models/moa.py) against independent references: the dense attention
layer with its weights copied into every expert, a naive numpy loop over experts, finite
differences, causality, the parameter contract, the routing aux and the sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bam_jax.models import (
    ModelConfig,
    abstract_model,
    flatten,
    merge_params,
    param_logical_names,
    param_shardings,
    split_params,
)
from bam_jax.models.attention_kernels import attention_mask
from bam_jax.models.config import MoAConfig, MoEConfig
from bam_jax.models.layers import Attention
from bam_jax.models.moa import MoAttention
from bam_jax.models.routing import call_with_aux
from bam_jax.models.sublayer import Context
from bam_jax.parallel import MeshConfig, batch_sharding, create_mesh

from helpers import numpy_layer, packed_rows
from references import np_attention, np_rms_norm, np_softmax

# Grouped-query attention (4 query heads over 2 K/V heads) and a head_dim != d_model // num_heads.
SMALL = dict(vocab_size=50, d_model=24, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, d_ff=40, dtype='float32')
BATCH, LENGTH = 2, 10

ROUTINGS = {
    'soft': dict(routing='soft'),
    'top1-softmax': dict(routing='top_k', top_k=1, gate='softmax'),
    'top2-renorm': dict(routing='top_k', top_k=2, gate='renormalize'),
}
VARIANTS = {'expert_kv': False, 'shared_kv': True}


def config(num_experts=3, shared_kv=False, routing='soft', moe=None, **overrides) -> ModelConfig:
    moa = MoAConfig(num_experts=num_experts, shared_kv=shared_kv, **ROUTINGS[routing])
    return ModelConfig(**{**SMALL, **overrides}, moa=moa, moe=moe)


def redraw(params, seed):
    """Every weight drawn afresh at unit-ish scale (params may be an abstract model's shapes).

    The default init makes attention near uniform and the router near constant, which would hide
    mistakes. Routers get logits of O(2).
    """
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if 'scale' in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        if 'embedding' in name:
            return jnp.asarray(rng.normal(0, 1, x.shape), jnp.float32)
        leaf = getattr(path[-1], 'key', None)
        if leaf in ('wq', 'wk', 'wv'):
            fan_in = x.shape[-3]                    # [(N,) D, H or K, Dh]
        elif leaf == 'wo' and 'ffn' not in name:
            fan_in = x.shape[-3] * x.shape[-2]      # attention: [(N,) H, Dh, D]
        else:
            fan_in = x.shape[-2]                    # FFN, FFN experts, routers, unembed
        std = fan_in ** -0.5 * (2.0 if 'router' in name else 1.0)
        return jnp.asarray(rng.normal(0, std, x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


def make_layer(cfg, seed=0):
    """(graphdef, params) of one MoAttention layer with redrawn weights."""
    return numpy_layer(lambda rngs: MoAttention(cfg, rngs=rngs), lambda shapes: redraw(shapes, seed))


def run_layer(graphdef, params, x, positions, segment_ids):
    def fn(p, x, pos, seg):
        return merge_params(graphdef, p)(x, Context(pos, attention_mask(seg), seg))[0]
    return np.asarray(jax.jit(fn)(params, x, positions, segment_ids))


def layer_inputs(cfg, seed=1):
    """x [B, T, D]; random positions (not 0..T-1) and packed segment ids with padding."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (BATCH, LENGTH, cfg.d_model)).astype(np.float32)
    positions = rng.integers(0, 40, (BATCH, LENGTH)).astype(np.int32)
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0],
                            [1, 1, 1, 1, 1, 1, 2, 2, 2, 2]], np.int32)
    return x, positions, segment_ids


# ---------------------------------------------------------------------------------------
# Plain numpy reference (float64), written from the equations (its parts: tests/references.py).

def np_gates(logits, moa):
    """Dense gates [..., N] from router logits: softmax (soft), or zero for unchosen experts."""
    probs = np_softmax(logits)
    if moa.routing == 'soft':
        return probs
    chosen = np.argsort(-logits, axis=-1)[..., :moa.top_k]
    kept = np.take_along_axis(logits, chosen, axis=-1)
    gate = np_softmax(kept) if moa.gate == 'renormalize' else np.take_along_axis(probs, chosen, axis=-1)
    gates = np.zeros_like(probs)
    np.put_along_axis(gates, chosen, gate, axis=-1)
    return gates


def np_moa(params, x, positions, segment_ids, cfg, router=None):
    """out = sum_j g_j(x) * MHA_j(x), one expert at a time. Expert j uses its own Wq, Wo and its
    own Wk, Wv (expert KV) or the shared attn/wk, attn/wv (shared KV)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    router = p['router']['kernel'] if router is None else router
    gates = np_gates(x @ router, cfg.moa)  # [B, T, N]
    ex = p['experts']
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for j in range(cfg.moa.num_experts):
            wk, wv = (p['wk'], p['wv']) if cfg.moa.shared_kv else (ex['wk'][j], ex['wv'][j])
            y = np_attention(x[b], ex['wq'][j], wk, wv, ex['wo'][j], positions[b], segment_ids[b], cfg.rope_theta)
            out[b] += gates[b, :, j, None] * y
    return out


# ---------------------------------------------------------------------------------------
# Identical experts and N = 1 reproduce the dense attention layer.

def dense_layer(cfg, seed):
    graphdef, params = split_params(nnx.eval_shape(lambda: Attention(cfg, rngs=nnx.Rngs(params=seed))))
    return graphdef, redraw(params, seed)


def moa_from_dense(dense, cfg, router):
    """MoA parameters with the dense layer's weights copied into every expert."""
    n = cfg.moa.num_experts
    stack = lambda w: jnp.stack([w] * n)  # noqa: E731
    params = {'router': {'kernel': router}, 'experts': {'wq': stack(dense['wq']), 'wo': stack(dense['wo'])}}
    if cfg.moa.shared_kv:
        params.update(wk=dense['wk'], wv=dense['wv'])
    else:
        params['experts'].update(wk=stack(dense['wk']), wv=stack(dense['wv']))
    return params


@pytest.mark.parametrize('routing', ['soft', 'top2-renorm'])
@pytest.mark.parametrize('variant', VARIANTS)
def test_identical_experts_equal_dense_attention(variant, routing):
    cfg = config(num_experts=4, shared_kv=VARIANTS[variant], routing=routing)
    dense_def, dense = dense_layer(cfg, seed=5)
    x, positions, segment_ids = layer_inputs(cfg)
    want = run_layer(dense_def, dense, x, positions, segment_ids)

    graphdef, params = make_layer(cfg, seed=6)
    router = params['router']['kernel']
    # The router really spreads the tokens: several experts win somewhere.
    assert len(np.unique(np.argmax(x @ np.asarray(router), axis=-1))) >= 3
    ours = moa_from_dense(dense, cfg, router)
    assert jax.tree.structure(ours) == jax.tree.structure(params)
    got = run_layer(graphdef, ours, x, positions, segment_ids)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('variant', VARIANTS)
def test_single_expert_equals_dense_attention(variant):
    cfg = config(num_experts=1, shared_kv=VARIANTS[variant])
    dense_def, dense = dense_layer(cfg, seed=7)
    x, positions, segment_ids = layer_inputs(cfg, seed=2)
    want = run_layer(dense_def, dense, x, positions, segment_ids)
    graphdef, params = make_layer(cfg, seed=8)
    got = run_layer(graphdef, moa_from_dense(dense, cfg, params['router']['kernel']), x, positions, segment_ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_reference_agrees_with_numpy():
    """The dense layer the two tests above compare with is itself the numpy attention."""
    cfg = config()
    dense_def, dense = dense_layer(cfg, seed=9)
    x, positions, segment_ids = layer_inputs(cfg, seed=3)
    got = run_layer(dense_def, dense, x, positions, segment_ids)
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), dense)
    want = np.stack([np_attention(x[b].astype(np.float64), w['wq'], w['wk'], w['wv'], w['wo'], positions[b],
                                  segment_ids[b], cfg.rope_theta) for b in range(BATCH)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Distinct experts against the naive per-expert loop.

@pytest.mark.parametrize('routing', ROUTINGS)
@pytest.mark.parametrize('variant', VARIANTS)
def test_matches_per_expert_loop(variant, routing):
    cfg = config(num_experts=3, shared_kv=VARIANTS[variant], routing=routing)
    graphdef, params = make_layer(cfg, seed=11)
    x, positions, segment_ids = layer_inputs(cfg, seed=4)
    got = run_layer(graphdef, params, x, positions, segment_ids)
    want = np_moa(params, x, positions, segment_ids, cfg)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # The experts differ, so the routing matters: uniform gates give another answer.
    uniform = np.zeros_like(np.asarray(params['router']['kernel'], np.float64))
    if routing == 'soft':
        assert not np.allclose(got, np_moa(params, x, positions, segment_ids, cfg, router=uniform), atol=1e-3)


@pytest.mark.parametrize('variant', VARIANTS)
def test_router_gradient(variant):
    """Soft routing: the router gets a finite, non-zero gradient that matches a central finite
    difference of the numpy reference along a random direction."""
    cfg = config(num_experts=3, shared_kv=VARIANTS[variant])
    graphdef, params = make_layer(cfg, seed=12)
    x, positions, segment_ids = layer_inputs(cfg, seed=5)
    rng = np.random.default_rng(13)
    cotangent = rng.normal(0, 1, x.shape)

    def loss(p):
        y, _ = merge_params(graphdef, p)(x, Context(positions, attention_mask(segment_ids), segment_ids))
        return jnp.sum(y * cotangent.astype(np.float32))

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in flatten(grads).items():
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, path
    g_router = np.asarray(grads['router']['kernel'], np.float64)

    direction = rng.normal(0, 1, g_router.shape)
    router = np.asarray(params['router']['kernel'], np.float64)
    eps = 1e-4

    def f(r):
        return np.sum(np_moa(params, x, positions, segment_ids, cfg, router=r) * cotangent)

    numeric = (f(router + eps * direction) - f(router - eps * direction)) / (2 * eps)
    analytic = np.sum(g_router * direction)
    assert abs(numeric) > 1e-2
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3)


# ---------------------------------------------------------------------------------------
# Whole models with attention experts: causality, parameter names, routing aux.

def model_params(cfg, seed=0):
    graphdef, params = split_params(abstract_model(cfg))
    return graphdef, redraw(params, seed)


@pytest.mark.parametrize('routing', ['soft', 'top1-softmax'])
@pytest.mark.parametrize('variant', VARIANTS)
def test_causality(variant, routing):
    cfg = config(num_experts=3, shared_kv=VARIANTS[variant], routing=routing)
    graphdef, params = model_params(cfg, seed=14)
    tokens = np.random.default_rng(15).integers(0, cfg.vocab_size, (2, LENGTH)).astype(np.int32)
    run = jax.jit(lambda t: merge_params(graphdef, params)(t))
    base = np.asarray(run(tokens))
    for t in (0, 4, LENGTH - 1):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        logits = np.asarray(run(changed))
        np.testing.assert_array_equal(logits[:, :t], base[:, :t])
        moved = np.abs(logits[:, t:] - base[:, t:]).max(axis=-1)
        assert (moved > 1e-6).all(), f'token {t} did not reach every later position: {moved}'


def expected_attn_layout(cfg):
    n, d, h, k, dh = (cfg.moa.num_experts, cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                      cfg.resolved_head_dim)
    layout = {
        'router/kernel': ((d, n), ('embed', 'route')),
        'experts/wq': ((n, d, h, dh), ('experts', 'embed', 'q_heads', 'head_dim')),
        'experts/wo': ((n, h, dh, d), ('experts', 'q_heads', 'head_dim', 'embed')),
    }
    if cfg.moa.shared_kv:
        layout['wk'] = layout['wv'] = ((d, k, dh), ('embed', 'kv_heads', 'head_dim'))
    else:
        layout['experts/wk'] = layout['experts/wv'] = ((n, d, k, dh), ('experts', 'embed', 'kv_heads', 'head_dim'))
    return layout


@pytest.mark.parametrize('variant', VARIANTS)
def test_parameter_names_and_shapes(variant):
    cfg = config(num_experts=3, shared_kv=VARIANTS[variant], num_layers=2)
    model = abstract_model(cfg)  # shapes and names without drawing weights
    flat = flatten(split_params(model)[1])
    names = flatten(param_logical_names(model))
    want = expected_attn_layout(cfg)
    for i in range(cfg.num_layers):
        prefix = f'layers/{i}/attn/'
        attn = {path[len(prefix):]: v for path, v in flat.items() if path.startswith(prefix)}
        assert sorted(attn) == sorted(want)
        for key, (shape, axes) in want.items():
            assert attn[key].shape == shape, key
            assert attn[key].dtype == jnp.float32, key
            assert names[prefix + key] == axes, key
    # The rest of the model is the dense one's.
    others = {p for p in flat if '/attn/' not in p}
    dense = flatten(split_params(abstract_model(ModelConfig(**SMALL)))[1])
    assert others == {p for p in dense if '/attn/' not in p}


@pytest.mark.parametrize('routing', ['soft', 'top2-renorm'])
def test_routing_aux_is_collected(routing):
    cfg = config(num_experts=3, routing=routing, moe=MoEConfig(num_experts=2))
    graphdef, params = model_params(cfg, seed=16)
    tokens = np.random.default_rng(17).integers(0, cfg.vocab_size, (2, LENGTH)).astype(np.int32)

    def fn(p, t):
        return call_with_aux(merge_params(graphdef, p), t)[1]

    aux = jax.jit(fn)(params, tokens)
    assert sorted(aux) == sorted(f'layers/{i}/{kind}' for i in range(cfg.num_layers) for kind in ('attn', 'ffn'))
    for key in (f'layers/{i}/attn' for i in range(cfg.num_layers)):
        load = np.asarray(aux[key]['load'])
        assert load.shape == (3,)
        np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)
        assert np.isfinite(np.asarray(aux[key]['loss']))

    # Layer 0's attention sees norm(embed(tokens)): its load and z-loss follow from the router.
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    layer = p['layers']['0']
    h = np_rms_norm(p['embed']['embedding'][tokens], layer['norm']['scale'], cfg.norm_eps)
    logits = h @ layer['attn']['router']['kernel']
    if routing == 'soft':
        load = np_softmax(logits).reshape(-1, 3).mean(0)
    else:
        chosen = np.argsort(-logits, axis=-1)[..., :2]
        load = np.bincount(chosen.reshape(-1), minlength=3) / chosen.size
    aux0 = aux['layers/0/attn']
    np.testing.assert_allclose(np.asarray(aux0['load']), load, rtol=1e-5, atol=1e-6)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(np.asarray(aux0['z_loss']), np.mean(lse ** 2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux0['loss']), cfg.moa.z_loss_weight * np.mean(lse ** 2), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Sharded == one device, on the emulated 8-device mesh.

MESH_CFG = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, dtype='float32')
MESH_BATCH, MESH_LENGTH = 8, 12


def loss_fn(graphdef):
    def fn(params, inputs, targets, segment_ids, positions):
        model = merge_params(graphdef, params)
        logits, aux = call_with_aux(model, inputs, segment_ids, positions)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        dropped = [aux['dropped_fraction'] for key, aux in aux.items() if key.endswith('ffn')]
        return nll.mean(), (logits, jnp.stack(dropped))
    return fn


@pytest.mark.parametrize('variant', VARIANTS)
def test_sharded_equals_one_device(variant):
    # Evaluation routes dropless, so the mesh and one device compute the same function.
    moe = MoEConfig(num_experts=4, top_k=2, gate='renormalize')
    moa = MoAConfig(num_experts=4, shared_kv=VARIANTS[variant])
    cfg = ModelConfig(**MESH_CFG, moa=moa, moe=moe)
    graphdef, params = split_params(abstract_model(cfg))
    params = redraw(params, 3)
    batch = packed_rows(cfg.vocab_size, MESH_BATCH, MESH_LENGTH)
    grad_fn = jax.value_and_grad(loss_fn(graphdef), has_aux=True)

    (loss0, (logits0, dropped0)), grads0 = jax.jit(grad_fn)(params, *batch)

    mesh = create_mesh(MeshConfig(data=2, fsdp=1, expert=2, tensor=2))
    shardings = param_shardings(abstract_model(cfg), mesh)
    sharded = jax.device_put(params, shardings)
    attn = sharded['layers']['0']['attn']
    # Experts over 'expert' and query heads over 'tensor': each device holds 2 experts x 2 heads.
    assert {s.data.shape[:3:2] for s in attn['experts']['wq'].addressable_shards} == {(2, 2)}
    assert not attn['experts']['wo'].sharding.is_fully_replicated
    sharded_batch = [jax.device_put(x, batch_sharding(mesh)) for x in batch]
    with jax.set_mesh(mesh):
        (loss, (logits, dropped)), grads = jax.jit(grad_fn)(sharded, *sharded_batch)
    assert len(logits.sharding.device_set) == 8

    # (1 - mean(keep) may round to -3e-8 rather than 0.)
    assert np.abs(np.asarray(dropped0)).max() < 1e-6 and np.abs(np.asarray(dropped)).max() < 1e-6
    np.testing.assert_allclose(np.asarray(loss), np.asarray(loss0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits0), rtol=1e-5, atol=1e-5)
    flat, flat0 = flatten(grads), flatten(grads0)
    assert sorted(flat) == sorted(flat0)
    for path, g0 in flat0.items():
        g0 = np.asarray(g0)
        assert np.abs(g0).max() > 0, path
        np.testing.assert_allclose(np.asarray(flat[path]), g0, rtol=1e-4, atol=1e-6 * np.abs(g0).max(),
                                   err_msg=path)
