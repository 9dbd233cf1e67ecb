"""Held-out loss per domain: one loop for the trainer's periodic validation and `bam-jax eval`."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from bam_jax import data
from bam_jax.train.metrics import perplexity


class ValidationBatches:
    """Validation batches, read once per (data settings, domain, batch shape) and then reused: by
    every validation of a training run, and by every run one `bam-jax eval` call evaluates."""

    def __init__(self):
        self._batches: dict = {}

    def get(self, data_config: data.DataConfig, domain: str, batch_size: int, seq_len: int) -> list:
        key = (repr(data_config), domain, batch_size, seq_len)
        if key not in self._batches:
            self._batches[key] = data.eval_batches(data_config, domain, batch_size, seq_len)
        return self._batches[key]


def _replicated(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    # Every process holds the same validation batch: build the global array from it directly.
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


def validate(eval_step: Callable, params, batches: ValidationBatches, data_config: data.DataConfig,
             batch_size: int, seq_len: int, sharding, progress: Callable[[str], None] | None = None) -> dict:
    """eval_step(params, batch) -> (summed NLL, token count, {routed layer: router_aux}) over the
    validation batches of every eval domain (run under the mesh: jax.set_mesh).

    Returns {'perplexity': {domain: ppl, ..., 'average': the mean of the domains' perplexities},
    'loss': {domain: mean NLL}, 'tokens': {domain: count}, 'routing': {domain: {layer: [share of
    the tokens per expert]}}}, 'routing' empty for a dense model.
    """
    result = {'perplexity': {}, 'loss': {}, 'tokens': {}, 'routing': {}}
    for domain in data.eval_domain_names(data_config):
        total, count, loads = 0.0, 0.0, {}
        for batch in batches.get(data_config, domain, batch_size, seq_len):
            nll, n, aux = eval_step(params, _replicated(batch, sharding))
            total, count = total + float(nll), count + float(n)
            for layer, values in aux.items():  # token-weighted over batches
                loads[layer] = loads.get(layer, 0.0) + float(n) * np.asarray(values['load'])
        loss = total / max(count, 1.0)
        result['loss'][domain], result['tokens'][domain] = loss, count
        result['perplexity'][domain] = perplexity(loss)
        if loads:
            result['routing'][domain] = {layer: (v / max(count, 1.0)).tolist() for layer, v in loads.items()}
        if progress:
            progress(f'{domain}: perplexity {result["perplexity"][domain]:.3f} over {count:,.0f} tokens')
    if result['perplexity']:
        result['perplexity']['average'] = float(np.mean(list(result['perplexity'].values())))
    return result
