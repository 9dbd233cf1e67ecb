"""Attention kernels (bam_jax/models/attention_kernels.py): each ModelConfig.attention_impl
computes the plain attention's function, values and gradients, on packed documents with
padding, grouped K/V heads, a sliding window, and both kinds of attention experts; a kernel
this process cannot run is refused in one line when the model is built.

'xla' runs here as on any backend; 'splash' runs its TPU kernel in Pallas interpret mode (on
rows of 128 tokens: its tiles are 128 wide); 'cudnn' needs a GPU, so only its refusals run."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bam_jax.errors import BamJaxError
from bam_jax.models import ModelConfig, abstract_model, build_model, flatten, merge_params, split_params
from bam_jax.models import attention_kernels as kernels
from bam_jax.models.config import MoAConfig, MoEConfig, setting_changes
from bam_jax.models.layers import Attention
from bam_jax.models.moa import MoAttention
from bam_jax.models.sublayer import Context
from bam_jax.parallel import MeshConfig, batch_sharding, create_mesh

from helpers import numpy_layer
from references import close

# 4 query heads over 2 K/V heads (grouped-query attention) and head_dim != d_model // num_heads.
SMALL = dict(vocab_size=50, d_model=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=40,
             dtype='float32')
CASES = {
    'dense': {},
    'dense_window': dict(sliding_window=3),
    'expert_kv': dict(moa=MoAConfig(num_experts=3)),
    'shared_kv': dict(moa=MoAConfig(num_experts=3, shared_kv=True)),
    'shared_kv_window': dict(moa=MoAConfig(num_experts=2, shared_kv=True), sliding_window=5),
}
# Three documents and a padding token (id 0) in one row, two documents in the other.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0],
                     [1, 1, 1, 1, 1, 1, 2, 2, 2, 2]], np.int32)


@pytest.fixture
def splash_interpret(monkeypatch):
    """The splash kernel in Pallas interpret mode, so that it runs (slowly) on CPU."""
    monkeypatch.setattr(kernels, 'SPLASH_INTERPRET', True)


def config(case, impl='plain', **overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **CASES[case], **overrides}, attention_impl=impl)


def draw(shapes, seed):
    """Weights at unit-ish scale (the default init makes attention near uniform, hiding mistakes)."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        name = jax.tree_util.keystr(path)
        if 'scale' in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        leaf = getattr(path[-1], 'key', None)
        if leaf in ('wq', 'wk', 'wv'):
            fan_in = x.shape[-3]                # [(N,) D, H or K, Dh]
        elif leaf == 'wo' and 'ffn' not in name:
            fan_in = x.shape[-3] * x.shape[-2]  # [(N,) H, Dh, D]
        else:
            fan_in = x.shape[-2]                # FFN, routers, unembed
        std = 1.0 if 'embedding' in name else fan_in ** -0.5 * (2.0 if 'router' in name else 1.0)
        return jnp.asarray(rng.normal(0, std, x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(one, shapes)


def graphdef_of(cfg):
    layer = MoAttention if cfg.moa else Attention
    return split_params(nnx.eval_shape(lambda: layer(cfg, rngs=nnx.Rngs(0))))[0]


def layer_inputs(cfg, segment_ids, seed=1):
    """x [B, T, D], positions restarting in each document, and a cotangent for the outputs."""
    rng = np.random.default_rng(seed)
    batch, length = segment_ids.shape
    x = rng.normal(0, 1, (batch, length, cfg.d_model)).astype(np.float32)
    starts = np.concatenate([np.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    positions = np.stack([np.arange(length) - np.maximum.accumulate(np.where(s, np.arange(length), 0))
                          for s in starts]).astype(np.int32)
    return x, positions, rng.normal(0, 1, x.shape).astype(np.float32)


def layer_run(cfg, params, x, positions, segment_ids, cotangent):
    """(y, {'params': d<y, cotangent>/dparams, 'x': d/dx}) of one attention layer, jitted."""
    graphdef = graphdef_of(cfg)
    mask = functools.partial(kernels.self_attention_mask, config=cfg)

    def loss(p, x):
        y, _ = merge_params(graphdef, p)(x, Context(positions, mask(segment_ids), segment_ids))
        return jnp.sum(y * cotangent), y

    (_, y), (grad_params, grad_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, {'params': grad_params, 'x': grad_x}


def assert_same_function(got, want, tol=1e-5):
    """(outputs, gradients) agree to tol, relative to the largest entry of each array."""
    (y, grads), (y0, grads0) = got, want
    close(y, y0, rtol=tol, atol=tol * np.abs(y0).max())
    assert np.abs(np.asarray(y0)).max() > 0.3
    grads = flatten(grads)
    for path, g0 in flatten(grads0).items():
        g0 = np.asarray(g0)
        assert np.abs(g0).max() > 0, path
        np.testing.assert_allclose(np.asarray(grads[path]), g0, rtol=tol, atol=tol * np.abs(g0).max(), err_msg=path)


def compare_layers(case, impl, segment_ids, tol=1e-5):
    plain = config(case)
    params = numpy_layer(lambda rngs: (MoAttention if plain.moa else Attention)(plain, rngs=rngs),
                         lambda shapes: draw(shapes, seed=3))[1]
    x, positions, cotangent = layer_inputs(plain, segment_ids)
    want = layer_run(plain, params, x, positions, segment_ids, cotangent)
    got = layer_run(config(case, impl), params, x, positions, segment_ids, cotangent)
    assert_same_function(got, want, tol)


# ---------------------------------------------------------------------------------------
# 'xla' == 'plain'

@pytest.mark.parametrize('case', ['dense', 'dense_window', 'expert_kv', 'shared_kv_window'])
def test_xla_layer_equals_plain(case):
    compare_layers(case, 'xla', SEGMENTS)


@pytest.mark.parametrize('variant, segment_ids', [('expert_kv', SEGMENTS), ('shared_kv', None)])
def test_xla_bam_model_equals_plain(variant, segment_ids):
    """Whole BAM models (attention and FFN experts, sliding window), on packed rows or rows of one
    document (segment_ids omitted: the fused kernels then build no document mask)."""
    moe = MoEConfig(num_experts=2, top_k=1)
    plain = config(variant, moe=moe, sliding_window=4, num_layers=1)
    graphdef, params = split_params(abstract_model(plain))
    params = draw(params, seed=4)
    tokens = np.random.default_rng(5).integers(0, plain.vocab_size, SEGMENTS.shape).astype(np.int32)

    def run(cfg):
        graphdef = split_params(abstract_model(cfg))[0]

        def loss(p):
            logits = merge_params(graphdef, p)(tokens, segment_ids)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    assert_same_function(run(dataclasses.replace(plain, attention_impl='xla')), run(plain))


def test_explicit_mask_array():
    """A layer called with a boolean mask array: 'xla' honours it exactly; splash, which reads
    documents as segment ids, refuses it in one line."""
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 10, h, 8)), jnp.float32) for h in (4, 2, 2))
    mask = jnp.asarray(rng.uniform(size=(2, 1, 10, 10)) < 0.6).at[:, :, jnp.arange(10), jnp.arange(10)].set(True)
    gate = jnp.asarray(rng.uniform(size=(2, 10, 4)), jnp.float32)
    want = kernels.attention(q, k, v, mask, gate=gate)
    close(kernels.attention(q, k, v, mask, impl='xla', gate=gate), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(BamJaxError, match='segment ids, not a mask array') as e:
        kernels.attention(q, k, v, mask, impl='splash')
    assert '\n' not in str(e.value)


# ---------------------------------------------------------------------------------------
# 'splash' == 'plain', in interpret mode

def splash_segments():
    """Two rows of 128 tokens: four documents and trailing padding; two documents."""
    ids = np.ones((2, 128), np.int32)
    ids[0, 30:], ids[0, 75:], ids[0, 100:], ids[0, 120:] = 2, 3, 4, 0
    ids[1, 64:] = 2
    return ids


# (Interpret mode compiles slowly: expert K/V runs in test_splash_over_mesh_equals_one_device.)
@pytest.mark.parametrize('case', ['dense_window', 'shared_kv'])
def test_splash_layer_equals_plain(case, splash_interpret):
    compare_layers(case, 'splash', splash_segments())


def test_splash_over_mesh_equals_one_device(splash_interpret):
    """On a mesh the kernel runs per device under shard_map (batch over the data axes, heads
    over 'tensor'); the sharded model computes the one-device function."""
    cfg = config('expert_kv', impl='splash', num_layers=1)
    graphdef, params = split_params(abstract_model(cfg))
    params = draw(params, seed=7)
    segment_ids = np.concatenate([splash_segments()] * 2)
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, segment_ids.shape).astype(np.int32)
    run = jax.jit(lambda p, t, s: merge_params(graphdef, p)(t, s))
    want = run(params, tokens, segment_ids)
    mesh = create_mesh(MeshConfig(data=2, fsdp=1, expert=2, tensor=2))
    with jax.set_mesh(mesh):
        got = run(params, *(jax.device_put(a, batch_sharding(mesh)) for a in (tokens, segment_ids)))
    close(got, want, rtol=1e-5, atol=1e-5)


def test_splash_refuses_lengths_off_its_tiles(splash_interpret):
    cfg = config('dense', impl='splash')
    graphdef, params = split_params(abstract_model(cfg))
    with pytest.raises(BamJaxError, match='multiple of 128, got 10') as e:
        jax.eval_shape(lambda p: merge_params(graphdef, p)(np.ones((1, 10), np.int32)), params)
    assert '\n' not in str(e.value)


# ---------------------------------------------------------------------------------------
# Refusals and the setting

@pytest.mark.parametrize('impl, device', [('cudnn', 'GPU'), ('splash', 'TPU')])
@pytest.mark.parametrize('case', ['dense', 'expert_kv'])
def test_kernel_for_another_platform_is_refused_at_build(impl, device, case):
    want = f"ModelConfig.attention_impl='{impl}' needs a {device}; this process sees cpu devices; use 'plain' or 'xla'"
    for build in (build_model, abstract_model):
        with pytest.raises(BamJaxError) as e:
            build(config(case, impl))
        assert str(e.value) == want


def test_cudnn_refuses_float32_and_its_kernel_errors_in_one_line(monkeypatch):
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    with pytest.raises(BamJaxError, match="computes in bfloat16 or float16, not ModelConfig.dtype='float32'"):
        abstract_model(config('dense', 'cudnn'))
    abstract_model(config('dense', 'cudnn', dtype='bfloat16'))
    # Called anyway (here, with no GPU), the kernel's own error comes back as one line.
    q = jnp.ones((1, 8, 4, 8), jnp.bfloat16)
    with pytest.raises(BamJaxError, match="attention_impl='cudnn' cannot run this attention") as e:
        kernels.attention(q, q[:, :, :2], q[:, :, :2], kernels.Documents(None), impl='cudnn')
    assert '\n' not in str(e.value)


def test_attention_impl_is_a_validated_setting():
    with pytest.raises(BamJaxError, match="attention_impl='flash' is not one of"):
        ModelConfig(attention_impl='flash')
    plain, fused = ModelConfig(), ModelConfig(attention_impl='splash')
    assert 'attention_impl' not in plain.architecture() and plain.architecture() == fused.architecture()
    assert setting_changes(plain, fused) == {'attention_impl': ['plain', 'splash']}
    assert ModelConfig.from_dict(fused.to_dict()) == fused
