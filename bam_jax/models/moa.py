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
Router: router/kernel [D, N]. With qkv_bias or qk_norm each projection keeps its bias and q/k
norm scale beside it: stacked per expert where the projection is (experts/bq, experts/q_norm,
...), one shared copy where it is shared (attn/bk, attn/bv, attn/k_norm).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bam_jax.models.attention_kernels import check_attention_impl
from bam_jax.models.config import ModelConfig
from bam_jax.models.layers import (
    KV_CACHE_AXES,
    attend,
    head_extras,
    kv_cache_spec,
    optional,
    param,
    rope,
    rope_frequencies,
)
from bam_jax.models.routing import Router, combine_weights, report, route, router_aux
from bam_jax.models.sublayer import Context, Sublayer


class AttentionExperts(nnx.Module):
    """Stacked per-expert projections: wq [N, D, H, Dh], wo [N, H, Dh, D]; wk, wv [N, D, K, Dh]
    unless shared; with qkv_bias bq [N, H, Dh] (bk, bv [N, K, Dh]); with qk_norm q_norm (k_norm)
    [N, Dh]: each expert keeps its dense source's extras."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        n = config.moa.num_experts
        d, h, k, dh = config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim
        init = nnx.initializers.normal(config.init_std)
        out_init = nnx.initializers.normal(config.init_std / (2 * config.num_layers) ** 0.5)
        wd = config.weight_dtype
        own_kv = not config.moa.shared_kv
        self.wq = param(rngs, init, (n, d, h, dh), wd, ('experts', 'embed', 'q_heads', 'head_dim'))
        if own_kv:
            self.wk = param(rngs, init, (n, d, k, dh), wd, ('experts', 'embed', 'kv_heads', 'head_dim'))
            self.wv = param(rngs, init, (n, d, k, dh), wd, ('experts', 'embed', 'kv_heads', 'head_dim'))
        self.wo = param(rngs, out_init, (n, h, dh, d), wd, ('experts', 'q_heads', 'head_dim', 'embed'))
        if config.qkv_bias:
            zeros = nnx.initializers.zeros
            self.bq = param(rngs, zeros, (n, h, dh), wd, ('experts', 'q_heads', 'head_dim'))
            if own_kv:
                self.bk = param(rngs, zeros, (n, k, dh), wd, ('experts', 'kv_heads', 'head_dim'))
                self.bv = param(rngs, zeros, (n, k, dh), wd, ('experts', 'kv_heads', 'head_dim'))
        if config.qk_norm:
            self.q_norm = param(rngs, nnx.initializers.ones, (n, dh), wd, ('experts', 'head_dim'))
            if own_kv:
                self.k_norm = param(rngs, nnx.initializers.ones, (n, dh), wd, ('experts', 'head_dim'))


class MoAttention(Sublayer):
    """Routed attention experts in place of the dense attention. Parameters: router/*,
    experts/*, and wk, wv (bk, bv, k_norm) when K/V are shared. Decoding caches K/V
    [B, S, N*K, Dh] (expert KV: every expert its own heads) or [B, S, K, Dh] (shared KV: the
    dense model's cache, byte for byte).

    Reports its routing losses and metrics (routing.router_aux) to routing.call_with_aux.
    """

    CACHE_AXES = KV_CACHE_AXES

    @classmethod
    def cache_spec(cls, config: ModelConfig, batch: int, max_len: int) -> dict:
        experts = 1 if config.moa.shared_kv else config.moa.num_experts
        return kv_cache_spec(config, batch, max_len, experts * config.num_kv_heads)

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        check_attention_impl(config)
        self.config = config
        self.moa = config.moa
        self.router = Router(config.moa.num_experts, config, rngs=rngs)
        self.experts = AttentionExperts(config, rngs=rngs)
        if config.moa.shared_kv:  # the dense attention's K/V weights, at the same names
            d, k, dh = config.d_model, config.num_kv_heads, config.resolved_head_dim
            init = nnx.initializers.normal(config.init_std)
            wd = config.weight_dtype
            self.wk = param(rngs, init, (d, k, dh), wd, ('embed', 'kv_heads', 'head_dim'))
            self.wv = param(rngs, init, (d, k, dh), wd, ('embed', 'kv_heads', 'head_dim'))
            if config.qkv_bias:
                self.bk = param(rngs, nnx.initializers.zeros, (k, dh), wd, ('kv_heads', 'head_dim'))
                self.bv = param(rngs, nnx.initializers.zeros, (k, dh), wd, ('kv_heads', 'head_dim'))
            if config.qk_norm:
                self.k_norm = param(rngs, nnx.initializers.ones, (dh,), wd, ('head_dim',))

    def __call__(self, x, context: Context, cache=None):
        """x: [B, T, D] -> (y [B, T, D], cache): the sublayer protocol. Reads context.positions,
        .mask, .train and .rng (sampled routing); cache: the KV cache (cache_spec) or None."""
        x = x.astype(self.config.compute_dtype)
        positions, mask = context.positions, context.mask
        logits = self.router(x)
        index, gate, probs = route(logits, self.moa, context.rng if context.train else None)
        gates = combine_weights(index, gate, self.moa.num_experts)  # [B, T, N]
        q = self._heads(x, self.experts, 'wq', 'bq', 'q_norm')  # [B, T, N, H, Dh]
        attention = self._shared_kv if self.moa.shared_kv else self._expert_kv
        y, cache = attention(x, q, gates, positions, mask, cache)
        report(self, router_aux(logits, probs, index, self.moa))
        return y, cache

    def _weight(self, w):
        return w[...].astype(self.config.compute_dtype)

    def _heads(self, x, module, w, bias=None, norm=None):
        """One projection of `module` (the experts: [B, T, N, heads, Dh]; the shared K/V:
        [B, T, K, Dh]) with its bias and q/k norm, if the config has them."""
        stacked = module is self.experts
        h = jnp.einsum('btd,nd...->btn...' if stacked else 'btd,d...->bt...', x, self._weight(getattr(module, w)))
        scale = optional(module, norm)
        if stacked and scale is not None:
            scale = scale[:, None, :]  # [N, Dh] -> [N, 1, Dh]: one scale per expert, for all its heads
        return head_extras(h, optional(module, bias), scale, self.config.norm_eps)

    def _attend(self, q, k, v, positions, mask, cache, gate):
        freqs = rope_frequencies(self.config)
        # Whatever the kernel (ModelConfig.attention_impl), the gate multiplies its output per head.
        return attend(rope(q, positions, freqs), rope(k, positions, freqs), v, positions, mask, cache,
                      gate=gate, window=self.config.sliding_window, impl=self.config.attention_impl)

    def _expert_kv(self, x, q, gates, positions, mask, cache):
        # Heads ordered (expert, head): query head j*H + h falls in K/V group j*K + h // (H/K),
        # i.e. expert j's query heads read expert j's K/V heads, as grouped-query attention does.
        batch, length, n, heads, head_dim = q.shape
        k = self._heads(x, self.experts, 'wk', 'bk', 'k_norm').reshape(batch, length, -1, head_dim)
        v = self._heads(x, self.experts, 'wv', 'bv').reshape(batch, length, -1, head_dim)
        out, cache = self._attend(q.reshape(batch, length, n * heads, head_dim), k, v, positions, mask, cache,
                                  gate=jnp.repeat(gates, heads, axis=-1))  # [B, T, N*H]
        return jnp.einsum('btnhx,nhxd->btd', out.reshape(q.shape), self._weight(self.experts.wo)), cache

    def _shared_kv(self, x, q, gates, positions, mask, cache):
        # Heads ordered (K/V head, expert, head within its group): the readers of each shared
        # K/V head are contiguous, the layout grouped-query attention expects.
        batch, length, n, heads, head_dim = q.shape
        kv = self.config.num_kv_heads
        group = heads // kv
        k, v = self._heads(x, self, 'wk', 'bk', 'k_norm'), self._heads(x, self, 'wv', 'bv')
        q = q.reshape(batch, length, n, kv, group, head_dim).transpose(0, 1, 3, 2, 4, 5)
        head_gates = jnp.broadcast_to(gates[:, :, None, :, None], q.shape[:-1])
        out, cache = self._attend(q.reshape(batch, length, -1, head_dim), k, v, positions, mask, cache,
                                  gate=head_gates.reshape(batch, length, -1))
        wo = self._weight(self.experts.wo).reshape(n, kv, group, head_dim, -1)
        return jnp.einsum('btknhx,nkhxd->btd', out.reshape(q.shape), wo), cache
