"""Sharded == unsharded on the emulated 8-device CPU mesh, and the logical-axis helpers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bam_jax.errors import BamJaxError
from bam_jax.models import ModelConfig, build_model, merge_params, param_shardings, split_params
from bam_jax.parallel import MESH_AXES, MeshConfig, batch_sharding, create_mesh, logical_to_spec, replicated

import references
from helpers import packed_rows

# Every sharded dimension divides the (2, 2, 1, 2) mesh; kv_heads=2 does not divide tensor=4,
# so the (1, 2, 1, 4) layout also exercises a dropped mapping next to a kept one.
CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  d_ff=64, dtype='float32')
BATCH, LENGTH = 8, 16


def test_emulated_devices():
    assert jax.device_count() == 8, 'tests/conftest.py must force 8 host devices'


def loss_and_logits(graphdef):
    def fn(params, inputs, targets, segment_ids, positions):
        logits = merge_params(graphdef, params)(inputs, segment_ids, positions)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return nll.mean(), logits
    return fn


@pytest.fixture(scope='module')
def reference():
    """Model, params and the single-device (no mesh) logits and gradients."""
    model = build_model(CFG, seed=3)
    graphdef, params = split_params(model)
    batch = packed_rows(CFG.vocab_size, BATCH, LENGTH)  # two documents a row: the mask is sharded too
    grad_fn = jax.jit(jax.value_and_grad(loss_and_logits(graphdef), has_aux=True))
    (loss, logits), grads = grad_fn(params, *batch)
    return model, graphdef, params, batch, (loss, logits, grads)


# Sharded matmuls sum partial products in a different order; float32 agrees to ~1e-6.
close = functools.partial(references.close, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('layout', [
    dict(data=2, fsdp=2, expert=1, tensor=2),
    dict(data=8),
    dict(data=1, fsdp=2, expert=1, tensor=4),
], ids=['dp2-fsdp2-tp2', 'dp8', 'fsdp2-tp4'])
def test_sharded_equals_unsharded(reference, layout):
    model, graphdef, params, batch, (loss0, logits0, grads0) = reference
    mesh = create_mesh(MeshConfig(**layout))
    sharded = jax.device_put(params, param_shardings(model, mesh))
    batch = [jax.device_put(x, batch_sharding(mesh)) for x in batch]
    assert batch[0].sharding.spec == P(('data', 'fsdp', 'expert'), None)

    grad_fn = jax.jit(jax.value_and_grad(loss_and_logits(graphdef), has_aux=True))
    (loss, logits), grads = grad_fn(sharded, *batch)
    assert len(logits.sharding.device_set) == 8  # the computation really ran on the mesh
    close(loss, loss0)
    close(logits, logits0)
    assert jax.tree.structure(grads) == jax.tree.structure(grads0)
    for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0)):
        assert np.abs(np.asarray(g0)).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))

    # The forward pass alone, jitted with the shardings stated up front.
    fwd = jax.jit(lambda p, t, s, q: merge_params(graphdef, p)(t, s, q),
                  in_shardings=(param_shardings(model, mesh),) + (batch_sharding(mesh),) * 3)
    close(fwd(sharded, batch[0], batch[2], batch[3]), logits0)


def test_params_are_really_sharded(reference):
    model, _, params, _, _ = reference
    mesh = create_mesh(MeshConfig(data=2, fsdp=2, expert=1, tensor=2))
    sharded = jax.device_put(params, param_shardings(model, mesh))
    layer = sharded['layers']['0']

    gate = layer['ffn']['wi_gate']  # ('embed', 'mlp') -> ('fsdp', 'tensor')
    assert gate.sharding.spec == P('fsdp', 'tensor')
    assert not gate.sharding.is_fully_replicated
    assert {s.data.shape for s in gate.addressable_shards} == {(CFG.d_model // 2, CFG.d_ff // 2)}

    wq = layer['attn']['wq']  # ('embed', 'q_heads', 'head_dim') -> ('fsdp', 'tensor', None)
    assert wq.sharding.spec == P('fsdp', 'tensor', None)
    assert {s.data.shape for s in wq.addressable_shards} == {(16, 2, 8)}
    assert sharded['embed']['embedding'].sharding.spec == P('tensor', 'fsdp')
    assert sharded['unembed']['kernel'].sharding.spec == P('fsdp', 'tensor')

    # Norm scales are replicated: each device holds the whole vector.
    scale = layer['norm']['scale']
    assert scale.sharding.is_fully_replicated
    assert all(s.data.shape == (CFG.d_model,) for s in scale.addressable_shards)
    original = params['layers']['0']['ffn']['wi_gate']
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(original))


def test_too_wide_mesh_drops_mappings(reference):
    model = reference[0]
    mesh = create_mesh(MeshConfig(data=1, fsdp=1, expert=1, tensor=8))
    shardings = param_shardings(model, mesh)
    attn = shardings['layers']['0']['attn']
    # 4 query heads and 2 kv heads do not divide 8 devices: those weights replicate
    # (the size-1 'fsdp' axis may stay in the spec; it splits nothing).
    assert attn['wq'].spec == P('fsdp', None, None) and attn['wq'].is_fully_replicated
    assert attn['wk'].spec == P('fsdp', None, None) and attn['wk'].is_fully_replicated
    assert shardings['layers']['0']['ffn']['wi_up'].spec == P('fsdp', 'tensor')  # d_ff 64 / 8


# ---------------------------------------------------------------------------------------
# logical_to_spec on hand-made cases.

def cpu_mesh(**sizes):
    return create_mesh(MeshConfig(**sizes))


def test_logical_to_spec_without_mesh_uses_the_rules():
    assert logical_to_spec(('embed', 'mlp')) == P('fsdp', 'tensor')
    assert logical_to_spec(('batch', 'length')) == P(('data', 'fsdp', 'expert'), None)
    assert logical_to_spec(('experts', 'embed', 'mlp')) == P('expert', 'fsdp', 'tensor')
    assert logical_to_spec(('norm',)) == P(None)
    assert logical_to_spec((None, 'head_dim')) == P(None, None)
    assert logical_to_spec(()) == P()


def test_logical_to_spec_uses_each_mesh_axis_once():
    # vocab and mlp both map to 'tensor': only the first dimension gets it.
    assert logical_to_spec(('vocab', 'mlp')) == P('tensor', None)


def test_logical_to_spec_custom_rules():
    rules = (('a', ('data', 'tensor')), ('b', None))
    assert logical_to_spec(('a', 'b'), rules=rules) == P(('data', 'tensor'), None)
    assert logical_to_spec(('b', 'unknown'), rules=rules) == P(None, None)


def test_logical_to_spec_drops_axes_that_do_not_divide():
    mesh = cpu_mesh(data=1, fsdp=2, expert=1, tensor=4)
    assert logical_to_spec(('embed', 'mlp'), (6, 8), mesh) == P('fsdp', 'tensor')
    assert logical_to_spec(('embed', 'mlp'), (3, 8), mesh) == P(None, 'tensor')
    assert logical_to_spec(('embed', 'mlp'), (6, 6), mesh) == P('fsdp', None)
    assert logical_to_spec(('embed', 'mlp'), (5, 2), mesh) == P(None, None)


def test_logical_to_spec_keeps_the_dividing_prefix_of_a_multi_axis_rule():
    mesh = cpu_mesh(data=2, fsdp=2, expert=2, tensor=1)
    assert logical_to_spec(('batch',), (8,), mesh) == P(('data', 'fsdp', 'expert'))
    assert logical_to_spec(('batch',), (4,), mesh) == P(('data', 'fsdp'))
    assert logical_to_spec(('batch',), (2,), mesh) == P('data')
    assert logical_to_spec(('batch',), (3,), mesh) == P(None)


def test_batch_sharding_and_replicated():
    mesh = cpu_mesh(data=2, fsdp=2, expert=1, tensor=2)
    assert batch_sharding(mesh).spec == P(('data', 'fsdp', 'expert'), None)
    assert batch_sharding(mesh, ndim=3).spec == P(('data', 'fsdp', 'expert'), None, None)
    x = jax.device_put(np.zeros((4, 3), np.float32), batch_sharding(mesh))
    # Tensor-parallel replicas hold the same rows: 4 rows over data*fsdp = 4 groups.
    assert {s.data.shape for s in x.addressable_shards} == {(1, 3)}
    assert replicated(mesh).is_fully_replicated
    assert isinstance(replicated(mesh), NamedSharding)


# ---------------------------------------------------------------------------------------
# MeshConfig.shape and create_mesh.

@pytest.mark.parametrize('sizes, devices, want', [
    (dict(), 8, (8, 1, 1, 1)),
    (dict(fsdp=2, tensor=2), 8, (2, 2, 1, 2)),
    (dict(data=1, fsdp=-1), 8, (1, 8, 1, 1)),
    (dict(data=2, fsdp=2, expert=1, tensor=2), 8, (2, 2, 1, 2)),
    (dict(data=1), 1, (1, 1, 1, 1)),
])
def test_mesh_shape(sizes, devices, want):
    assert MeshConfig(**sizes).shape(devices) == want


@pytest.mark.parametrize('sizes, devices, message', [
    (dict(data=-1, fsdp=-1), 8, 'at most one'),
    (dict(fsdp=3), 8, 'cannot be split'),
    (dict(data=2, fsdp=2), 8, 'needs 4 devices'),
    (dict(data=4, fsdp=4), 8, 'needs 16 devices'),
])
def test_mesh_shape_errors(sizes, devices, message):
    with pytest.raises(BamJaxError, match=message):
        MeshConfig(**sizes).shape(devices)


def test_create_mesh_axes_and_devices():
    mesh = cpu_mesh(data=2, fsdp=2, expert=1, tensor=2)
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == dict(data=2, fsdp=2, expert=1, tensor=2)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    small = create_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
    assert small.devices.size == 2
    with pytest.raises(BamJaxError):
        create_mesh(MeshConfig(data=4), devices=jax.devices()[:2])
