"""The training loop: seed, branch and mix runs all go through `train`."""

from __future__ import annotations

import math
import signal
import sys
import time
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from bam_jax import data
from bam_jax.errors import BamJaxError
from bam_jax.parallel import replicated
from bam_jax.train import start
from bam_jax.train.budget import write_budget
from bam_jax.train.metrics import MetricsLog, format_eval_table, per_domain, router_scalars
from bam_jax.train.optimizer import learning_rate_schedule
from bam_jax.train.run import Run, StartState
from bam_jax.train.step import make_eval_step, make_train_step
from bam_jax.train.validation import ValidationBatches, validate
from bam_jax.workdir import RunCheckpoints, files

if TYPE_CHECKING:
    from bam_jax.gin_config import RunConfig


def train(workdir, configs: RunConfig) -> dict:
    """Trains (or resumes) the run in `workdir` with `configs` (`bam-jax train` binds them from its
    gin files: gin_config.parse_gin).

    Returns {'step': last step, 'loss': last train loss, 'eval': last eval results, 'stopped': why}.
    """
    run = Run.create(workdir, configs)
    begin = start.choose(run, train)  # every check runs before anything is written to the workdir
    state = begin()
    if not isinstance(state, StartState):  # Lory's dense warm-up stopped before the switch
        return state
    return _train_from(run, state)


class _StopSignal:
    """SIGTERM becomes a stop after a step: save once, then exit cleanly.

    One process: a handler sets a flag that the loop reads after each step. Several processes
    get the signal at different steps, and one that stopped at once would leave the others
    waiting in the next step's collectives. There, JAX's preemption sync (started by
    jax.distributed.initialize, which watches SIGTERM itself) picks the step after the furthest
    process, and every process stops at that one.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() > 1:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: no handler, no graceful stop
            self._previous = None
        return self

    def stop_after(self, step: int) -> bool:
        """Whether to stop after `step`; every process must ask after every step."""
        if jax.process_count() > 1:
            self.received = multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _compile(run: Run):
    """(train_step, eval_step), jitted with the run's shardings; train_step donates its state."""
    mesh, shardings, batch = run.mesh, run.param_shardings, run.batch_sharding
    train_step = jax.jit(make_train_step(run.graphdef, run.optimizer, run.config.grad_accum_steps,
                                         run.config.trainable),
                         in_shardings=(shardings, run.opt_shardings, batch, replicated(mesh)),
                         out_shardings=(shardings, run.opt_shardings, replicated(mesh)),
                         donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(run.graphdef), in_shardings=(shardings, batch),
                        out_shardings=replicated(mesh))
    return train_step, eval_step


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _train_from(run: Run, state: StartState) -> dict:
    """Trains from `state` to the end (or stop_at_step), then records the run's budget."""
    run.workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0 and run.configs.operative:
        (run.workdir / files.CONFIG).write_text(run.configs.operative)
    log = MetricsLog(run.workdir, resume_step=state.step)
    if state.settings_changed:
        log.settings_changed(state.step, state.settings_changed)
    checkpoints = RunCheckpoints(run.workdir, run.config.keep_checkpoints)
    try:
        result = _step_loop(run, state, log, checkpoints)
    finally:
        checkpoints.wait()
        checkpoints.close()
        log.close()
    if jax.process_index() == 0:
        write_budget(run.workdir, run.config, run.model, state.step)
    return result


