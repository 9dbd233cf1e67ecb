"""The one protocol of a block's sublayers: the attention (Attention, MoAttention) and the FFN
(SwiGLU, MoEFeedForward, LoryFeedForward) are called alike,

    y, cache = layer(x, context, cache)

x [B, T, D] -> y [B, T, D]. `context` (Context) carries everything a layer may read besides x;
each reads the fields it needs. `cache` is the layer's decoding state or None (training,
scoring, and layers that keep none); the layer returns it updated, and None stays None.

Each sublayer class also owns its cache's shape: `cache_spec(config, batch, max_len)` gives
{name: jax.ShapeDtypeStruct} (None when it keeps nothing) and CACHE_AXES {name: logical axes}
places it on the mesh. bam_jax/generate/cache.py assembles the model's cache from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Context:
    """What a sublayer reads besides x.

    positions [B, T]: RoPE positions, and the cache slots a decoding step writes.
    mask: attention_kernels.self_attention_mask's (Documents or a boolean [B, 1, T, T]); None
      when decoding through a cache, whose mask follows from positions.
    segment_ids [B, T]: packed documents, 0 = padding (Lory's means skip padding).
    train: the routers' training behaviour (capacity, sampled routing); rng: a key or None.
    prompt_len (int or [B]) or None: inference; Lory merges once per row from the first
      prompt_len tokens instead of per segment.
    """
    positions: Any
    mask: Any
    segment_ids: Any
    train: bool = False
    rng: Any = None
    prompt_len: Any = None

    def fold(self, i: int) -> Context:
        """The context with an independent key for sublayer or layer i (None stays None)."""
        return self if self.rng is None else dataclasses.replace(self, rng=jax.random.fold_in(self.rng, i))


class Sublayer(nnx.Module):
    """A block's attention or FFN (the module docstring's protocol). By default it keeps no
    decoding state."""

    CACHE_AXES: ClassVar[dict[str, tuple]] = {}
    # Whether a prefill must read each whole prompt in one call (a cache built from all of it),
    # rather than chunk by chunk.
    WHOLE_PROMPT_PREFILL: ClassVar[bool] = False

    @classmethod
    def cache_spec(cls, config, batch: int, max_len: int) -> dict[str, jax.ShapeDtypeStruct] | None:
        """The decoding state a layer of this class keeps for `batch` rows of up to max_len tokens."""
        return None
