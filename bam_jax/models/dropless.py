"""Dropless routed experts: every token-expert assignment is computed, in training and inference.

Shapes: one group (one device's tokens inside jax.shard_map) of n tokens with K choices each,
A = n*K assignments, assignment a being token a // K's choice a % K. The E experts are spread
over the ep devices of the mesh axis `expert`, L = E / ep on each (ep = 1 and L = E without it).

The grouped path (more assignments than local experts: training, evaluation, prefill):
  1. At home, the assignments are sorted by expert, so those for device j (experts j*L to
     (j+1)*L - 1) form one run. Run j fills send buffer j, of A rows: the worst case, every one of
     this device's assignments on device j's experts. Rows past the run are zeros.
  2. jax.lax.all_to_all over `expert` hands buffer j to device j, with the run's per-expert
     counts: each device receives [ep, A, D], from every source its rows for the local experts,
     sorted by expert, then padding.
  3. The receiver sorts the rows by expert across sources (padding last), runs each projection
     as one grouped matmul (jax.lax.ragged_dot) over the ep*A rows, and unsorts.
  4. A second all_to_all brings the outputs home, where each token gathers its K outputs and
     sums them, weighted by its gates, in float32.
Buffers are static, so nothing is ever dropped, at a memory price: the send and receive buffers
and the grouped matmul's rows are ep*A per device, ep times the capacity path's at factor 1
(without `expert`, ep = 1: A rows, no padding). jax.lax.ragged_all_to_all could send the runs
alone, but XLA:CPU does not implement it, and the worst-case all_to_all runs on every backend.

Each movement of rows is a gather through an injective index (`take`), and so is its gradient
(a gather through the inverse index), where JAX would transpose a gather into a scatter-add.

A handful of assignments (no more than a device's experts: decoding a few rows) instead gathers
each one's expert weights and multiplies them directly, so a step reads only the chosen experts'
weights; across `expert`, every device gathers the axis's few tokens and a reduce-scatter sums
their outputs back home.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def take(x, index, inverse):
    """Rows x[index], zero where index == R. x: [R, ...]; index: [S], injective; inverse: [R], the
    row of the result each row of x went to (S: none). Returns [S, ...].

    Its gradient is take(g, inverse, index): a gather, where a gather's transpose is a scatter-add.
    A permutation and its inverse (its transpose) are the common case.
    """
    return jnp.take(x, index, axis=0, mode='fill', fill_value=0)


def _take_fwd(x, index, inverse):
    return take(x, index, inverse), (index, inverse)


def _take_bwd(residuals, g):
    index, inverse = residuals
    return take(g, inverse, index), None, None


take.defvjp(_take_fwd, _take_bwd)


def sort_order(keys):
    """(keys sorted, the stable order that sorts them). keys: [S] int."""
    return jax.lax.sort((keys, jnp.arange(keys.shape[0], dtype=jnp.int32)), num_keys=1, is_stable=True)


def inverse_permutation(perm):
    """perm's inverse, by a sort rather than a scatter. perm: [S], a permutation of range(S)."""
    return sort_order(perm)[1]


def send_slots(index, num_experts: int, ep: int):
    """Where each assignment goes in the send buffers [ep, A, D] (device j's in buffer j, by expert).

    index: [A] int, each assignment's expert. Returns slot [A] (j * A + row in buffer j), source
    [ep * A] (the assignment in each buffer row; A for padding) and counts [ep, L] (assignments per
    expert of each device).
    """
    a = index.shape[0]
    local = num_experts // ep
    keys, order = sort_order(index)
    starts = jnp.searchsorted(keys, jnp.arange(num_experts + 1, dtype=keys.dtype), side='left')  # [E + 1]
    counts = jnp.diff(starts).reshape(ep, local)
    first = starts[:-1:local]  # [ep]: where device j's run starts in the sorted order
    device = index // local
    slot = device * a + inverse_permutation(order) - first[device]
    row = jnp.arange(a, dtype=jnp.int32)
    taken = jnp.take(order, first[:, None] + row, mode='clip')  # [ep, A]
    source = jnp.where(row < jnp.sum(counts, axis=1)[:, None], taken, a)
    return slot, source.reshape(-1), counts


def local_experts(rows, counts, weights):
    """This device's L experts on the rows it received. rows: [ep, A, D], from each source its rows
    for experts 0 .. L-1 in order (counts [ep, L] of them), then zeros. Returns [ep, A, D]."""
    ep, a, d = rows.shape
    if ep == 1:  # one source: the rows are already sorted by expert
        return grouped_swiglu(rows[0], counts[0], weights)[None]
    ends = jnp.cumsum(counts, axis=1)
    row = jnp.arange(a, dtype=ends.dtype)
    expert = jax.vmap(lambda e: jnp.searchsorted(e, row, side='right'))(ends)  # [ep, A]; L for padding
    order = sort_order(expert.reshape(-1).astype(jnp.int32))[1]
    inverse = inverse_permutation(order)
    out = grouped_swiglu(take(rows.reshape(ep * a, d), order, inverse), jnp.sum(counts, axis=0), weights)
    return take(out, inverse, order).reshape(ep, a, d)


