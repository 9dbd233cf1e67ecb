"""The loss, the jit-compiled train step (with gradient accumulation) and the eval step.

The training objective is the token-mean NLL plus the routed layers' weighted auxiliary
losses (load balancing, z-loss), each a per-layer mean over the batch's tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bam_jax.models.params import Params, merge_params
from bam_jax.models.routing import call_with_aux
from bam_jax.train.optimizer import trainable_mask


def cross_entropy(logits, targets, weights):
    """Summed token NLL and the token count. logits: [B, T, V] f32; targets, weights: [B, T]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights), jnp.sum(weights)


def forward(graphdef: nnx.GraphDef, params: Params, batch, *, train: bool = False, rng=None):
    """(summed NLL, token count, {routed layer: router_aux dict}) of one batch."""
    model = merge_params(graphdef, params)
    logits, aux = call_with_aux(model, batch['inputs'], batch['segment_ids'], batch['positions'],
                                train=train, rng=rng)
    nll, count = cross_entropy(logits, batch['targets'], batch['loss_weights'])
    return nll, count, aux


def total_aux_loss(aux: dict) -> jax.Array:
    """Sum of the routed layers' weighted losses (0 for a dense model)."""
    return sum((layer['loss'] for layer in aux.values()), jnp.zeros((), jnp.float32))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    accum_steps: int, trainable: str = '') -> Callable:
    """train_step(params, opt_state, batch, rng) -> (params, opt_state, metrics).

    trainable: TrainConfig.trainable; the parameters it does not match come out as they went in,
    bit for bit.
    The batch is cut into `accum_steps` micro-batches, scanned in order; the gradient is that
    of the token-weighted mean loss over the whole batch, so accumulation changes memory, not
    the result (up to float summation order; the auxiliary losses are per micro-batch).
    rng: a key for sampled routing. metrics: loss (the NLL), aux_loss, grad_norm, param_norm,
    tokens, and router: {layer: router_aux} averaged over the micro-batches.
    """
    def objective(params, batch, rng):
        nll, count, aux = forward(graphdef, params, batch, train=True, rng=rng)
        # Weighted by the tokens so that dividing by the batch's token count gives the mean.
        return nll + count * total_aux_loss(aux), (nll, count, aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(params, opt_state, batch, rng):
        micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

        def accumulate(carry, inputs):
            (_, (nll, count, aux)), grads = grad_fn(params, *inputs)
            total_nll, total_count, total_aux, total_grads = carry
            return (total_nll + nll, total_count + count, jax.tree.map(jnp.add, total_aux, aux),
                    jax.tree.map(jnp.add, total_grads, grads)), None

        keys = jax.random.split(rng, accum_steps)
        first = jax.tree.map(lambda x: x[0], micro)
        aux_shapes = jax.eval_shape(lambda: objective(params, first, rng)[1][2])
        aux_zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shapes)
        zeros = jax.tree.map(jnp.zeros_like, params)
        (nll, count, aux, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, aux_zeros, zeros), (micro, keys))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        params = jax.tree.map(lambda t, p, n: n if t else p, trainable_mask(params, trainable), params, new)
        aux = jax.tree.map(lambda x: x / accum_steps, aux)
        metrics = {
            'loss': nll / count,
            'aux_loss': total_aux_loss(aux),
            'grad_norm': optax.tree.norm(grads),
            'param_norm': optax.tree.norm(params),
            'tokens': count,
            'router': aux,
        }
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """eval_step(params, batch) -> (summed NLL, token count, {routed layer: router_aux}), routers in
    evaluation mode."""
    return lambda params, batch: forward(graphdef, params, batch)
