"""Routers for expert layers: a linear router in float32, the gating modes, and the auxiliary
losses and metrics as pure functions.

Shapes: N tokens (any leading dims), E experts, K experts chosen per token.

Gating modes (RoutedConfig.routing):
  top_k        the K highest logits; gate 'softmax' keeps their softmax probabilities over all
               E experts (BAM, Switch), gate 'renormalize' takes a softmax over the K kept
               logits (BTX, Mixtral), so the gates sum to one.
  soft         every expert, weighted by the softmax (K = E).
  sample_top1  one expert per token drawn from the softmax with Gumbel noise while training
               (BTX's ablation); the arg-max in evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bam_jax.models.config import ModelConfig, RoutedConfig
from bam_jax.models.layers import param


class Router(nnx.Module):
    """logits = x @ kernel in float32. Weight: kernel [D, E], logical axes (embed, route)."""

    def __init__(self, num_experts: int, config: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.init_std)
        self.kernel = param(rngs, init, (config.d_model, num_experts), jnp.float32, ('embed', 'route'))

    def __call__(self, x):
        """x: [..., D] -> float32 logits [..., E]."""
        return jnp.einsum('...d,de->...e', x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))


def route(logits, config: RoutedConfig, rng=None):
    """Chooses experts for every token.

    logits: [..., E] float32. rng: a key for sample_top1's Gumbel noise (None: arg-max).
    Returns (expert_index [..., K] int32, gate [..., K] float32, probs [..., E] float32).
    """
    probs = jax.nn.softmax(logits, axis=-1)
    num_experts = logits.shape[-1]
    if config.routing == 'soft':
        index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), logits.shape)
        return index, probs, probs
    if config.routing == 'sample_top1':
        noisy = logits if rng is None else logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
        kept, index = jax.lax.top_k(noisy, 1)
        kept = jnp.take_along_axis(logits, index, axis=-1)
    else:
        kept, index = jax.lax.top_k(logits, config.top_k)
    if config.gate == 'renormalize':
        gate = jax.nn.softmax(kept, axis=-1)
    else:
        gate = jnp.take_along_axis(probs, index, axis=-1)
    return index.astype(jnp.int32), gate, probs


def combine_weights(expert_index, gate, num_experts: int):
    """The gates as a dense [..., E] matrix (zero for experts a token does not use)."""
    return jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=gate.dtype) * gate[..., None], axis=-2)


def load_fractions(expert_index, num_experts: int):
    """Fraction of the N*K token-expert assignments each expert receives: [E], sums to one."""
    one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
    return jnp.mean(one_hot.reshape(-1, num_experts), axis=0)


def load_balance_loss(probs, expert_index):
    """Switch load-balancing loss, E * sum_e f_e * P_e.

    f_e: fraction of assignments routed to expert e (load_fractions); P_e: mean router
    probability of expert e. It is 1 when both are uniform. probs: [..., E]; expert_index: [..., K].
    """
    num_experts = probs.shape[-1]
    mean_probs = jnp.mean(probs.reshape(-1, num_experts), axis=0)
    return num_experts * jnp.sum(load_fractions(expert_index, num_experts) * mean_probs)


def z_loss(logits):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [..., E]."""
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def router_entropy(probs):
    """Mean over tokens of the router distribution's entropy, in nats. probs: [..., E]."""
    return jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


def router_aux(logits, probs, expert_index, config: RoutedConfig, dropped_fraction=0.0) -> dict:
    """The losses and metrics every routed layer reports.

    'loss' is the weighted sum the trainer adds to the NLL; the rest are for logging:
    load_balance and z_loss (unweighted), entropy, dropped_fraction and load [E]: the share
    of assignments per expert, or for soft routing, where every expert sees every token, the
    mean gate.
    """
    balance, z = load_balance_loss(probs, expert_index), z_loss(logits)
    num_experts = probs.shape[-1]
    if config.routing == 'soft':
        load = jnp.mean(probs.reshape(-1, num_experts), axis=0)
    else:
        load = load_fractions(expert_index, num_experts)
    return {
        'loss': config.load_balance_weight * balance + config.z_loss_weight * z,
        'load_balance': balance,
        'z_loss': z,
        'entropy': router_entropy(probs),
        'dropped_fraction': jnp.asarray(dropped_fraction, jnp.float32),
        'load': load,
    }


class RouterInput(nnx.Intermediate):
    """A block's attention or FFN input: what its router sees (the normed hidden state). Recorded
    only for a capture of this type (router initialisation, bam_jax/upcycle/router_init.py);
    call_with_aux captures nnx.Intermediate itself, which never holds these."""


def record_input(block: nnx.Module, name: str, x) -> None:
    """Hands a sublayer's input [B, T, D] to an nnx.capture of RouterInput; otherwise nothing."""
    if hasattr(block, '__captures__'):
        block.sow(RouterInput, name, x)


def report(layer: nnx.Module, aux: dict) -> None:
    """Hands a routed layer's losses and metrics to call_with_aux; a plain call drops them."""
    if hasattr(layer, '__captures__'):  # set by nnx.capture for the duration of the call
        layer.sow(nnx.Intermediate, 'router_aux', aux)


def call_with_aux(module: nnx.Module, *args, **kwargs):
    """module(*args, **kwargs) and what its routed layers reported during that call.

    Returns (output, {'layers/0/ffn': router_aux(...), 'layers/0/attn': ..., ...}); the dict is
    empty for a dense model. Keys are the layers' paths ('' when module is the routed layer).
    """
    out, sown = nnx.capture(module, nnx.Intermediate)(*args, **kwargs)
    collected = {}
    for path, value in nnx.to_flat_state(sown):
        *layer, _ = path
        (aux,) = value.get_value()  # one call, one record
        collected['/'.join(map(str, layer))] = aux
    return out, collected
