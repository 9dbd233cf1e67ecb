"""Routed FFN experts against independent references: hand-made capacity and drop cases, a
numpy loop over tokens and experts, a dense SwiGLU copied into every expert, expert
splitting, expert parallelism on the emulated 8-device mesh, and sampled routing."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bam_jax.models import ModelConfig, abstract_model, param_shardings
from bam_jax.models.config import MoEConfig
from bam_jax.models.layers import SwiGLU
from bam_jax.models.moe import (
    MoEFeedForward,
    assign_slots,
    dense_experts,
    dispatch_group,
    dropless_group,
    expert_capacity,
)
from bam_jax.models.routing import call_with_aux, combine_weights, route, router_aux
from bam_jax.models.sublayer import Context
from bam_jax.parallel import MeshConfig, create_mesh

import references
from helpers import numpy_layer, random_x, routed_ffn_params
from references import np_softmax, np_swiglu

D, F = 8, 16


def layer_config(moe, d_ff=F):
    return ModelConfig(vocab_size=16, d_model=D, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=d_ff,
                       dtype='float32', moe=moe)


def make_layer(moe, *, seed=0, router_scale=1.0):
    """(graphdef, params, config) of a MoEFeedForward with numpy-drawn unit-scale weights."""
    cfg = layer_config(moe)
    e, f = cfg.moe.num_routed_experts, cfg.d_ff // cfg.moe.expert_split
    graphdef, params = numpy_layer(lambda rngs: MoEFeedForward(cfg, rngs=rngs),
                                   lambda _: routed_ffn_params(D, f, e, seed=seed, router_scale=router_scale))
    return graphdef, params, cfg


def with_graphdef(moe):
    """The graphdef for another MoEConfig (same shapes), to run the same weights differently."""
    graphdef, _, _ = make_layer(moe)
    return graphdef


def apply_fn(graphdef, *, train=False):
    """params, x[, rng] -> (y, aux) for one layer call."""
    def fn(params, x, rng=None):
        layer = nnx.merge(graphdef, params)
        (y, _), aux = call_with_aux(layer, x, Context(None, None, None, train=train, rng=rng))
        return y, aux['']
    return fn


def reference_fn(moe, *, train=False):
    """params, x[, rng] -> (y, aux) like apply_fn, from the public pure functions: the layer's
    computation for soft routing whatever moe.routing is (every expert on every token, weighted by
    the gates; no capacity, so nothing is dropped)."""
    num_experts = moe.num_routed_experts

    def fn(params, x, rng=None):
        x = x.astype(jnp.float32)  # the compute dtype of layer_config
        kernel = params['router']['kernel'].astype(jnp.float32)
        logits = jnp.einsum('...d,de->...e', x, kernel)  # the router: float32
        index, gate, probs = route(logits, moe, rng if train else None)
        combine = combine_weights(index, gate, num_experts)
        weights = (params['experts'][n].astype(jnp.float32) for n in ('wi_gate', 'wi_up', 'wo'))
        y = dense_experts(x.reshape(-1, x.shape[-1]), combine.reshape(-1, num_experts), *weights)
        return y.reshape(x.shape), router_aux(logits, probs, index, moe, 0.0)
    return fn


# ---------------------------------------------------------------------------------------
# numpy references (float64), written from the definitions

def np_params(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def np_expert(x, p, e):
    """SwiGLU expert e on rows x [n, D]."""
    return np_swiglu(x, *(p['experts'][n][e] for n in ('wi_gate', 'wi_up', 'wo')))


def np_route(x, p, moe):
    """Top-k (sample_top1 in evaluation: top-1) routing of rows x [n, D]: (index [n, K], gate [n, K])."""
    logits = x @ p['router']['kernel']
    k = 1 if moe.routing == 'sample_top1' else moe.top_k
    index = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
    if moe.gate == 'renormalize':
        gate = np_softmax(np.take_along_axis(logits, index, -1))
    else:
        gate = np.take_along_axis(np_softmax(logits), index, -1)
    return index, gate


def np_moe(x, index, gate, p, capacity=None):
    """One dispatch group, token by token. x: [n, D]; index, gate: [n, K].

    Capacity rule: expert e accepts at most `capacity` assignments, taken first choices
    (token order) before second choices (token order), and so on; the rest are dropped.
    """
    n, k = index.shape
    counts = {}
    keep = np.zeros((n, k), bool)
    for j in range(k):
        for t in range(n):
            e = int(index[t, j])
            if capacity is None or counts.get(e, 0) < capacity:
                keep[t, j] = True
                counts[e] = counts.get(e, 0) + 1
    y = np.zeros((n, x.shape[-1]))
    for t in range(n):
        for j in range(k):
            if keep[t, j]:
                y[t] += gate[t, j] * np_expert(x[t:t + 1], p, int(index[t, j]))[0]
    return y, keep


def np_layer(x, params, moe, capacity_factor=None, groups=1):
    """The routed layer on x [B, T, D], the batch cut into `groups` dispatch groups of whole rows.

    capacity_factor None: no capacity. Returns (y [B, T, D], keep [B, T, K]).
    """
    p = np_params(params)
    b, t, d = x.shape
    ys, keeps = [], []
    for xg in np.split(np.asarray(x, np.float64), groups):
        rows = xg.reshape(-1, d)
        index, gate = np_route(rows, p, moe)
        capacity = None
        if capacity_factor is not None:
            capacity = max(1, math.ceil(capacity_factor * rows.shape[0] * index.shape[1] / moe.num_routed_experts))
        y, keep = np_moe(rows, index, gate, p, capacity)
        ys.append(y.reshape(xg.shape))
        keeps.append(keep.reshape(xg.shape[:2] + (-1,)))
    return np.concatenate(ys), np.concatenate(keeps)


close = functools.partial(references.close, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------
# Capacity and drops on hand-made routings: 6 tokens, 2 experts.

def test_expert_capacity():
    assert expert_capacity(6, 2, 1, 0.6) == 2      # ceil(1.8)
    assert expert_capacity(6, 2, 2, 0.5) == 3      # 3 exactly
    assert expert_capacity(16, 4, 2, 1.25) == 10   # ceil(10.0)
    assert expert_capacity(4, 8, 1, 0.1) == 1      # at least one slot


# k=1, capacity 2. Expert 0 fills with tokens 0, 1 (token 3 dropped); expert 1 with tokens 2, 4
# (token 5 dropped). Slots: expert * capacity + position; the overflow slot is 2 * 2 = 4.
K1_INDEX = [[0], [0], [1], [0], [1], [1]]
K1_KEEP = [[True], [True], [True], [False], [True], [False]]
K1_SLOT = [[0], [1], [2], [4], [3], [4]]

# k=2, capacity 3. First choices in token order: expert 0 <- tokens 0, 1, 3 (full; token 5's
# first choice dropped), expert 1 <- tokens 2, 4. Then second choices in token order: token 0's
# goes to expert 1 (its third slot, kept although token 5's first choice was dropped), after
# which both experts are full and every other second choice is dropped. Overflow slot: 6.
K2_INDEX = [[0, 1], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1]]
K2_KEEP = [[True, True], [True, False], [True, False], [True, False], [True, False], [False, False]]
K2_SLOT = [[0, 5], [1, 6], [3, 6], [2, 6], [4, 6], [6, 6]]


@pytest.mark.parametrize('index, capacity, keep, slot', [
    (K1_INDEX, 2, K1_KEEP, K1_SLOT),
    (K2_INDEX, 3, K2_KEEP, K2_SLOT),
], ids=['k1', 'k2'])
def test_assign_slots_by_hand(index, capacity, keep, slot):
    got_slot, got_keep = assign_slots(jnp.asarray(index, jnp.int32), 2, capacity)
    np.testing.assert_array_equal(np.asarray(got_keep), keep)
    np.testing.assert_array_equal(np.asarray(got_slot), slot)


@pytest.mark.parametrize('index, factor, keep', [
    (K1_INDEX, 0.6, K1_KEEP),   # capacity ceil(0.6 * 6 * 1 / 2) = 2
    (K2_INDEX, 0.5, K2_KEEP),   # capacity ceil(0.5 * 6 * 2 / 2) = 3
], ids=['k1', 'k2'])
def test_dispatch_group_drops_by_hand(index, factor, keep):
    """[2, 3] tokens are one group in row-major order; a dropped assignment adds exactly nothing."""
    _, params, _ = make_layer(MoEConfig(num_experts=2, top_k=len(index[0])))
    index = np.asarray(index)
    keep = np.asarray(keep)
    gate = np.random.default_rng(2).uniform(0.2, 1.0, index.shape)
    x = random_x((2, 3, D))
    weights = tuple(params['experts'][n] for n in ('wi_gate', 'wi_up', 'wo'))
    run = jax.jit(functools.partial(dispatch_group, num_experts=2, capacity_factor=factor))
    y, got_keep = run(x, jnp.asarray(index.reshape(2, 3, -1), jnp.int32),
                      jnp.asarray(gate.reshape(2, 3, -1), jnp.float32), weights)
    np.testing.assert_array_equal(np.asarray(got_keep).reshape(6, -1), keep)
    # Reference: the hand-made keep applied token by token.
    p = np_params(params)
    rows = np.asarray(x, np.float64).reshape(6, D)
    want = np.zeros((6, D))
    for t in range(6):
        for j in range(index.shape[1]):
            if keep[t, j]:
                want[t] += gate[t, j] * np_expert(rows[t:t + 1], p, index[t, j])[0]
    y = np.asarray(y).reshape(6, D)
    close(y, want)
    fully_dropped = ~keep.any(-1)
    assert fully_dropped.any()
    assert np.all(y[fully_dropped] == 0.0)  # exactly zero: the token passes on the residual alone
    # The numpy loop's capacity rule gives the same answer as the hand-made one.
    capacity = expert_capacity(6, 2, index.shape[1], factor)
    close(np_moe(rows, index, gate, p, capacity)[0], want, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(np_moe(rows, index, gate, p, capacity)[1], keep)


def test_layer_drops_pass_through_and_counts():
    """A router set by hand routes [2, 3] tokens as K1_INDEX. Training (capacity factor 0.6:
    2 slots) drops tokens 3 and 5, whose output is exactly zero; evaluation is dropless and
    keeps everything."""
    moe = MoEConfig(num_experts=2, top_k=1, capacity_factor_train=0.6)
    graphdef, params, _ = make_layer(moe)
    kernel = np.zeros((D, 2), np.float32)
    kernel[0, 0] = kernel[1, 1] = 1.0  # logit e = x[..., e]
    params['router']['kernel'] = jnp.asarray(kernel)
    x = np.random.default_rng(3).normal(size=(6, D)).astype(np.float32)
    chosen = np.asarray(K1_INDEX)[:, 0]
    x[:, 0] = np.where(chosen == 0, 1.0, -1.0) * np.linspace(0.5, 2.0, 6)
    x[:, 1] = -x[:, 0]
    x = jnp.asarray(x.reshape(2, 3, D))

    p = np_params(params)
    index, gate = np_route(np.asarray(x, np.float64).reshape(6, D), p, moe)
    np.testing.assert_array_equal(index, K1_INDEX)
    full = np.stack([gate[t, 0] * np_expert(np.asarray(x, np.float64).reshape(6, D)[t:t + 1], p, index[t, 0])[0]
                     for t in range(6)])

    y, aux = jax.jit(apply_fn(graphdef, train=True))(params, x)
    y = np.asarray(y).reshape(6, D)
    kept = np.asarray(K1_KEEP)[:, 0]
    assert np.all(y[~kept] == 0.0)
    close(y[kept], full[kept])
    close(aux['dropped_fraction'], 2 / 6, rtol=1e-6)
    close(aux['load'], [0.5, 0.5], rtol=1e-6)  # the router's choice, before capacity

    y, aux = jax.jit(apply_fn(graphdef))(params, x)
    close(np.asarray(y).reshape(6, D), full)
    assert float(aux['dropped_fraction']) == 0.0


@pytest.mark.parametrize('factor', [2.0, 0.5], ids=['ample', 'tight'])
def test_dispatch_group_equals_numpy_loop(factor):
    """Random distinct top-2 choices of 4 experts for [2, 8] tokens (one group); capacity
    ceil(factor * 16 * 2 / 4): 16 (nothing dropped) or 4 (drops)."""
    e, k = 4, 2
    _, params, _ = make_layer(MoEConfig(num_experts=e, top_k=k), seed=4)
    rng = np.random.default_rng(5)
    index = np.argsort(rng.normal(size=(16, e)), axis=-1)[:, :k]
    gate = rng.uniform(0.1, 1.0, (16, k))
    x = random_x((2, 8, D), seed=6)
    weights = tuple(params['experts'][n] for n in ('wi_gate', 'wi_up', 'wo'))
    run = jax.jit(functools.partial(dispatch_group, num_experts=e, capacity_factor=factor))
    y, keep = run(x, jnp.asarray(index.reshape(2, 8, k), jnp.int32), jnp.asarray(gate.reshape(2, 8, k), jnp.float32),
                  weights)
    capacity = math.ceil(factor * 16 * k / e)
    want, want_keep = np_moe(np.asarray(x, np.float64).reshape(16, D), index, gate, np_params(params),
                             capacity)
    np.testing.assert_array_equal(np.asarray(keep).reshape(16, k), want_keep)
    close(np.asarray(y).reshape(16, D), want)
    if factor < 1:
        assert 0 < want_keep.sum() < want_keep.size
        assert np.bincount(index[want_keep], minlength=e).max() == capacity
    else:
        assert want_keep.all()


@pytest.mark.parametrize('shape', [(1, 2), (2, 8)], ids=['chosen-weights', 'grouped-matmul'])
def test_dropless_group_equals_numpy_loop(shape):
    """Random distinct top-2 choices of 4 experts, no capacity: 4 assignments (no more than the
    experts: each one's expert weights gathered) or 32 (sorted, one grouped matmul)."""
    e, k = 4, 2
    n = shape[0] * shape[1]
    _, params, _ = make_layer(MoEConfig(num_experts=e, top_k=k), seed=4)
    rng = np.random.default_rng(5)
    index = np.argsort(rng.normal(size=(n, e)), axis=-1)[:, :k]
    gate = rng.uniform(0.1, 1.0, (n, k))
    x = random_x((*shape, D), seed=6)
    weights = tuple(params['experts'][name] for name in ('wi_gate', 'wi_up', 'wo'))
    y = jax.jit(dropless_group)(x, jnp.asarray(index.reshape(*shape, k), jnp.int32),
                                jnp.asarray(gate.reshape(*shape, k), jnp.float32), weights)
    want, keep = np_moe(np.asarray(x, np.float64).reshape(n, D), index, gate, np_params(params))
    assert keep.all()
    close(np.asarray(y).reshape(n, D), want)


# ---------------------------------------------------------------------------------------
# Identical experts are the dense FFN; expert splitting.

@pytest.mark.parametrize('moe', [
    MoEConfig(num_experts=4, routing='soft'),
    MoEConfig(num_experts=4, routing='top_k', top_k=2, gate='renormalize'),
], ids=['soft', 'top2-renormalize'])
def test_identical_experts_equal_dense_swiglu(moe):
    """Gates that sum to one over copies of one SwiGLU give exactly that SwiGLU."""
    graphdef, params, cfg = make_layer(moe, seed=7)
    dense = nnx.eval_shape(lambda: SwiGLU(cfg, rngs=nnx.Rngs(0)))
    dense_def, _ = nnx.split(dense, nnx.Param)
    rng = np.random.default_rng(8)
    w = {'wi_gate': rng.normal(0, D ** -0.5, (D, F)), 'wi_up': rng.normal(0, D ** -0.5, (D, F)),
         'wo': rng.normal(0, F ** -0.5, (F, D))}
    w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), w)
    params['experts'] = {n: jnp.broadcast_to(a, (4,) + a.shape) for n, a in w.items()}
    x = random_x((2, 8, D), seed=9)
    want = jax.jit(lambda p, x: nnx.merge(dense_def, p)(x)[0])(w, x)
    y, aux = jax.jit(apply_fn(graphdef))(params, x)
    close(y, want, rtol=1e-5, atol=1e-6)
    assert float(aux['dropped_fraction']) == 0.0
    assert np.abs(np.asarray(want)).max() > 0.1  # not trivially small
    # And the dense SwiGLU itself against numpy.
    close(want, np_swiglu(np.asarray(x, np.float64), **np_params(w)))


