"""AdamW with linear warmup, cosine decay to a fraction of the peak, and global-norm clipping;
with TrainConfig.trainable, for the parameters it matches only (the others get no update and no
optimizer state)."""

from __future__ import annotations

import re

import jax
import optax

from bam_jax.train.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    peak = config.peak_learning_rate
    warmup = min(config.warmup_steps, config.train_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(config.train_steps, warmup + 1), end_value=peak * config.end_lr_fraction)


def _decay_mask(params):
    # Norm scales (1-D) are not decayed: shrinking them towards 0 only hurts.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def trainable_mask(params, pattern: str):
    """A tree of bools like params: whether each parameter trains ('' : all of them)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not pattern or re.search(pattern, '/'.join(str(k.key) for k in path)) is not None, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                    eps=config.adam_eps, weight_decay=config.weight_decay, mask=_decay_mask),
    )
    if not config.trainable:
        return adamw
    labels = lambda params: jax.tree.map(lambda t: 'train' if t else 'freeze',  # noqa: E731
                                         trainable_mask(params, config.trainable))
    return optax.multi_transform({'train': adamw, 'freeze': optax.set_to_zero()}, labels)
