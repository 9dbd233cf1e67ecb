"""Where a training run starts: its own latest checkpoint (resume), Lory's dense warm-up
(bam_jax.train.dense_warmup), an INIT_CHECKPOINT's parameters, or random weights.

`choose` picks one and checks the checkpoint it will read before anything is written to the
workdir; calling what it returns builds the start state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from bam_jax import storage
from bam_jax.errors import BamJaxError
from bam_jax.models import init_params
from bam_jax.models.config import describe_changes
from bam_jax.train import dense_warmup
from bam_jax.train.run import Run, StartState
from bam_jax.workdir import RunCheckpoints, check_model, files, latest_step_dir, resolve_checkpoint, restore_params


def choose(run: Run, train_fn: Callable) -> Callable[[], StartState | dict]:
    """The run's start, checked. It returns a StartState, or the dense warm-up's result (a dict)
    when that stopped before the switch to Lory. train_fn trains the warm-up's sub-run."""
    resume_dir = latest_step_dir(run.workdir / files.CHECKPOINTS)
    if resume_dir is not None:
        changed = check_model(run.model, resume_dir, f'workdir {run.workdir}')
        return functools.partial(resume, run, resume_dir, changed)
    if dense_warmup.warmup_steps(run.config, run.model):
        # INIT_CHECKPOINT, if any, starts the dense warm-up, which checks it.
        return functools.partial(dense_warmup.start, run, train_fn)
    return functools.partial(fresh, run, init_checkpoint(run))


def resume(run: Run, step_dir: storage.Path, settings_changed: dict) -> StartState:
    """Parameters, optimizer state and data position of the run's own checkpoint."""
    step = int(step_dir.name)
    with RunCheckpoints(run.workdir, run.config.keep_checkpoints) as checkpoints:
        params, opt_state, train_state = checkpoints.restore(
            step, run.abstract_params, run.param_shardings, run.abstract_opt_state, run.opt_shardings)
    print(f'resuming {run.workdir} from step {step}')
    if settings_changed:
        print(f'settings changed since that checkpoint: {describe_changes(settings_changed)}')
    return StartState(step, params, opt_state, int(train_state['data_position']), settings_changed)


def fresh(run: Run, init_dir: storage.Path | None) -> StartState:
    """Step 0 with a fresh optimizer: parameters from init_dir, or random from the run's seed."""
    if init_dir is not None:
        print(f'initialising parameters from {init_dir}')
        params = restore_params(init_dir, run.abstract_params, run.param_shardings)
    else:
        params = init_params(run.model, run.config.seed, run.param_shardings)
    opt_state = jax.jit(run.optimizer.init, out_shardings=run.opt_shardings)(params)
    return StartState(0, params, opt_state, 0)


def init_checkpoint(run: Run) -> storage.Path | None:
    """The checkpoint whose parameters (not optimizer state) start this run, checked; None: random init."""
    if not run.config.init_checkpoint:
        if run.config.init_required:
            raise BamJaxError('this run starts from a trained model: set --gin.INIT_CHECKPOINT="\'DIR\'"')
        return None
    step_dir = resolve_checkpoint(run.config.init_checkpoint, 'INIT_CHECKPOINT')
    check_model(run.model, step_dir, f'INIT_CHECKPOINT {step_dir}')
    return step_dir
