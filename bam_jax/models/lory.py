"""Lory: fully differentiable FFN experts, merged in parameter space per segment.

Instead of sending each token to its top-k experts, Lory averages the experts' *weights*,
theta_bar = sum_e w_e * theta_e with w = softmax(router(h)), and runs one SwiGLU with theta_bar,
so the layer is differentiable everywhere and needs no load balancing or capacity. One merge per
token would cost E FFNs, so a sequence is cut into segments of T tokens and every token of
segment k uses the merge chosen from the mean hidden state of segment k-1 (causal: nothing in
segment k decides its own weights). Segment 1 has no predecessor and routes on its own mean,
with the gradient stopped at its merge weights. The merge adds about E / T of an FFN per token.
At inference one decision per row from the prompt's mean serves every position.

Weights are the MoE FFN's (docs/checkpoint_format.md): router/kernel [D, E]; experts/wi_gate
and experts/wi_up [E, D, F]; experts/wo [E, F, D].
Shapes: B batch, L length, S segments, T segment length, D d_model, F d_ff, E experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bam_jax.models.config import ModelConfig
from bam_jax.models.moe import SwiGLUExperts
from bam_jax.models.routing import Router, report
from bam_jax.models.sublayer import Context, Sublayer


def masked_mean(x, mask, axis):
    """Mean of x over `axis` where mask is set, in float32; zero where nothing is set (not NaN).

    x: [..., N, ...]; mask: x's shape without the trailing dims (broadcast on the right).
    """
    mask = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    total = jnp.sum(x.astype(jnp.float32) * mask, axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def merge_experts(merge, wi_gate, wi_up, wo, dtype) -> dict:
    """The experts' weights averaged by `merge`, in float32, then cast to `dtype`.

    merge: [B, S, E] float32; expert weights float32 [E, D, F], [E, D, F], [E, F, D].
    Returns {'wi_gate', 'wi_up': [B, S, D, F], 'wo': [B, S, F, D]}: one FFN per (row, segment).
    """
    return {name: jnp.einsum('bse,e...->bs...', merge, w).astype(dtype)
            for name, w in (('wi_gate', wi_gate), ('wi_up', wi_up), ('wo', wo))}


def merged_swiglu(x, merged: dict):
    """Each (row, segment)'s own SwiGLU. x: [B, S, T, D]; merged: merge_experts' -> [B, S, T, D]."""
    x = x.astype(merged['wo'].dtype)
    hidden = (jax.nn.silu(jnp.einsum('bstd,bsdf->bstf', x, merged['wi_gate']))
              * jnp.einsum('bstd,bsdf->bstf', x, merged['wi_up']))
    return jnp.einsum('bstf,bsfd->bstd', hidden, merged['wo'])


class LoryFeedForward(Sublayer):
    """Segment-routed merged SwiGLU experts in place of the dense FFN. Parameters: router/*, experts/*.
    Decoding caches each row's merged FFN, merged once from its prompt at prefill, so a generated
    token costs what a dense token costs: wi_gate, wi_up [B, 1, D, F], wo [B, 1, F, D].

    Reports its router z-loss and metrics (the keys of routing.router_aux) to routing.call_with_aux.
    """

    WHOLE_PROMPT_PREFILL = True  # the merge reads the whole prompt
    CACHE_AXES = {'wi_gate': ('batch', None, 'embed', 'mlp'), 'wi_up': ('batch', None, 'embed', 'mlp'),
                  'wo': ('batch', None, 'mlp', 'embed')}

    @classmethod
    def cache_spec(cls, config: ModelConfig, batch: int, max_len: int) -> dict:
        d, f, dt = config.d_model, config.d_ff, config.compute_dtype
        into, out = jax.ShapeDtypeStruct((batch, 1, d, f), dt), jax.ShapeDtypeStruct((batch, 1, f, d), dt)
        return {'wi_gate': into, 'wi_up': into, 'wo': out}

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.lory = config.lory
        self.dtype = config.compute_dtype
        self.num_experts = config.lory.num_experts
        self.router = Router(self.num_experts, config, rngs=rngs)
        self.experts = SwiGLUExperts(self.num_experts, config.d_ff, config, rngs=rngs)

    def __call__(self, x, context: Context, cache=None):
        """x: [B, L, D] -> (y [B, L, D], cache): the sublayer protocol. Reads
        context.segment_ids ([B, L], 0 = padding, left out of every mean) and .prompt_len.

        prompt_len (int or [B]): inference; one merge per row from the mean of its first
        prompt_len tokens, used at every position. None: training-time segment routing.
        cache (decoding): a row's merged FFN, as merge_experts returns it with S = 1. With
        prompt_len (the prefill) it is computed and returned; without, the cached FFN serves
        the new tokens, at a dense FFN's cost. Lory neither samples nor drops.
        """
        segment_ids, prompt_len = context.segment_ids, context.prompt_len
        batch, length, d = x.shape
        x = x.astype(self.dtype)
        if cache is not None and prompt_len is None:
            return merged_swiglu(x[:, None], cache)[:, 0], cache
        real = segment_ids > 0
        if prompt_len is None:
            t = self.lory.segment_len
            num_segments = -(-length // t)
            pad = num_segments * t - length
            x_seg = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(batch, num_segments, t, d)
            real = jnp.pad(real, ((0, 0), (0, pad))).reshape(batch, num_segments, t)
            logits = self.router(masked_mean(x_seg, real, axis=2))  # [B, S, E]
            # Segment k merges by segment k-1's router output; segment 1 by its own, which sees
            # its own future tokens, so no gradient flows through that choice.
            logits = jnp.concatenate([jax.lax.stop_gradient(logits[:, :1]), logits[:, :-1]], axis=1)
        else:
            x_seg = x[:, None]  # the whole row is one segment
            prompt = real & (jnp.arange(length) < jnp.reshape(jnp.asarray(prompt_len), (-1, 1)))
            logits = self.router(masked_mean(x, prompt, axis=1))[:, None]  # [B, 1, E]
            real = real[:, None]
        merge = jax.nn.softmax(logits, axis=-1)
        merged = merge_experts(merge, *self.experts.weights(jnp.float32), self.dtype)
        y = merged_swiglu(x_seg, merged).reshape(batch, -1, d)[:, :length]
        report(self, self.aux(logits, merge, jnp.any(real, axis=-1)))
        return y, (None if cache is None else merged)

    def aux(self, logits, merge, used) -> dict:
        """routing.router_aux's keys over the merges that segments with a real token use.

        logits, merge: [B, S, E] (each segment's own decision, already shifted); used: [B, S].
        load is the mean merge weight per expert.
        """
        z = masked_mean(jax.nn.logsumexp(logits, axis=-1) ** 2, used, axis=(0, 1))
        entropy = -jnp.sum(merge * jnp.log(jnp.maximum(merge, 1e-30)), axis=-1)
        return {
            'loss': self.lory.z_loss_weight * z,
            'load_balance': jnp.zeros((), jnp.float32),
            'z_loss': z,
            'entropy': masked_mean(entropy, used, axis=(0, 1)),
            'dropped_fraction': jnp.zeros((), jnp.float32),
            'load': masked_mean(merge, used, axis=(0, 1)),
        }
