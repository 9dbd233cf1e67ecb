"""The decoding cache: a pytree, one entry per layer, preallocated to the maximum length.

Each sublayer owns its part's shape (`cache_spec` and CACHE_AXES, bam_jax/models/sublayer.py):
every attention caches the keys and values it reads, after RoPE, in the compute dtype,
  dense, BTX, Lory  {'attn': {'k', 'v'}} of [B, S, K, Dh]: the dense model's cache;
  BAM expert KV     [B, S, N*K, Dh]: every attention expert has its own K/V heads, N times dense;
  BAM shared KV     [B, S, K, Dh]: the experts' N*H query heads read the dense model's K heads,
                    so the cache is the dense one, byte for byte;
and a Lory FFN adds {'ffn': {'wi_gate', 'wi_up' [B, 1, D, F], 'wo' [B, 1, F, D]}}, each row's FFN
merged once from its prompt. This module assembles and places them.
Shapes: B batch, S maximum length, K kv heads, N attention experts, Dh head_dim, D d_model, F d_ff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from bam_jax.models import Block, ModelConfig
from bam_jax.parallel.sharding import logical_to_spec


def cache_spec(config: ModelConfig, batch: int, max_len: int) -> list[dict]:
    """The cache's shapes and dtypes (jax.ShapeDtypeStruct), one dict per layer."""
    return [Block.cache_spec(config, batch, max_len) for _ in range(config.num_layers)]


def cache_bytes(spec) -> int:
    """Bytes of a cache (or of its spec)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(spec))


def cache_shardings(config: ModelConfig, spec, mesh: Mesh):
    """Each entry placed by its sublayer's CACHE_AXES: the batch over the data-parallel axes,
    K/V heads (and a merged FFN) as the weights are."""
    axes = Block.cache_axes(config)

    def one(path, x):
        sublayer, entry = (key.key for key in path[-2:])
        return NamedSharding(mesh, logical_to_spec(axes[sublayer][entry], x.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, spec)


def init_cache(spec, shardings=None):
    """A zero cache of `spec`, created in place (on the mesh when shardings are given)."""
    return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), spec), out_shardings=shardings)()