def routed(x, expert_index, gate, weights, expert_axis: str | None):
    """The grouped path. x: [n, D]; expert_index, gate: [n, K] -> float32 [n, D]."""
    n, d = x.shape
    k = expert_index.shape[1]
    ep = jax.lax.axis_size(expert_axis) if expert_axis else 1
    slot, source, counts = send_slots(expert_index.reshape(-1), ep * weights[0].shape[0], ep)
    rows = jnp.broadcast_to(x[:, None], (n, k, d)).reshape(n * k, d)  # its transpose: a sum over K
    send = take(rows, source, slot).reshape(ep, n * k, d)
    if expert_axis:  # buffer j to device j; device j's buffers from every source, in source order
        send = jax.lax.all_to_all(send, expert_axis, 0, 0, tiled=True)
        counts = jax.lax.all_to_all(counts, expert_axis, 0, 0, tiled=True)
    out = local_experts(send, counts, weights)
    if expert_axis:
        out = jax.lax.all_to_all(out, expert_axis, 0, 0, tiled=True)
    out = take(out.reshape(-1, d), slot, source).reshape(n, k, d)
    # Elementwise, not a matmul: float32 exactly on every backend (K is small).
    return jnp.sum(gate[..., None] * out.astype(jnp.float32), axis=1)


def handful(x, expert_index, gate, weights, expert_axis: str | None):
    """A few assignments through their experts' gathered weights. x: [n, D]; expert_index, gate:
    [n, K] -> float32 [n, D]."""
    d, k = x.shape[1], expert_index.shape[1]
    rows, index = x, expert_index
    if expert_axis:  # every device sees the tokens of the whole axis, for its own experts
        rows, index, gate = (jax.lax.all_gather(v, expert_axis, tiled=True) for v in (rows, index, gate))
    local = weights[0].shape[0]
    if expert_axis:
        index = index - jax.lax.axis_index(expert_axis) * local
    mine = (index >= 0) & (index < local)
    rows = jnp.broadcast_to(rows[:, None], (rows.shape[0], k, d)).reshape(-1, d)
    out = chosen_swiglu(rows, jnp.where(mine, index, 0).reshape(-1), weights).reshape(-1, k, d)
    y = jnp.sum(jnp.where(mine, gate, 0.0)[..., None] * out.astype(jnp.float32), axis=1)
    if expert_axis:  # each token's partial sums, from every device, back to its own device
        y = jax.lax.psum_scatter(y, expert_axis, scatter_dimension=0, tiled=True)
    return y


def dropless_group(x, expert_index, gate, weights, *, expert_axis: str | None = None,
                   tensor_axis: str | None = None):
    """Token-choice experts with no capacity, for one group (one device's tokens in shard_map).

    x: [b, T, D]; expert_index, gate: [b, T, K]; weights: this device's expert weights
    ([E or E/ep, D, F or F/tp], ...). expert_axis: the mesh axis the experts are spread over
    (all_to_all), or None when every expert is local. tensor_axis: the axis F is split over.
    Returns y [b, T, D].
    """
    b, t, d = x.shape
    k = expert_index.shape[-1]
    ep = jax.lax.axis_size(expert_axis) if expert_axis else 1
    # Inference takes the all_to_all path too: it runs the same ep*A rows through the grouped
    # matmuls as gathering the axis's tokens and reduce-scattering their sums would, moves ep*A
    # rows in the compute dtype each way instead of ep*n rows plus ep*n float32 partial sums, and
    # sums each token's K outputs at home in a fixed order, whatever the device count.
    path = handful if ep * b * t * k <= weights[0].shape[0] else routed
    y = path(x.reshape(-1, d), expert_index.reshape(-1, k), gate.reshape(-1, k), weights, expert_axis)
    if tensor_axis:  # each device holds a slice of F: sum the partial outputs (after combining: fewer rows)
        y = jax.lax.psum(y, tensor_axis)
    return y.astype(x.dtype).reshape(b, t, d)


def grouped_swiglu(rows, sizes, weights):
    """Rows sorted by expert, sizes[e] of them for expert e (rows past them: zeros). [R, D] -> [R, D]."""
    wi_gate, wi_up, wo = weights
    hidden = jax.nn.silu(jax.lax.ragged_dot(rows, wi_gate, sizes)) * jax.lax.ragged_dot(rows, wi_up, sizes)
    return jax.lax.ragged_dot(hidden, wo, sizes)


def chosen_swiglu(rows, expert, weights):
    """Row r through expert[r], with that expert's weights gathered. [R, D] -> [R, D]."""
    wi_gate, wi_up, wo = (w[expert] for w in weights)
    hidden = jax.nn.silu(jnp.einsum('rd,rdf->rf', rows, wi_gate)) * jnp.einsum('rd,rdf->rf', rows, wi_up)
    return jnp.einsum('rf,rfd->rd', hidden, wo)
