"""The loss, the jit-compiled train step (with gradient accumulation) and the eval step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bam_jax.models.params import Params, merge_params


def cross_entropy(logits, targets, weights):
    """Summed token NLL and the token count. logits: [B, T, V] f32; targets, weights: [B, T]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights), jnp.sum(weights)


def summed_loss(graphdef: nnx.GraphDef, params: Params, batch) -> tuple[jax.Array, jax.Array]:
    model = merge_params(graphdef, params)
    logits = model(batch['inputs'], batch['segment_ids'], batch['positions'])
    return cross_entropy(logits, batch['targets'], batch['loss_weights'])


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    accum_steps: int) -> Callable:
    """train_step(params, opt_state, batch) -> (params, opt_state, metrics).

    The batch is cut into `accum_steps` micro-batches, scanned in order; the gradient is that
    of the token-weighted mean loss over the whole batch, so accumulation changes memory, not
    the result (up to float summation order).
    """
    grad_fn = jax.value_and_grad(lambda p, b: summed_loss(graphdef, p, b), has_aux=True)

    def train_step(params, opt_state, batch):
        micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

        def accumulate(carry, micro_batch):
            (nll, count), grads = grad_fn(params, micro_batch)
            total_nll, total_count, total_grads = carry
            return (total_nll + nll, total_count + count,
                    jax.tree.map(jnp.add, total_grads, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (nll, count, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            'loss': nll / count,
            'grad_norm': optax.tree.norm(grads),
            'param_norm': optax.tree.norm(params),
            'tokens': count,
        }
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """eval_step(params, batch) -> (summed NLL, token count)."""
    return lambda params, batch: summed_loss(graphdef, params, batch)
