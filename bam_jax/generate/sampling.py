"""Choosing the next token from the logits: greedy, temperature, top-k and top-p, as pure functions."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bam_jax.errors import BamJaxError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (the arg-max); otherwise a draw from softmax(logits / temperature)
    restricted to the top_k most likely tokens (0: all) and to the smallest set whose
    probability reaches top_p (1.0: all)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise BamJaxError(f'temperature must be >= 0, got {self.temperature}')
        if self.top_k < 0:
            raise BamJaxError(f'top_k must be >= 0, got {self.top_k}')
        if not 0 < self.top_p <= 1:
            raise BamJaxError(f'top_p must be in (0, 1], got {self.top_p}')

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits, k: int):
    """Logits outside each row's k largest set to -inf (ties at the k-th value are kept). [B, V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p: float):
    """Keeps the most likely tokens until their probability reaches p (at least one). [B, V]."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    keep_sorted = before < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample(logits, keys, sampling: Sampling):
    """The next token of every row. logits: [B, V] float32; keys: [B] (one per row) -> [B] int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_p_filter(top_k_filter(logits / sampling.temperature, sampling.top_k), sampling.top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


GREEDY = Sampling()
