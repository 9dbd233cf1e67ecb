"""Times the real jit-compiled train step on synthetic batches (no input pipeline in the way)."""

from __future__ import annotations

import time

import jax
import numpy as np

from bam_jax.models import ModelConfig, abstract_model, count_params, init_params, param_shardings, split_params
from bam_jax.models.flops import train_flops_per_token
from bam_jax.parallel import MeshConfig, batch_sharding, create_mesh, replicated
from bam_jax.train.config import TrainConfig
from bam_jax.train.optimizer import make_optimizer
from bam_jax.train.step import make_train_step


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    return {
        'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
        'segment_ids': np.ones((batch_size, seq_len), np.int32),
        'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
        'loss_weights': np.ones((batch_size, seq_len), np.float32),
    }


def time_train_step(model_config: ModelConfig, batch_size: int, seq_len: int, steps: int,
                    warmup: int = 2, mesh_config: MeshConfig | None = None) -> dict:
    """Median seconds per optimizer step, and the figures derived from it."""
    mesh = create_mesh(mesh_config or MeshConfig())
    config = TrainConfig(train_steps=1000, batch_size=batch_size, seq_len=seq_len)
    abstract = abstract_model(model_config)
    graphdef, _ = split_params(abstract)
    shardings = param_shardings(abstract, mesh)
    optimizer = make_optimizer(config)
    params = init_params(model_config, 0, shardings)
    opt_state = jax.jit(optimizer.init)(params)
    step = jax.jit(make_train_step(graphdef, optimizer, 1), donate_argnums=(0, 1),
                   out_shardings=(shardings, None, replicated(mesh)))
    data = batch_sharding(mesh)
    batch = {k: jax.device_put(v, data)
             for k, v in synthetic_batch(batch_size, seq_len, model_config.vocab_size).items()}
    times = []
    with jax.set_mesh(mesh):  # the expert layers dispatch over it
        for i in range(warmup + steps):
            start = time.perf_counter()
            params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
            jax.block_until_ready(metrics['loss'])
            if i >= warmup:
                times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    tokens = batch_size * seq_len
    flops_per_token = train_flops_per_token(model_config, seq_len)
    return {
        'params': count_params(abstract),
        'step_time_s': step_time,
        'tokens_per_s': tokens / step_time,
        'flops_per_token': flops_per_token,
        'achieved_flops': flops_per_token * tokens / step_time,
    }
