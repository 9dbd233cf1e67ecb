"""Dense transformer layers: RMSNorm, RoPE, grouped-query attention, SwiGLU FFN, embeddings.

Every weight is an `nnx.Param` named by the checkpoint contract (docs/checkpoint_format.md)
and carries logical axis names (bam_jax/parallel/sharding.py maps them to the mesh). The
attention itself runs in bam_jax/models/attention_kernels.py, by ModelConfig.attention_impl.
Shapes: B batch, T length, D d_model, H query heads, K kv heads, Dh head_dim, F d_ff, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bam_jax.models.attention_kernels import attention, check_attention_impl, dot_product_attention
from bam_jax.models.config import ModelConfig
from bam_jax.models.sublayer import Context, Sublayer

# A KV cache's logical axes ([B, S, K, Dh]): the batch over the data-parallel axes, K/V heads
# as the weights place them.
KV_CACHE_AXES = {'k': ('batch', 'length', 'kv_heads', 'head_dim'), 'v': ('batch', 'length', 'kv_heads', 'head_dim')}


def kv_cache_spec(config: ModelConfig, batch: int, max_len: int, kv_heads: int) -> dict:
    """{'k', 'v'}: [B, S, kv_heads, Dh] in the compute dtype, the keys and values after RoPE."""
    kv = jax.ShapeDtypeStruct((batch, max_len, kv_heads, config.resolved_head_dim), config.compute_dtype)
    return {'k': kv, 'v': kv}


def param(rngs: nnx.Rngs, init, shape, dtype, names) -> nnx.Param:
    """A weight with its logical axis names attached as sharding metadata."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def rms_norm(x, scale, eps: float):
    """x / rms(x) * scale over the last axis, in float32. scale broadcasts against x."""
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * scale.astype(jnp.float32)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32."""

    def __init__(self, dim: int, config: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = config.norm_eps
        self.dtype = config.compute_dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), config.weight_dtype, ('norm',))

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """RoPE's inverse frequencies [Dh/2] (float32), after the config's scaling.

    theta^(-2i/Dh); 'linear' divides them all by the factor; 'llama3' divides those whose
    wavelength exceeds original_len / low_freq_factor, keeps those under original_len /
    high_freq_factor, and blends linearly (in original_len / wavelength) in between.
    """
    half = config.resolved_head_dim // 2
    freqs = config.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    factor = config.rope_scaling_factor
    if config.rope_scaling == 'linear':
        freqs = freqs / factor
    elif config.rope_scaling == 'llama3':
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        ratio = config.rope_original_max_len / (2 * np.pi / freqs)  # original length in wavelengths
        smooth = np.clip((ratio - low) / (high - low), 0.0, 1.0)  # 0: long wavelengths, 1: short
        freqs = (1 - smooth) * freqs / factor + smooth * freqs
    return freqs.astype(np.float32)


def rope(x, positions, freqs):
    """Rotary position embedding (rotate-half form). x: [B, T, N, Dh], positions: [B, T],
    freqs: [Dh/2] (rope_frequencies)."""
    angles = positions.astype(jnp.float32)[..., None, None] * freqs  # [B, T, 1, Dh/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def cache_mask(positions, cache_len: int, window: int = 0):
    """What a query may read from a KV cache: the slots up to its own position (the last
    `window` of them when window > 0).

    A row's token at position p sits in cache slot p, so this is the causal mask over the
    cache; slots past the position (padding, or not yet written) are never read.
    positions: [B, T] -> [B, 1, T, S].
    """
    offset = positions[:, :, None] - jnp.arange(cache_len)[None, None, :]
    return ((offset >= 0) & ((offset < window) if window else True))[:, None]


def head_extras(h, bias, norm_scale, eps: float):
    """A q/k/v projection's per-head extras: h [..., heads, Dh] + bias, then, given a scale,
    RMSNorm over Dh (Qwen3's q/k norm). bias and norm_scale broadcast against h (None: skip);
    the result keeps h's dtype."""
    if bias is not None:
        h = h + bias.astype(h.dtype)
    if norm_scale is not None:
        h = rms_norm(h, norm_scale, eps).astype(h.dtype)
    return h


def write_cache(cache, k, v, positions):
    """Writes k, v [B, T, K, Dh] into cache {'k', 'v'} [B, S, K, Dh] at each row's slots
    positions[b, 0] .. positions[b, 0] + T - 1 (a row's positions are consecutive)."""
    def put(buffer, new):
        at = jax.vmap(lambda row, update, start: jax.lax.dynamic_update_slice_in_dim(row, update, start, axis=0))
        return at(buffer, new.astype(buffer.dtype), positions[:, 0])
    return {'k': put(cache['k'], k), 'v': put(cache['v'], v)}


def attend(q, k, v, positions, mask, cache=None, gate=None, window: int = 0, impl: str = 'plain'):
    """Grouped-query attention (attention_kernels.attention, by `impl`) over the step's own K/V,
    or through a KV cache. q: [B, T, H, Dh]; k, v: [B, T, K, Dh]; mask: attention_kernels.Documents
    or a boolean [B, 1, T, T]; gate [B, T, H] scales each head's output.

    With a cache ({'k', 'v'} [B, S, K, Dh], see bam_jax/generate/cache.py), k and v are written
    at their positions first and q reads the whole cache under cache_mask(window) (mask is
    unused), with the plain kernel whatever `impl`: each row reads the cache up to its own
    positions, which the fused kernels' fixed causal masks do not express (and a decoding step
    is one query per row, where a fused kernel has nothing to skip).
    Returns (out [B, T, H, Dh], the updated cache or None).
    """
    if cache is not None:
        cache = write_cache(cache, k, v, positions)
        k, v, mask = cache['k'], cache['v'], cache_mask(positions, cache['k'].shape[1], window)
        return dot_product_attention(q, k, v, mask, gate), cache
    return attention(q, k, v, mask, impl=impl, window=window, gate=gate), cache


class Attention(Sublayer):
    """Multi-head attention with grouped K/V heads and RoPE; weights wq, wk, wv, wo, and
    bq [H, Dh], bk, bv [K, Dh] (qkv_bias), q_norm, k_norm [Dh] (qk_norm). Decoding caches
    K/V [B, S, K, Dh]."""

    CACHE_AXES = KV_CACHE_AXES

    @classmethod
    def cache_spec(cls, config: ModelConfig, batch: int, max_len: int) -> dict:
        return kv_cache_spec(config, batch, max_len, config.num_kv_heads)

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        check_attention_impl(config)
        d, h, k, dh = config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim
        init = nnx.initializers.normal(config.init_std)
        wd = config.weight_dtype
        self.config = config
        self.wq = param(rngs, init, (d, h, dh), wd, ('embed', 'q_heads', 'head_dim'))
        self.wk = param(rngs, init, (d, k, dh), wd, ('embed', 'kv_heads', 'head_dim'))
        self.wv = param(rngs, init, (d, k, dh), wd, ('embed', 'kv_heads', 'head_dim'))
        # Scaled down with depth so the residual stream's variance stays bounded.
        out_init = nnx.initializers.normal(config.init_std / (2 * config.num_layers) ** 0.5)
        self.wo = param(rngs, out_init, (h, dh, d), wd, ('q_heads', 'head_dim', 'embed'))
        if config.qkv_bias:
            zeros = nnx.initializers.zeros
            self.bq = param(rngs, zeros, (h, dh), wd, ('q_heads', 'head_dim'))
            self.bk = param(rngs, zeros, (k, dh), wd, ('kv_heads', 'head_dim'))
            self.bv = param(rngs, zeros, (k, dh), wd, ('kv_heads', 'head_dim'))
        if config.qk_norm:
            self.q_norm = param(rngs, nnx.initializers.ones, (dh,), wd, ('head_dim',))
            self.k_norm = param(rngs, nnx.initializers.ones, (dh,), wd, ('head_dim',))

    def __call__(self, x, context: Context, cache=None):
        """x: [B, T, D] -> (y [B, T, D], cache): the sublayer protocol. Reads context.positions
        and context.mask; cache: {'k', 'v'} [B, S, K, Dh] or None (see attend)."""
        config, dt = self.config, self.config.compute_dtype
        positions = context.positions
        x = x.astype(dt)

        def heads(w, bias=None, norm=None):
            h = jnp.einsum('btd,dhk->bthk', x, getattr(self, w)[...].astype(dt))
            return head_extras(h, optional(self, bias), optional(self, norm), config.norm_eps)

        freqs = rope_frequencies(config)
        q, k = rope(heads('wq', 'bq', 'q_norm'), positions, freqs), rope(heads('wk', 'bk', 'k_norm'), positions, freqs)
        out, cache = attend(q, k, heads('wv', 'bv'), positions, context.mask, cache, window=config.sliding_window,
                            impl=config.attention_impl)
        return jnp.einsum('bthk,hkd->btd', out, self.wo[...].astype(dt)), cache


def optional(module: nnx.Module, name: str | None):
    """The value of the module's weight `name`, or None if it has none (a config option off)."""
    weight = getattr(module, name, None) if name else None
    return None if weight is None else weight[...]


class SwiGLU(Sublayer):
    """FFN(x) = (silu(x Wg) * (x Wu)) Wo; weights wi_gate, wi_up, wo."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        init = nnx.initializers.normal(config.init_std)
        out_init = nnx.initializers.normal(config.init_std / (2 * config.num_layers) ** 0.5)
        wd = config.weight_dtype
        self.dtype = config.compute_dtype
        self.wi_gate = param(rngs, init, (d, f), wd, ('embed', 'mlp'))
        self.wi_up = param(rngs, init, (d, f), wd, ('embed', 'mlp'))
        self.wo = param(rngs, out_init, (f, d), wd, ('mlp', 'embed'))

    def __call__(self, x, context: Context | None = None, cache=None):
        """x: [B, T, D] -> (y [B, T, D], None): the sublayer protocol; it reads no context."""
        dt = self.dtype
        x = x.astype(dt)
        hidden = jax.nn.silu(x @ self.wi_gate[...].astype(dt)) * (x @ self.wi_up[...].astype(dt))
        return hidden @ self.wo[...].astype(dt), cache


class Embed(nnx.Module):
    """Token embedding [V, D]; when tied it also gives the output logits."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.init_std)
        self.dtype = config.compute_dtype
        self.embedding = param(rngs, init, (config.vocab_size, config.d_model),
                               config.weight_dtype, ('vocab', 'embed'))

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x):
        """Logits of the tied output layer, in float32. x: [B, T, D] -> [B, T, V]."""
        return jnp.einsum('btd,vd->btv', x, self.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


class Unembed(nnx.Module):
    """Untied output projection [D, V] -> float32 logits."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.init_std)
        self.dtype = config.compute_dtype
        self.kernel = param(rngs, init, (config.d_model, config.vocab_size),
                            config.weight_dtype, ('embed', 'vocab'))

    def __call__(self, x):
        return jnp.einsum('btd,dv->btv', x, self.kernel[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
