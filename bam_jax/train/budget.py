"""Training length from a compute budget: the papers' data-matched and compute-matched runs.

A run's length is TrainConfig.train_steps, unless one of these sets it:
  flops_budget          total training FLOPs: steps = budget / (FLOPs per token * tokens per step)
  match_run + match     'tokens': as many tokens as run X trained on (data-matched);
                        'flops': as many training FLOPs as run X spent (compute-matched).
Every run records what it trained in WORKDIR/budget.json, which is what match_run reads.
"""

from __future__ import annotations

import dataclasses
import json

from bam_jax import storage
from bam_jax.errors import BamJaxError
from bam_jax.models.config import ModelConfig
from bam_jax.models.flops import train_flops_per_token
from bam_jax.train.config import TrainConfig
from bam_jax.workdir import files, write_json_atomic


def run_budget(config: TrainConfig, model: ModelConfig, steps: int) -> dict:
    """What `steps` optimizer steps of this run cost."""
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_token = train_flops_per_token(model, config.seq_len)
    return {'steps': steps, 'tokens': steps * tokens_per_step, 'tokens_per_step': tokens_per_step,
            'flops_per_token': flops_per_token, 'flops': steps * tokens_per_step * flops_per_token}


def read_budget(workdir: str | storage.Path) -> dict:
    path = storage.path(workdir) / files.BUDGET
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BamJaxError(f'TrainConfig.match_run: {path} does not exist; has that run trained?') from None
    except (OSError, json.JSONDecodeError) as e:
        raise BamJaxError(f'TrainConfig.match_run: cannot read {path}: {e}') from None


def resolve_train_steps(config: TrainConfig, model: ModelConfig) -> TrainConfig:
    """config with train_steps derived from its budget (unchanged when it has none)."""
    if config.flops_budget is None and config.match_run is None:
        return config
    if config.flops_budget is not None and config.match_run is not None:
        raise BamJaxError('set TrainConfig.flops_budget or TrainConfig.match_run, not both')
    own = run_budget(config, model, 1)
    if config.match_run is not None:
        if config.match not in ('tokens', 'flops'):
            raise BamJaxError(f"TrainConfig.match={config.match!r} must be 'tokens' or 'flops'")
        target = read_budget(config.match_run)
        if config.match not in target or not target.get('finished', True):
            raise BamJaxError(f'TrainConfig.match_run: {config.match_run} has not finished training '
                              f'(its budget.json has no final {config.match})')
        steps = target[config.match] / own[config.match]
    else:
        steps = config.flops_budget / own['flops']
    steps = max(1, round(steps))
    return dataclasses.replace(config, train_steps=steps)


def write_budget(workdir: storage.Path, config: TrainConfig, model: ModelConfig, steps: int) -> None:
    """Records what the run has trained; 'finished' once it reached its train_steps."""
    write_json_atomic(workdir / files.BUDGET, {**run_budget(config, model, steps),
                                              'finished': steps >= config.train_steps})
