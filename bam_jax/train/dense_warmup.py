"""Lory's dense warm-up: train the dense model first, then copy its FFN into every expert.

A Lory run with TrainConfig.dense_warmup_fraction > 0 trains its first round(fraction * train_steps)
steps as the same model with a dense FFN, in the sub-run WORKDIR/dense_warmup (its own checkpoints,
so it resumes on its own). At the switch the dense parameters become Lory parameters (each FFN
tiled into every expert, a fresh router from the run's seed); identical experts merge to the dense
FFN, so the model computes the same function at the switch. The Adam moments of each FFN are tiled
the same way (the router's start at zero) and the step counter carries on, so the learning-rate
schedule runs unbroken. The conversion is deterministic: a run stopped before its first Lory
checkpoint redoes it from the warm-up's final checkpoint.

For the trainer this is one of the ways a run starts (bam_jax.train.start): `start`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from bam_jax.models import abstract_model, param_shardings, split_params
from bam_jax.models.config import ModelConfig
from bam_jax.models.params import flatten, unflatten
from bam_jax.train.config import TrainConfig
from bam_jax.train.run import Run, StartState, opt_shardings
from bam_jax.upcycle.core import UpcycleSpec, build, plan
from bam_jax.workdir import RunCheckpoints, files


def start(run: Run, train_fn: Callable) -> StartState | dict:
    """Trains (or resumes) the dense warm-up in WORKDIR/dense_warmup with train_fn, then converts
    its final state to the Lory run's. Returns the warm-up's result instead when it stopped
    before the switch (stop_at_step, SIGTERM): rerunning the command continues it."""
    steps = warmup_steps(run.config, run.model)
    dense_dir = run.workdir / files.DENSE_WARMUP
    dense = train_fn(dense_dir, dataclasses.replace(run.configs, train=warmup_config(run.config, steps),
                                                    model=dense_model(run.model)))
    if dense['step'] < steps or dense['stopped'] == 'sigterm':
        return dense
    params, opt_state, data_position = _restore_dense(run, dense_dir, steps)
    lory_opt = lory_opt_state(run.model, params, opt_state, run.config.seed)
    params = lory_params(run.model, params, run.config.seed)
    print(f'step {steps}: dense warm-up done, switching to Lory with {run.model.lory.num_experts} experts '
          f'(FFN copied into each expert, Adam moments too)')
    return StartState(steps, jax.device_put(params, run.param_shardings),
                      jax.device_put(lory_opt, run.opt_shardings), data_position)


def _restore_dense(run: Run, dense_dir, step: int):
    """(params, opt_state, data_position) of the warm-up's checkpoint at `step`."""
    abstract = abstract_model(dense_model(run.model))
    _, params = split_params(abstract)
    shardings = param_shardings(abstract, run.mesh)
    opt_state = jax.eval_shape(run.optimizer.init, params)
    with RunCheckpoints(dense_dir, run.config.keep_checkpoints) as checkpoints:
        params, opt_state, train_state = checkpoints.restore(
            step, params, shardings, opt_state, opt_shardings(run.optimizer, opt_state, shardings, run.mesh))
    return params, opt_state, int(train_state['data_position'])


def warmup_steps(config: TrainConfig, model: ModelConfig) -> int:
    """Steps of the dense warm-up: 0 without Lory or without a warm-up fraction."""
    if model.lory is None or config.dense_warmup_fraction <= 0:
        return 0
    return min(round(config.dense_warmup_fraction * config.train_steps), config.train_steps)


def dense_model(model: ModelConfig) -> ModelConfig:
    return dataclasses.replace(model, lory=None)


def warmup_config(config: TrainConfig, steps: int) -> TrainConfig:
    """The sub-run's config: the whole run's schedule (train_steps), stopped at the switch.

    The budget is already resolved into train_steps: the dense model must not re-derive it.
    """
    stop = min(config.stop_at_step or steps, steps)
    return dataclasses.replace(config, stop_at_step=stop, flops_budget=None, match_run=None)


def _recipes(model: ModelConfig, dense_params: dict, seed: int):
    spec = UpcycleSpec('sparse_upcycle', 1, (0,) * model.lory.num_experts, router_seed=seed)
    flat = flatten(dense_params)
    return flat, plan(spec, dense_model(model), {k: tuple(np.shape(v)) for k, v in flat.items()})


def _convert(flat: dict, recipes: dict, zero_router: bool) -> dict:
    out = {}
    for path, recipe in recipes.items():
        if recipe.kind == 'router' and zero_router:
            out[path] = np.zeros(recipe.shape, np.float32)
        else:
            out[path] = build(recipe, lambda _, p: np.asarray(flat[p], np.float32), 1)
    return unflatten(out)


def lory_params(model: ModelConfig, dense_params: dict, seed: int) -> dict:
    """Lory parameters from the dense warm-up's: FFN tiled into the experts, a random router."""
    flat, recipes = _recipes(model, dense_params, seed)
    return _convert(flat, recipes, zero_router=False)


def lory_opt_state(model: ModelConfig, dense_params: dict, dense_opt_state, seed: int):
    """The optimizer state converted like the parameters: every parameter-shaped subtree (Adam's
    first and second moments) tiled into the experts, zero for the router; counters unchanged."""
    structure = jax.tree.structure(dense_params)
    _, recipes = _recipes(model, dense_params, seed)

    def is_params(node):
        return isinstance(node, dict) and jax.tree.structure(node) == structure

    def convert(node):
        return _convert(flatten(node), recipes, zero_router=True) if is_params(node) else node

    return jax.tree.map(convert, dense_opt_state, is_leaf=is_params)