def test_expert_split():
    """expert_split=2 of 2 experts: 4 routed experts of d_ff / 2 hidden units."""
    moe = MoEConfig(num_experts=2, expert_split=2, top_k=2)
    graphdef, params, cfg = make_layer(moe, seed=10)
    layer = nnx.eval_shape(lambda: MoEFeedForward(cfg, rngs=nnx.Rngs(0)))
    assert layer.num_experts == 4
    assert layer.router.kernel.shape == (D, 4)
    assert layer.experts.wi_gate.shape == (4, D, F // 2)
    assert layer.experts.wi_up.shape == (4, D, F // 2)
    assert layer.experts.wo.shape == (4, F // 2, D)

    x = random_x((2, 8, D), seed=11)
    y, aux = jax.jit(apply_fn(graphdef))(params, x)
    y_ref, _ = jax.jit(reference_fn(moe))(params, x)
    assert y.shape == x.shape and aux['load'].shape == (4,)
    close(y, y_ref, rtol=1e-5, atol=1e-6)
    close(y, np_layer(x, params, moe)[0])
    assert float(aux['dropped_fraction']) == 0.0


# ---------------------------------------------------------------------------------------
# Expert parallelism: the shard_map dispatch on the 8-device mesh equals one device.

B, T, EP_EXPERTS = 8, 4, 8


@pytest.mark.parametrize('layout', [
    dict(data=2, fsdp=1, expert=4, tensor=1),
    dict(data=1, fsdp=2, expert=2, tensor=2),
], ids=['dp2-ep4', 'fsdp2-ep2-tp2'])
def test_expert_parallel_equals_single_device(layout):
    mesh = create_mesh(MeshConfig(**layout))
    groups = layout['data'] * layout['fsdp'] * layout['expert']
    ample = MoEConfig(num_experts=EP_EXPERTS, top_k=2, capacity_factor_train=float(EP_EXPERTS))
    tight = MoEConfig(num_experts=EP_EXPERTS, top_k=2, capacity_factor_train=0.5)
    graphdef, params, cfg = make_layer(ample, seed=12)
    x = random_x((B, T, D), seed=13)
    ct = random_x((B, T, D), seed=14)  # a cotangent for the outputs

    def loss_fn(apply, with_aux=True):
        def fn(params, x):
            y, aux = apply(params, x)
            return jnp.sum(y * ct) + (aux['loss'] if with_aux else 0.0), (y, aux)
        return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)

    shardings = param_shardings(abstract_model(cfg), mesh)['layers']['0']['ffn']
    if layout['expert'] > 1:
        assert shardings['experts']['wi_gate'].spec[0] == 'expert'
    batch = NamedSharding(mesh, P(('data', 'fsdp', 'expert')))

    def on_mesh(fn, collectives=()):
        with jax.set_mesh(mesh):
            ps, xs = jax.device_put(params, shardings), jax.device_put(x, batch)
            compiled = jax.jit(fn).lower(ps, xs).compile()
            for op in collectives:  # the experts really were spread over devices by shard_map
                assert op in compiled.as_text(), op
            out = compiled(ps, xs)
        assert len(out[0][1][0].sharding.device_set) == 8  # y really is spread over the mesh
        return out

    spread = layout['expert'] > 1
    # Training with ample capacity: values and gradients equal the dense reference on one device.
    (loss0, (y0, aux0)), grads0 = jax.jit(loss_fn(reference_fn(ample)))(params, x)
    (loss, (y, aux)), grads = on_mesh(loss_fn(apply_fn(graphdef, train=True)),
                                      collectives=('all-to-all',) if spread else ())
    close(y, y0, rtol=1e-5, atol=1e-6)
    close(y, np_layer(x, params, ample)[0])
    close(loss, loss0, rtol=1e-5)
    assert float(aux['dropped_fraction']) == 0.0
    for name in ('load_balance', 'z_loss', 'entropy', 'load'):
        close(aux[name], aux0[name], rtol=1e-5, atol=1e-7)
    for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0)):
        assert np.abs(np.asarray(g0)).max() > 0, jax.tree_util.keystr(path)
        close(g, g0, rtol=1e-5, atol=1e-6)

    # Evaluation is dropless: the tight training config changes nothing, and each device sends
    # its assignments to the experts' devices and gets their outputs back (all_to_all).
    (_, (y, aux)), _ = on_mesh(loss_fn(apply_fn(with_graphdef(tight))),
                               collectives=('all-to-all',) if spread else ())
    close(y, y0, rtol=1e-5, atol=1e-6)
    assert float(aux['dropped_fraction']) == 0.0

    # Tight capacity: each device's share of the batch is its own dispatch group, with
    # capacity ceil(0.5 * tokens * 2 / 8) = 1 slot per expert, so tokens are dropped.
    tight_def = with_graphdef(tight)
    (_, (y, aux)), grads = on_mesh(loss_fn(apply_fn(tight_def, train=True), with_aux=False))
    want, keep = np_layer(x, params, tight, capacity_factor=0.5, groups=groups)
    assert 0 < keep.sum() < keep.size
    close(y, want)
    close(aux['dropped_fraction'], 1 - keep.mean(), rtol=1e-5)
    # The whole batch as one group would drop differently: the groups are real.
    assert not np.allclose(np_layer(x, params, tight, capacity_factor=0.5, groups=1)[0], want)
    # Gradients equal the single-device layer run group by group (no mesh: one group per call).
    rows = B // groups

    def per_group(params, x):
        run = lambda xg: apply_fn(tight_def, train=True)(params, xg)[0]  # noqa: E731
        y = jax.vmap(run)(x.reshape(groups, rows, T, D)).reshape(x.shape)
        return jnp.sum(y * ct), y

    (_, y_groups), grads0 = jax.jit(jax.value_and_grad(per_group, argnums=(0, 1), has_aux=True))(params, x)
    close(y_groups, want)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        close(g, g0, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Sampled routing.

def test_sample_top1_train_samples_and_eval_is_deterministic():
    moe = MoEConfig(num_experts=4, routing='sample_top1', capacity_factor_train=4.0)
    graphdef, params, _ = make_layer(moe, seed=15, router_scale=0.3)  # flat-ish router: samples vary
    x = random_x((4, 8, D), seed=16)
    n = 32
    evaluate = jax.jit(apply_fn(graphdef))
    train = jax.jit(apply_fn(graphdef, train=True))

    y_eval = np.asarray(evaluate(params, x)[0]).reshape(n, D)
    np.testing.assert_array_equal(np.asarray(evaluate(params, x)[0]).reshape(n, D), y_eval)
    # Evaluation ignores the key: the arg-max.
    np.testing.assert_array_equal(np.asarray(evaluate(params, x, jax.random.key(0))[0]).reshape(n, D), y_eval)
    close(y_eval, np_layer(x, params, moe)[0].reshape(n, D))

    # Training: every token gets p_e * expert_e(x) for one expert e, not always the arg-max.
    p = np_params(params)
    rows = np.asarray(x, np.float64).reshape(n, D)
    probs = np_softmax(rows @ p['router']['kernel'])
    candidates = np.stack([probs[:, e:e + 1] * np_expert(rows, p, e) for e in range(4)], axis=1)  # [n, E, D]
    y_train, aux = train(params, x, jax.random.key(0))
    y_train = np.asarray(y_train).reshape(n, D)
    assert float(aux['dropped_fraction']) == 0.0
    err = np.abs(candidates - y_train[:, None]).max(-1)  # [n, E]
    assert np.all(err.min(-1) < 1e-5)
    sampled = err.argmin(-1)
    assert np.any(sampled != probs.argmax(-1))
    assert np.any(sampled == probs.argmax(-1))
    assert len(set(sampled.tolist())) > 1
    # The same key draws the same experts; another key, others.
    np.testing.assert_array_equal(np.asarray(train(params, x, jax.random.key(0))[0]).reshape(n, D), y_train)
    assert not np.allclose(np.asarray(train(params, x, jax.random.key(1))[0]).reshape(n, D), y_train)
