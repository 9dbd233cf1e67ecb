"""The training loop: seed, branch and (later) mix runs all go through `train`."""

from __future__ import annotations

import math
import pathlib
import signal
import sys
import time

import gin
import jax
import numpy as np
import optax
from tqdm import tqdm

from bam_jax import data
from bam_jax.errors import BamJaxError
from bam_jax.models import ModelConfig, abstract_model, flatten, init_params, param_shardings, split_params
from bam_jax.parallel import MeshConfig, batch_sharding, create_mesh, replicated
from bam_jax.train import checkpoints as ckpt
from bam_jax.train import dense_warmup
from bam_jax.train.budget import resolve_train_steps, write_budget
from bam_jax.train.config import TrainConfig
from bam_jax.train.metrics import MetricsLog, format_eval_table, perplexity, router_scalars
from bam_jax.train.optimizer import learning_rate_schedule, make_optimizer
from bam_jax.train.step import make_eval_step, make_train_step

OPERATIVE_CONFIG_FILE = 'config.gin'


class _StopSignal:
    """Turns SIGTERM into a flag the loop checks after each step: save, then exit cleanly."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: no handler, no graceful stop
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_same_model(model: ModelConfig, step_dir: pathlib.Path, what: str) -> None:
    stored = ckpt.read_model_config(step_dir).to_dict()
    for name, value in model.to_dict().items():
        if stored.get(name) != value:
            raise BamJaxError(f'{what} holds a run of a different model: '
                              f'{name} is {stored.get(name)!r} there, {value!r} here')


def _opt_shardings(optimizer, abstract_opt_state, shardings, mesh):
    # Moments mirror the parameters' shardings; counters and other scalars are replicated.
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state, shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _replicated_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    # Every process holds the same (eval) batch: build the global array from it directly.
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def evaluate(eval_step, params, data_config, batch_size, seq_len, sharding, cache) -> dict:
    """Validation loss and perplexity per domain, on up to DataConfig.eval_batches batches."""
    results = {}
    for domain in data_config.eval_domains:
        if domain not in cache:
            cache[domain] = data.eval_batches(data_config, domain, batch_size, seq_len)
        total, count = 0.0, 0.0
        for batch in cache[domain]:
            nll, n = eval_step(params, _replicated_batch(batch, sharding))
            total, count = total + float(nll), count + float(n)
        loss = total / max(count, 1.0)
        results[domain] = {'loss': loss, 'perplexity': perplexity(loss)}
    if results:
        losses = [v['loss'] for v in results.values()]
        results['average'] = {'loss': float(np.mean(losses)),
                              'perplexity': float(np.mean([v['perplexity'] for v in results.values()]))}
    return results


def train(workdir: str | pathlib.Path, config: TrainConfig | None = None,
          model_config: ModelConfig | None = None, data_config: data.DataConfig | None = None,
          mesh_config: MeshConfig | None = None) -> dict:
    """Trains (or resumes) the run in `workdir`. Configs default to their gin bindings.

    Returns {'step': last step, 'loss': last train loss, 'eval': last eval results, 'stopped': why}.
    """
    model_config = model_config or ModelConfig()
    config = resolve_train_steps(config or TrainConfig(), model_config)
    if config.match_run or config.flops_budget:
        basis = f'the {config.match} of {config.match_run}' if config.match_run else f'{config.flops_budget:.3g} FLOPs'
        print(f'training {config.train_steps} steps: {basis}')
    data_config = data_config or data.DataConfig()
    mesh = create_mesh(mesh_config or MeshConfig())
    workdir = pathlib.Path(workdir).absolute()

    data.resolve_source(data_config)
    data.eval_domain_names(data_config)
    vocab_size = data.vocabulary(data_config).vocab_size
    if vocab_size > model_config.vocab_size:
        raise BamJaxError(f'the vocabulary has {vocab_size} ids but ModelConfig.vocab_size is '
                          f'{model_config.vocab_size}')
    num_data_shards = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']
    if config.batch_size % max(num_data_shards, jax.process_count()):
        raise BamJaxError(f'batch size {config.batch_size} is not divisible by the {num_data_shards} '
                          f'data-parallel devices')
    local_batch = config.batch_size // jax.process_count()

    abstract = abstract_model(model_config)
    graphdef, abstract_params = split_params(abstract)
    shardings = param_shardings(abstract, mesh)
    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = _opt_shardings(optimizer, abstract_opt, shardings, mesh)
    data_sharding = batch_sharding(mesh)

    # Every check runs before anything is written to the workdir.
    resume_dir = ckpt.latest_step_dir(workdir / ckpt.CHECKPOINT_SUBDIR)
    warmup = dense_warmup.warmup_steps(config, model_config)
    if resume_dir is not None:
        _check_same_model(model_config, resume_dir, f'workdir {workdir}')
        init_dir = None
    elif warmup:
        init_dir = None  # INIT_CHECKPOINT, if any, starts the dense warm-up
    else:
        init_dir = _init_checkpoint(config, abstract_params)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = ckpt.RunCheckpoints(workdir, config.keep_checkpoints)
    if resume_dir is not None:
        start = int(resume_dir.name)
        params, opt_state, train_state = checkpoints.restore(
            start, abstract_params, shardings, abstract_opt, opt_shardings)
        data_position = int(train_state['data_position'])
        print(f'resuming {workdir} from step {start}')
    elif warmup:
        # The dense sub-run resumes on its own; this run starts from its final checkpoint.
        dense = train(workdir / dense_warmup.SUBDIR, dense_warmup.warmup_config(config, warmup),
                      dense_warmup.dense_model(model_config), data_config, mesh_config)
        if dense['step'] < warmup or dense['stopped'] == 'sigterm':
            checkpoints.close()
            return dense
        params, opt_state, data_position = _switch_to_lory(
            workdir / dense_warmup.SUBDIR, warmup, config, model_config, mesh, optimizer, shardings, opt_shardings)
        start = warmup
        print(f'step {start}: dense warm-up done, switching to Lory with {model_config.lory.num_experts} experts '
              f'(FFN copied into each expert, Adam moments too)')
    else:
        start, data_position = 0, 0
        if init_dir is not None:
            print(f'initialising parameters from {init_dir}')
            params = ckpt.restore_params(init_dir, abstract_params, shardings)
        else:
            params = init_params(model_config, config.seed, shardings)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)

    _write_config(workdir)
    train_step = jax.jit(make_train_step(graphdef, optimizer, config.grad_accum_steps),
                         in_shardings=(shardings, opt_shardings, data_sharding, replicated(mesh)),
                         out_shardings=(shardings, opt_shardings, replicated(mesh)),
                         donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(shardings, data_sharding),
                        out_shardings=replicated(mesh))

    end = min(config.train_steps, config.stop_at_step or config.train_steps)
    batches = data.train_batches(data_config, local_batch, config.seq_len, config.seed,
                                 start_batch=data_position, shard_index=jax.process_index(),
                                 num_shards=jax.process_count())
    log = MetricsLog(workdir, resume_step=start)
    eval_cache: dict = {}
    result = {'step': start, 'loss': None, 'eval': None, 'stopped': 'finished'}

    def save(step):
        checkpoints.save(step, params, opt_state,
                         {'step': step, 'data_position': data_position, 'seed': config.seed},
                         model_config)

    # Derived from the step, so a resumed run draws the same routing samples as a straight one.
    routing_key = jax.random.key(config.seed + 1)
    step = start
    try:
        # The mesh context lets the expert layers shard_map their dispatch over it.
        with jax.set_mesh(mesh), _StopSignal() as stop, tqdm(total=end, initial=start, desc=workdir.name, unit='step',
                                         disable=jax.process_index() != 0, dynamic_ncols=True,
                                         # in a log file, a line every 30 s instead of every update
                                         mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
            window_start, window_tokens = time.perf_counter(), 0.0
            while step < end:
                batch = _global_batch(next(batches), data_sharding)
                params, opt_state, metrics = train_step(params, opt_state, batch,
                                                        jax.random.fold_in(routing_key, step))
                data_position += 1
                step += 1
                loss, grad_norm = float(metrics['loss']), float(metrics['grad_norm'])
                # A finite loss can still come with an update that overflowed the weights.
                if not all(map(math.isfinite, (loss, grad_norm, float(metrics['param_norm'])))):
                    checkpoints.wait()
                    last = checkpoints.latest_step()
                    kept = f'the last good checkpoint is step {last}' if last else 'no checkpoint was saved'
                    raise BamJaxError(f'non-finite training at step {step} (loss {loss}, grad norm '
                                      f'{grad_norm}): stopping; {kept}')
                window_tokens += float(metrics['tokens'])
                result['loss'] = loss
                if step % config.log_every == 0 or step == end:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / max(elapsed, 1e-9)
                    log.train(step, {'loss': loss, 'grad_norm': grad_norm,
                                     'learning_rate': float(schedule(step - 1)), 'tokens_per_s': tokens_per_s,
                                     **({'aux_loss': float(metrics['aux_loss'])} if metrics['router'] else {}),
                                     **router_scalars(metrics['router'])})
                    bar.set_postfix(loss=f'{loss:.4f}', tok_s=f'{tokens_per_s:,.0f}')
                    window_start, window_tokens = time.perf_counter(), 0.0
                bar.update(1)
                if step % config.eval_every == 0 or step == config.train_steps:
                    result['eval'] = evaluate(eval_step, params, data_config, config.batch_size,
                                              config.seq_len, data_sharding, eval_cache)
                    log.eval(step, result['eval'])
                    bar.write(f'step {step} validation\n{format_eval_table(result["eval"])}')
                if step % config.checkpoint_every == 0 or step == end or stop.received:
                    save(step)
                if stop.received:
                    result['stopped'] = 'sigterm'
                    bar.write(f'SIGTERM: saved step {step}, stopping')
                    break
        if step < config.train_steps and result['stopped'] == 'finished':
            result['stopped'] = 'stop_at_step'
    finally:
        checkpoints.wait()
        checkpoints.close()
        log.close()
    result['step'] = step
    if jax.process_index() == 0:
        write_budget(workdir, config, model_config, step)
    return result


def _switch_to_lory(dense_dir, step, config, model_config, mesh, optimizer, shardings, opt_shardings):
    """(params, opt_state, data_position) of the Lory run, converted from the dense warm-up at `step`."""
    dense_abstract = abstract_model(dense_warmup.dense_model(model_config))
    _, dense_params = split_params(dense_abstract)
    dense_shardings = param_shardings(dense_abstract, mesh)
    dense_opt = jax.eval_shape(optimizer.init, dense_params)
    checkpoints = ckpt.RunCheckpoints(dense_dir, config.keep_checkpoints)
    try:
        params, opt_state, train_state = checkpoints.restore(
            step, dense_params, dense_shardings, dense_opt,
            _opt_shardings(optimizer, dense_opt, dense_shardings, mesh))
    finally:
        checkpoints.close()
    lory_opt = dense_warmup.lory_opt_state(model_config, params, opt_state, config.seed)
    params = dense_warmup.lory_params(model_config, params, config.seed)
    return (jax.device_put(params, shardings), jax.device_put(lory_opt, opt_shardings),
            int(train_state['data_position']))


def _init_checkpoint(config: TrainConfig, abstract_params) -> pathlib.Path | None:
    """The checkpoint whose parameters (not optimizer state) start this run, checked; None: random init."""
    if not config.init_checkpoint:
        if config.init_required:
            raise BamJaxError('this run starts from a trained model: set --gin.INIT_CHECKPOINT="\'DIR\'"')
        return None
    step_dir = ckpt.resolve_checkpoint(config.init_checkpoint, 'INIT_CHECKPOINT')
    expected = {k: (v.shape, v.dtype) for k, v in flatten(abstract_params).items()}
    ckpt.check_same_params(expected, ckpt.read_param_shapes(step_dir), f'INIT_CHECKPOINT {step_dir}')
    return step_dir


def _write_config(workdir: pathlib.Path) -> None:
    if jax.process_index() == 0:
        (workdir / OPERATIVE_CONFIG_FILE).write_text(gin.operative_config_str())
