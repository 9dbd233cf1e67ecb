"""Dropless routed experts in training (MoEConfig.dropless): values and gradients equal the dense
reference with the same top-k gates, on one device and with the experts spread over the mesh
axis `expert`, also when one expert receives every token's first choice; the send buffers'
layout by hand; and a backward pass without scatters."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bam_jax.models import ModelConfig, abstract_model, param_shardings
from bam_jax.models.config import MoEConfig
from bam_jax.models.dropless import dropless_group, send_slots, take
from bam_jax.models.flops import train_flops_per_token
from bam_jax.models.moe import MoEFeedForward, dense_experts
from bam_jax.models.routing import call_with_aux, combine_weights, route, router_aux
from bam_jax.models.sublayer import Context
from bam_jax.parallel import MeshConfig, create_mesh

import references
from helpers import numpy_layer, random_x, routed_ffn_params

D, F, E = 8, 16, 8
B, T = 8, 4
close = functools.partial(references.close, rtol=1e-5, atol=1e-6)


def layer_config(moe):
    return ModelConfig(vocab_size=16, d_model=D, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=F,
                       dtype='float32', moe=moe)


def make_layer(moe, *, unbalanced=False):
    """(graphdef, params, config); unbalanced: expert 0's logit is ~4.5 for inputs from skewed_x,
    the others' ~N(0, 1), so expert 0 is every token's first choice (top-1: all assignments on it;
    top-2: half)."""
    cfg = layer_config(moe)

    def draw(_):
        params = routed_ffn_params(D, F, E, seed=0, router_scale=0.3)
        if unbalanced:
            params['router']['kernel'] = params['router']['kernel'].at[0, 0].set(1.5)
        return params

    graphdef, params = numpy_layer(lambda rngs: MoEFeedForward(cfg, rngs=rngs), draw)
    return graphdef, params, cfg


def skewed_x(seed):
    x = np.random.default_rng(seed).normal(size=(B, T, D))
    x[..., 0] += 3.0
    return jnp.asarray(x, jnp.float32)


def layer_loss(graphdef, ct):
    """params, x -> (sum(y * ct) + aux loss, (y, aux)) of one training call of the layer."""
    def fn(params, x):
        (y, _), aux = call_with_aux(nnx.merge(graphdef, params), x, Context(None, None, None, train=True))
        return jnp.sum(y * ct) + aux['']['loss'], (y, aux[''])
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)


def reference_loss(moe, ct):
    """layer_loss of the dense reference: every expert on every token, weighted by the top-k gates."""
    def fn(params, x):
        logits = jnp.einsum('...d,de->...e', x, params['router']['kernel'])
        index, gate, probs = route(logits, moe)
        combine = combine_weights(index, gate, E).reshape(-1, E)
        weights = (params['experts'][n] for n in ('wi_gate', 'wi_up', 'wo'))
        y = dense_experts(x.reshape(-1, D), combine, *weights).reshape(x.shape)
        aux = router_aux(logits, probs, index, moe, 0.0)
        return jnp.sum(y * ct) + aux['loss'], (y, aux)
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)


def check_equal(got, want):
    (loss, (y, aux)), grads = got
    (loss0, (y0, aux0)), grads0 = want
    assert float(aux['dropped_fraction']) == 0.0
    close(y, y0)
    close(loss, loss0)
    close(aux['load'], aux0['load'])
    # x, the router kernel and the three expert weights.
    for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0)):
        assert np.abs(np.asarray(g0)).max() > 0, jax.tree_util.keystr(path)
        close(g, g0)


CASES = {'top1': (1, False), 'top2': (2, False), 'top2-unbalanced': (2, True), 'top1-unbalanced': (1, True)}


def case(name):
    """(moe, graphdef, params, x, ct, reference value-and-grad output) of a CASES entry."""
    k, unbalanced = CASES[name]
    moe = MoEConfig(num_experts=E, top_k=k, dropless=True)
    graphdef, params, _ = make_layer(moe, unbalanced=unbalanced)
    x = skewed_x(1) if unbalanced else random_x((B, T, D), seed=1)
    ct = random_x((B, T, D), seed=2)
    want = jax.jit(reference_loss(moe, ct))(params, x)
    if unbalanced:  # expert 0 takes most first choices: the capacity path would drop
        load = np.asarray(want[0][1][1]['load'])
        assert load[0] * k > 0.6
        capacity = dataclasses.replace(moe, dropless=False)
        (_, (_, aux)), _ = jax.jit(layer_loss(make_layer(capacity, unbalanced=True)[0], ct))(params, x)
        assert float(aux['dropped_fraction']) > 0.1
    return moe, graphdef, params, x, ct, want


@pytest.mark.parametrize('name', ['top1', 'top2', 'top2-unbalanced'])
def test_one_device_equals_dense(name):
    """Without a mesh the whole batch is one group: every assignment, sorted by expert."""
    _, graphdef, params, x, ct, want = case(name)
    check_equal(jax.jit(layer_loss(graphdef, ct))(params, x), want)


@pytest.mark.parametrize('layout, name', [
    (dict(data=2, fsdp=1, expert=4, tensor=1), 'top2-unbalanced'),
    (dict(data=1, fsdp=1, expert=8, tensor=1), 'top1-unbalanced'),
    (dict(data=1, fsdp=2, expert=2, tensor=2), 'top2'),
], ids=['dp2-ep4', 'ep8', 'fsdp2-ep2-tp2'])
def test_expert_parallel_equals_dense(layout, name):
    """Experts over `expert` (2 or 4 or 8 devices, with data, fsdp and tensor axes beside it): an
    all_to_all of worst-case buffers, and no all-gather of the tokens."""
    _, graphdef, params, x, ct, want = case(name)
    mesh = create_mesh(MeshConfig(**layout))
    shardings = param_shardings(abstract_model(layer_config(MoEConfig(num_experts=E))), mesh)['layers']['0']['ffn']
    assert shardings['experts']['wi_gate'].spec[0] == 'expert'
    with jax.set_mesh(mesh):
        ps = jax.device_put(params, shardings)
        xs = jax.device_put(x, NamedSharding(mesh, P(('data', 'fsdp', 'expert'))))
        fn = layer_loss(graphdef, ct)
        jaxpr = str(jax.make_jaxpr(fn)(ps, xs))  # the program's own collectives, not the partitioner's
        got = jax.jit(fn)(ps, xs)
    assert 'all_to_all' in jaxpr
    assert 'all_gather' not in jaxpr and 'reduce_scatter' not in jaxpr
    assert len(got[0][1][0].sharding.device_set) == 8
    check_equal(got, want)


def test_send_slots_by_hand():
    """6 assignments of 4 experts, 2 devices (experts 0-1 and 2-3). Sorted by expert: a1 a3 (0),
    a4 (1) | a0 (2), a2 a5 (3). Buffer 0: a1 a3 a4, padding; buffer 1: a0 a2 a5, padding."""
    index = jnp.asarray([2, 0, 3, 0, 1, 3], jnp.int32)
    slot, source, counts = send_slots(index, 4, 2)
    np.testing.assert_array_equal(counts, [[2, 1], [1, 2]])
    np.testing.assert_array_equal(source, [1, 3, 4, 6, 6, 6, 0, 2, 5, 6, 6, 6])
    np.testing.assert_array_equal(slot, [6, 0, 7, 1, 2, 8])
    # take and its gradient, both gathers: the gradient of rows -> buffers is buffers -> rows.
    rows = random_x((6, 3))
    buffers, vjp = jax.vjp(lambda r: take(r, source, slot), rows)
    np.testing.assert_array_equal(buffers[:3], rows[np.asarray([1, 3, 4])])
    assert np.all(np.asarray(buffers)[3:6] == 0)
    g = random_x((12, 3), seed=3)
    np.testing.assert_array_equal(vjp(g)[0], g[slot])


def test_backward_has_no_scatter():
    """The gradient of the dropless experts w.r.t. x, gates and weights moves rows by gathers
    only, one device and over `expert` (shard_map)."""
    moe = MoEConfig(num_experts=E, top_k=2, dropless=True)
    _, params, _ = make_layer(moe)
    weights = tuple(params['experts'][n] for n in ('wi_gate', 'wi_up', 'wo'))
    x = random_x((B, T, D))
    index = jnp.asarray(np.random.default_rng(0).integers(0, E, (B, T, 2)), jnp.int32)
    gate = jnp.full((B, T, 2), 0.5, jnp.float32)

    def loss(group, x, gate, weights):
        return jnp.sum(group(x, index, gate, weights) ** 2)

    grad = jax.grad(functools.partial(loss, dropless_group), argnums=(0, 1, 2))
    assert 'scatter' not in str(jax.make_jaxpr(grad)(x, gate, weights))
    mesh = create_mesh(MeshConfig(data=2, expert=4))
    spec, wspec = P(('data', 'expert')), P('expert')
    group = jax.shard_map(functools.partial(dropless_group, expert_axis='expert'), mesh=mesh,
                          in_specs=(spec, spec, spec, (wspec,) * 3), out_specs=spec)
    jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, group), argnums=(0, 1, 2)))(x, gate, weights))
    assert 'all_to_all' in jaxpr and 'scatter' not in jaxpr


def test_model_flops_match_the_capacity_path():
    """Model FLOPs count the chosen experts either way: padding and dispatch are overhead."""
    moe = MoEConfig(num_experts=E, top_k=2)
    assert train_flops_per_token(layer_config(dataclasses.replace(moe, dropless=True)), 64) == \
        train_flops_per_token(layer_config(moe), 64)
