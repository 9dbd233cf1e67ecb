"""Routed FFN experts (BTX, BAM): a router picks experts for each token, the chosen SwiGLU
experts run on it, and their outputs are summed, weighted by the gates.

Weights (docs/checkpoint_format.md): router/kernel [D, E]; experts/wi_gate and experts/wi_up
[E, D, F]; experts/wo [E, F, D]. With expert_split C, E = num_experts * C and F = d_ff / C.

Three computations of the same function:
  dispatch  training's token choice with a capacity (top_k, sample_top1). Inside
            jax.shard_map every device sorts its own tokens (one dispatch group) into per-expert
            buffers of `capacity` slots; jax.lax.all_to_all over the mesh axis `expert` sends
            each buffer to the device that holds the expert, the experts run, a second
            all_to_all brings the outputs back, and each token sums its experts' outputs. An
            assignment past its expert's capacity is dropped: it adds nothing, so the token
            passes on the residual alone.
  dropless  inference's token choice (evaluation, log-likelihoods, decoding), and training's with
            MoEConfig.dropless: every assignment is computed, so a token's output never depends
            on its batch-mates or the device count (bam_jax/models/dropless.py). The assignments
            are sorted by expert and each projection is one grouped matmul (jax.lax.ragged_dot)
            over them; with the experts spread over the mesh axis `expert`, an all_to_all of
            worst-case buffers (each big enough for all of a device's assignments) carries them
            to the experts' devices and another brings the outputs home, where each token
            gathers and sums its own. A handful of assignments (no more than there are experts:
            decoding a few rows) instead gathers each one's expert weights and multiplies them
            directly, so a step reads only the chosen experts' weights.
  dense     every expert on every token, weighted by the gates (zero for unchosen experts).
            It is the algorithm for soft routing, and the reference the tests check dispatch by.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bam_jax.models.config import ModelConfig
from bam_jax.models.dropless import dropless_group
from bam_jax.models.layers import param
from bam_jax.models.routing import Router, combine_weights, report, route, router_aux
from bam_jax.models.sublayer import Context, Sublayer
from bam_jax.parallel.sharding import logical_to_spec


class SwiGLUExperts(nnx.Module):
    """E SwiGLU FFNs with stacked weights: wi_gate, wi_up [E, D, F], wo [E, F, D]."""

    def __init__(self, num_experts: int, d_ff: int, config: ModelConfig, *, rngs: nnx.Rngs):
        e, d, wd = num_experts, config.d_model, config.weight_dtype
        init = nnx.initializers.normal(config.init_std)
        out_init = nnx.initializers.normal(config.init_std / (2 * config.num_layers) ** 0.5)
        self.wi_gate = param(rngs, init, (e, d, d_ff), wd, ('experts', 'embed', 'mlp'))
        self.wi_up = param(rngs, init, (e, d, d_ff), wd, ('experts', 'embed', 'mlp'))
        self.wo = param(rngs, out_init, (e, d_ff, d), wd, ('experts', 'mlp', 'embed'))

    def weights(self, dtype):
        return tuple(w[...].astype(dtype) for w in (self.wi_gate, self.wi_up, self.wo))


def swiglu_experts(x, wi_gate, wi_up, wo):
    """Expert e on its own rows. x: [E, C, D] -> [E, C, D]."""
    hidden = jax.nn.silu(jnp.einsum('ecd,edf->ecf', x, wi_gate)) * jnp.einsum('ecd,edf->ecf', x, wi_up)
    return jnp.einsum('ecf,efd->ecd', hidden, wo)


def dense_experts(x, combine, wi_gate, wi_up, wo):
    """Every expert on every token, weighted. x: [N, D]; combine: [N, E] -> [N, D] (x's dtype)."""
    hidden = jax.nn.silu(jnp.einsum('nd,edf->nef', x, wi_gate)) * jnp.einsum('nd,edf->nef', x, wi_up)
    out = jnp.einsum('nef,efd->ned', hidden, wo)
    return jnp.einsum('ne,ned->nd', combine, out.astype(jnp.float32)).astype(x.dtype)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert in one dispatch group: ceil(factor * tokens * k / experts)."""
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def assign_slots(expert_index, num_experts: int, capacity: int):
    """Each assignment's slot in its expert's buffer, all first choices before any second one.

    expert_index: [N, K]. Returns (slot [N, K] int32, keep [N, K] bool): slot is
    expert * capacity + position for a kept assignment, and num_experts * capacity (one
    overflow slot past the buffers) for one dropped because its expert was full.
    """
    n, k = expert_index.shape
    one_hot = jax.nn.one_hot(expert_index.T.reshape(-1), num_experts, dtype=jnp.int32)  # [K*N, E]
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1).reshape(k, n).T
    keep = position < capacity
    return jnp.where(keep, expert_index * capacity + position, num_experts * capacity), keep


def dispatch_group(x, expert_index, gate, weights, *, num_experts: int, capacity_factor: float,
                   expert_axis: str | None = None, tensor_axis: str | None = None):
    """Token-choice experts for one dispatch group (one device's tokens inside shard_map).

    x: [b, T, D]; expert_index, gate: [b, T, K]; weights: this device's expert weights
    ([E or E/ep, D, F or F/tp], ...). expert_axis: the mesh axis the experts are spread over
    (all_to_all), or None when every expert is local. tensor_axis: the axis F is split over.
    Returns (y [b, T, D], keep [b, T, K]).
    """
    b, t, d = x.shape
    k = expert_index.shape[-1]
    n = b * t
    capacity = expert_capacity(n, num_experts, k, capacity_factor)
    slot, keep = assign_slots(expert_index.reshape(n, k), num_experts, capacity)
    # Which token fills each slot; empty slots (and the overflow slot) read a zero row.
    token = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, k))
    slot_token = jnp.full((num_experts * capacity + 1,), n, jnp.int32).at[slot.reshape(-1)].set(token.reshape(-1))
    rows = jnp.concatenate([x.reshape(n, d), jnp.zeros((1, d), x.dtype)])
    buffers = rows[slot_token[:-1]].reshape(num_experts, capacity, d)
    if expert_axis:  # [E, C, D] -> [E/ep, ep*C, D]: each device gets its experts' slots from all
        buffers = jax.lax.all_to_all(buffers, expert_axis, 0, 1, tiled=True)
    out = swiglu_experts(buffers, *weights)
    if expert_axis:
        out = jax.lax.all_to_all(out, expert_axis, 1, 0, tiled=True)
    out = jnp.concatenate([out.reshape(num_experts * capacity, d), jnp.zeros((1, d), out.dtype)])
    weight = gate.reshape(n, k) * keep
    y = jnp.einsum('nk,nkd->nd', weight, out[slot].astype(jnp.float32))
    if tensor_axis:  # each device holds a slice of F: sum the partial outputs (after combining: fewer rows)
        y = jax.lax.psum(y, tensor_axis)
    return y.astype(x.dtype).reshape(b, t, d), keep.reshape(b, t, k)


def _over_mesh(group_fn, x, expert_index, gate, weights, num_outputs: int):
    """group_fn(x, expert_index, gate, weights, expert_axis=, tensor_axis=) over the current mesh
    (jax.set_mesh), one group per batch shard. Without a mesh, the whole batch is one group."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return group_fn(x, expert_index, gate, weights)
    batch = logical_to_spec(('batch', None, None), x.shape, mesh)
    wi = logical_to_spec(('experts', None, 'mlp'), weights[0].shape, mesh)
    batch_axes = batch[0] if isinstance(batch[0], tuple) else (batch[0],)
    # Tokens must be split over the same axis as the experts to exchange them; otherwise gather.
    expert_axis = 'expert' if wi[0] == 'expert' and 'expert' in batch_axes else None
    tensor_axis = wi[2]
    wi = jax.sharding.PartitionSpec(expert_axis, None, tensor_axis)
    wo = jax.sharding.PartitionSpec(expert_axis, tensor_axis, None)
    run = functools.partial(group_fn, expert_axis=expert_axis, tensor_axis=tensor_axis)
    out_specs = batch if num_outputs == 1 else (batch,) * num_outputs
    sharded = jax.shard_map(run, mesh=mesh, in_specs=(batch, batch, batch, (wi, wi, wo)), out_specs=out_specs)
    return sharded(x, expert_index, gate, weights)


def dispatch(x, expert_index, gate, weights, *, num_experts: int, capacity_factor: float):
    """dispatch_group over the current mesh: (y [B, T, D], keep [B, T, K])."""
    group = functools.partial(dispatch_group, num_experts=num_experts, capacity_factor=capacity_factor)
    return _over_mesh(group, x, expert_index, gate, weights, num_outputs=2)


def dropless(x, expert_index, gate, weights):
    """dropless_group over the current mesh: y [B, T, D]."""
    return _over_mesh(dropless_group, x, expert_index, gate, weights, num_outputs=1)


class MoEFeedForward(Sublayer):
    """Routed SwiGLU experts in place of the dense FFN. Parameters: router/*, experts/*.

    Reports its routing losses and metrics (routing.router_aux) to routing.call_with_aux.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.moe = config.moe
        self.dtype = config.compute_dtype
        self.num_experts = config.moe.num_routed_experts
        self.router = Router(self.num_experts, config, rngs=rngs)
        self.experts = SwiGLUExperts(self.num_experts, config.d_ff // config.moe.expert_split, config, rngs=rngs)

    def __call__(self, x, context: Context, cache=None):
        """x: [B, T, D] -> (y [B, T, D], None): the sublayer protocol. Reads context.train
        (sampled routing with context.rng, and a capacity unless moe.dropless; otherwise
        dropless); it keeps no decoding state."""
        x = x.astype(self.dtype)
        train = context.train
        logits = self.router(x)
        index, gate, probs = route(logits, self.moe, context.rng if train else None)
        weights = self.experts.weights(self.dtype)
        dropped = 0.0
        if self.moe.routing == 'soft':
            combine = combine_weights(index, gate, self.num_experts)
            y = dense_experts(x.reshape(-1, x.shape[-1]), combine.reshape(-1, self.num_experts), *weights)
            y = y.reshape(x.shape)
        elif train and not self.moe.dropless:
            y, keep = dispatch(x, index, gate, weights, num_experts=self.num_experts,
                               capacity_factor=self.moe.capacity_factor_train)
            dropped = jnp.mean(~keep, dtype=jnp.float32)  # exactly 0 when nothing is dropped
        else:
            y = dropless(x, index, gate, weights)
        report(self, router_aux(logits, probs, index, self.moe, dropped))
        return y, cache