def _step_loop(run: Run, state: StartState, log: MetricsLog, checkpoints: RunCheckpoints) -> dict:
    """Steps `state` in place: log, validate, checkpoint, stop on SIGTERM or a non-finite step.

    Returns {'step', 'loss': the last train loss, 'eval': the last validation, 'stopped': why}.
    """
    config = run.config
    train_step, eval_step = _compile(run)
    end = min(config.train_steps, config.stop_at_step or config.train_steps)
    batches = _data_stream(run, state)
    validation, schedule = ValidationBatches(), learning_rate_schedule(config)
    # Derived from the step, so a resumed run draws the same routing samples as a straight one.
    routing_key = jax.random.key(config.seed + 1)
    result = {'step': state.step, 'loss': None, 'eval': None, 'stopped': 'finished'}
    # The mesh context lets the expert layers shard_map their dispatch over it.
    with jax.set_mesh(run.mesh), _StopSignal() as stop, _progress_bar(run, state.step, end) as bar:
        window = _Window()
        while state.step < end:
            batch = _global_batch(next(batches), run.batch_sharding)
            state.params, state.opt_state, metrics = train_step(
                state.params, state.opt_state, batch, jax.random.fold_in(routing_key, state.step))
            state.data_position += 1
            state.step = step = state.step + 1
            result['loss'] = _check_finite(metrics, step, checkpoints)
            window.tokens += float(metrics['tokens'])
            if step % config.log_every == 0 or step == end:
                _log_train(log, bar, window, metrics, step, schedule(step - 1))
            bar.update(1)
            if step % config.eval_every == 0 or step == config.train_steps:
                result['eval'] = per_domain(validate(eval_step, state.params, validation, run.data,
                                                     config.batch_size, config.seq_len, run.batch_sharding))
                log.eval(step, result['eval'])
                bar.write(f'step {step} validation\n{format_eval_table(result["eval"])}')
            stopping = stop.stop_after(step)
            if step % config.checkpoint_every == 0 or step == end or stopping:
                checkpoints.save(step, state.params, state.opt_state,
                                 {'step': step, 'data_position': state.data_position, 'seed': config.seed},
                                 run.model)
            if stopping:
                result['stopped'] = 'sigterm'
                bar.write(f'SIGTERM: saved step {step}, stopping')
                break
    if state.step < config.train_steps and result['stopped'] == 'finished':
        result['stopped'] = 'stop_at_step'
    result['step'] = state.step
    return result


def _data_stream(run: Run, state: StartState):
    """This process's training batches from the start state's position (data.train_batches: the
    position is all a stream needs, whatever the process count)."""
    return data.train_batches(run.data, run.config.batch_size, run.config.seq_len, run.config.seed,
                              start_batch=state.data_position, process_index=jax.process_index(),
                              process_count=jax.process_count())


def _progress_bar(run: Run, step: int, end: int) -> tqdm:
    return tqdm(total=end, initial=step, desc=run.workdir.name, unit='step', disable=jax.process_index() != 0,
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30)  # in a log file, a line every 30 s


class _Window:
    """Tokens and time since the last logged step: the tokens/s of the log line."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0.0

    def tokens_per_s(self) -> float:
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.start, self.tokens = time.perf_counter(), 0.0
        return rate


def _check_finite(metrics: dict, step: int, checkpoints: RunCheckpoints) -> float:
    """The step's loss; raises if it, the gradient or the weights are not finite."""
    loss, grad_norm = float(metrics['loss']), float(metrics['grad_norm'])
    # A finite loss can still come with an update that overflowed the weights.
    if not all(map(math.isfinite, (loss, grad_norm, float(metrics['param_norm'])))):
        checkpoints.wait()
        last = checkpoints.latest_step()
        kept = f'the last good checkpoint is step {last}' if last else 'no checkpoint was saved'
        raise BamJaxError(f'non-finite training at step {step} (loss {loss}, grad norm '
                          f'{grad_norm}): stopping; {kept}')
    return loss


def _log_train(log: MetricsLog, bar: tqdm, window: _Window, metrics: dict, step: int, learning_rate) -> None:
    loss, tokens_per_s = float(metrics['loss']), window.tokens_per_s()
    log.train(step, {'loss': loss, 'grad_norm': float(metrics['grad_norm']),
                     'learning_rate': float(learning_rate), 'tokens_per_s': tokens_per_s,
                     **({'aux_loss': float(metrics['aux_loss'])} if metrics['router'] else {}),
                     **router_scalars(metrics['router'])})
    bar.set_postfix(loss=f'{loss:.4f}', tok_s=f'{tokens_per_s:,.0f}')
