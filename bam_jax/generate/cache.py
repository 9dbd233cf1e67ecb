"""The decoding cache: a pytree, one entry per layer, preallocated to the maximum length.

Every layer caches the keys and values its attention reads, after RoPE, in the compute dtype:
  dense, BTX, Lory  {'attn': {'k', 'v'}} of [B, S, K, Dh]: the dense model's cache;
  BAM expert KV     [B, S, N*K, Dh]: every attention expert has its own K/V heads, N times dense;
  BAM shared KV     [B, S, K, Dh]: the experts' N*H query heads read the dense model's K heads,
                    so the cache is the dense one, byte for byte.
Lory adds {'ffn': {'wi_gate', 'wi_up' [B, 1, D, F], 'wo' [B, 1, F, D]}}: each row's FFN, merged
once from its prompt at prefill, so a generated token costs what a dense token costs.
Shapes: B batch, S maximum length, K kv heads, N attention experts, Dh head_dim, D d_model, F d_ff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from bam_jax.models import ModelConfig
from bam_jax.parallel.sharding import logical_to_spec

KV_AXES = ('batch', 'length', 'kv_heads', 'head_dim')
MERGED_FFN_AXES = {'wi_gate': ('batch', None, 'embed', 'mlp'), 'wi_up': ('batch', None, 'embed', 'mlp'),
                   'wo': ('batch', None, 'mlp', 'embed')}


def cache_kv_heads(config: ModelConfig) -> int:
    """K/V heads a layer caches: N*K for expert-KV attention experts, K otherwise."""
    if config.moa and not config.moa.shared_kv:
        return config.moa.num_experts * config.num_kv_heads
    return config.num_kv_heads


def cache_spec(config: ModelConfig, batch: int, max_len: int) -> list[dict]:
    """The cache's shapes and dtypes (jax.ShapeDtypeStruct), one dict per layer."""
    dt = config.compute_dtype
    kv = jax.ShapeDtypeStruct((batch, max_len, cache_kv_heads(config), config.resolved_head_dim), dt)
    layer = {'attn': {'k': kv, 'v': kv}}
    if config.lory:
        d, f = config.d_model, config.d_ff
        layer['ffn'] = {'wi_gate': jax.ShapeDtypeStruct((batch, 1, d, f), dt),
                        'wi_up': jax.ShapeDtypeStruct((batch, 1, d, f), dt),
                        'wo': jax.ShapeDtypeStruct((batch, 1, f, d), dt)}
    return [layer for _ in range(config.num_layers)]


def cache_bytes(spec) -> int:
    """Bytes of a cache (or of its spec)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(spec))


def cache_shardings(spec, mesh: Mesh):
    """The batch over the data-parallel axes, K/V heads (and a merged FFN) as the weights are."""
    def one(path, x):
        names = MERGED_FFN_AXES[path[-1].key] if path[-2].key == 'ffn' else KV_AXES
        return NamedSharding(mesh, logical_to_spec(names, x.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, spec)


def init_cache(spec, shardings=None):
    """A zero cache of `spec`, created in place (on the mesh when shardings are given)."""
    return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), spec), out_shardings=shardings)()
