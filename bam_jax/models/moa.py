"""Attention experts (BAM's Mixture of Attention), computed as one wide attention.

N experts of H query heads each, routed per token with gates g [B, T, N]:

    out = sum_j g_j * Wo_j(heads_j(x)) = Wo_all(concat_j g_j * heads_j(x))

so a single attention with N*H query heads runs, each head's output is scaled by its expert's
gate for that token, and the concatenated output projection follows: no loop over experts,
one large matmul per projection. Soft routing (BAM's default) gives every expert a gate; with
top-k the unchosen experts' gates are zero (they are still computed: an ablation, not a saving).

Two variants:
  expert KV  each expert has its own Wq, Wk, Wv, Wo. Weights experts/{wq, wo} [N, D, H, Dh],
             [N, H, Dh, D] and experts/{wk, wv} [N, D, K, Dh]; N*K K/V heads.
  shared KV  per-expert Wq and Wo, one Wk, Wv shared by all (attn/wk, attn/wv [D, K, Dh]).
             The N*H query heads are grouped-query attention over the dense model's K heads,
             so the KV cache is exactly the dense one's.
Router: router/kernel [D, N].
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bam_jax.models.config import ModelConfig
from bam_jax.models.layers import attend, param, rope
from bam_jax.models.routing import Router, combine_weights, report, route, router_aux


class AttentionExperts(nnx.Module):
    """Stacked per-expert projections: wq [N, D, H, Dh], wo [N, H, Dh, D]; wk, wv [N, D, K, Dh] unless shared."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        n = config.moa.num_experts
        d, h, k, dh = config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim
        init = nnx.initializers.normal(config.init_std)
        out_init = nnx.initializers.normal(config.init_std / (2 * config.num_layers) ** 0.5)
        wd = config.weight_dtype
        self.wq = param(rngs, init, (n, d, h, dh), wd, ('experts', 'embed', 'q_heads', 'head_dim'))
        if not config.moa.shared_kv:
            self.wk = param(rngs, init, (n, d, k, dh), wd, ('experts', 'embed', 'kv_heads', 'head_dim'))
            self.wv = param(rngs, init, (n, d, k, dh), wd, ('experts', 'embed', 'kv_heads', 'head_dim'))
        self.wo = param(rngs, out_init, (n, h, dh, d), wd, ('experts', 'q_heads', 'head_dim', 'embed'))


class MoAttention(nnx.Module):
    """Routed attention experts in place of the dense attention. Parameters: router/*,
    experts/*, and wk, wv when K/V are shared.

    Reports its routing losses and metrics (routing.router_aux) to routing.call_with_aux.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.moa = config.moa
        self.router = Router(config.moa.num_experts, config, rngs=rngs)
        self.experts = AttentionExperts(config, rngs=rngs)
        if config.moa.shared_kv:
            d, k, dh = config.d_model, config.num_kv_heads, config.resolved_head_dim
            init = nnx.initializers.normal(config.init_std)
            self.wk = param(rngs, init, (d, k, dh), config.weight_dtype, ('embed', 'kv_heads', 'head_dim'))
            self.wv = param(rngs, init, (d, k, dh), config.weight_dtype, ('embed', 'kv_heads', 'head_dim'))

    def __call__(self, x, positions, mask, *, train: bool = False, rng=None, cache=None):
        """x: [B, T, D]; positions: [B, T]; mask: [B, 1, T, T] -> [B, T, D].

        cache: a KV cache {'k', 'v'} [B, S, N*K, Dh] (expert KV) or [B, S, K, Dh] (shared KV,
        the dense model's); given one, returns (y, cache) (see layers.attend).
        """
        x = x.astype(self.config.compute_dtype)
        logits = self.router(x)
        index, gate, probs = route(logits, self.moa, rng if train else None)
        gates = combine_weights(index, gate, self.moa.num_experts)  # [B, T, N]
        q = jnp.einsum('btd,nd...->btn...', x, self._weight(self.experts.wq))  # [B, T, N, H, Dh]
        attention = self._shared_kv if self.moa.shared_kv else self._expert_kv
        y, cache = attention(x, q, gates, positions, mask, cache)
        report(self, router_aux(logits, probs, index, self.moa))
        return y if cache is None else (y, cache)

    def _weight(self, w):
        return w[...].astype(self.config.compute_dtype)

    def _rope(self, x, positions):
        return rope(x, positions, self.config.rope_theta)

    def _expert_kv(self, x, q, gates, positions, mask, cache):
        # Heads ordered (expert, head): query head j*H + h falls in K/V group j*K + h // (H/K),
        # i.e. expert j's query heads read expert j's K/V heads, as grouped-query attention does.
        batch, length, n, heads, head_dim = q.shape
        k = jnp.einsum('btd,nd...->btn...', x, self._weight(self.experts.wk)).reshape(batch, length, -1, head_dim)
        v = jnp.einsum('btd,nd...->btn...', x, self._weight(self.experts.wv)).reshape(batch, length, -1, head_dim)
        out, cache = attend(self._rope(q.reshape(batch, length, n * heads, head_dim), positions),
                            self._rope(k, positions), v, positions, mask, cache,
                            gate=jnp.repeat(gates, heads, axis=-1))  # [B, T, N*H]
        return jnp.einsum('btnhx,nhxd->btd', out.reshape(q.shape), self._weight(self.experts.wo)), cache

    def _shared_kv(self, x, q, gates, positions, mask, cache):
        # Heads ordered (K/V head, expert, head within its group): the readers of each shared
        # K/V head are contiguous, the layout grouped-query attention expects.
        batch, length, n, heads, head_dim = q.shape
        kv = self.config.num_kv_heads
        group = heads // kv
        k = jnp.einsum('btd,dkx->btkx', x, self._weight(self.wk))
        v = jnp.einsum('btd,dkx->btkx', x, self._weight(self.wv))
        q = q.reshape(batch, length, n, kv, group, head_dim).transpose(0, 1, 3, 2, 4, 5)
        head_gates = jnp.broadcast_to(gates[:, :, None, :, None], q.shape[:-1])
        out, cache = attend(self._rope(q.reshape(batch, length, -1, head_dim), positions),
                            self._rope(k, positions), v, positions, mask, cache,
                            gate=head_gates.reshape(batch, length, -1))
        wo = self._weight(self.experts.wo).reshape(n, kv, group, head_dim, -1)
        return jnp.einsum('btknhx,nkhxd->btd', out.reshape(q.shape), wo), cache
