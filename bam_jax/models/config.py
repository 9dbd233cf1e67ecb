"""The model's shape and numerics, as one gin-configurable record."""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax.numpy as jnp

from bam_jax.errors import BamJaxError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM. Sizes live in gin/models/*.gin.

    Numerics: parameters are stored in `param_dtype` (float32) and cast to `dtype` (bfloat16)
    for the matmuls; norms, softmax and the loss run in float32.
    """
    vocab_size: int = 384
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0            # 0: d_model // num_heads
    d_ff: int = 512
    parallel_block: bool = True  # x + attn(norm(x)) + ffn(norm(x)), as in BAM/PaLM
    tie_embeddings: bool = False
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = 'bfloat16'
    param_dtype: str = 'float32'

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise BamJaxError(f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})')
        if not self.head_dim and self.d_model % self.num_heads:
            raise BamJaxError(f'd_model ({self.d_model}) is not divisible by num_heads '
                              f'({self.num_heads}); set head_dim')
        if self.resolved_head_dim % 2:
            raise BamJaxError(f'head_dim must be even for RoPE, got {self.resolved_head_dim}')
        for name in ('dtype', 'param_dtype'):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise BamJaxError(f'ModelConfig.{name}={getattr(self, name)!r} is not a dtype') from None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise BamJaxError(f'unknown model config fields {sorted(unknown)}')
        return cls(**values)
