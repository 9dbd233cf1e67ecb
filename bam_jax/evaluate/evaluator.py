"""`bam-jax eval`: held-out perplexity per domain and, for expert models, the routing map.

The run is rebuilt from its own operative config (WORKDIR/config.gin) plus any overrides, so
the same checkpoint can be evaluated with another routing mode or capacity factor
(--gin.MoEConfig.routing="'soft'"), and restored from its latest checkpoint. Several runs can be
evaluated in one call; runs with the same data settings share their validation batches.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np

from bam_jax import data
from bam_jax.errors import BamJaxError
from bam_jax.evaluate.routing_map import PNG_FILE, save_routing_map
from bam_jax.models import ModelConfig, abstract_model, flatten, param_shardings, split_params
from bam_jax.parallel import MeshConfig, batch_sharding, create_mesh, replicated
from bam_jax.train import checkpoints as ckpt
from bam_jax.train.config import TrainConfig
from bam_jax.train.metrics import perplexity, write_json_atomic
from bam_jax.train.step import forward

RESULTS_FILE = 'eval.json'

_eval_batches_cache: dict = {}


def _cached_eval_batches(data_config, domain, batch_size, seq_len):
    key = (repr(data_config), domain, batch_size, seq_len)
    if key not in _eval_batches_cache:
        _eval_batches_cache[key] = data.eval_batches(data_config, domain, batch_size, seq_len)
    return _eval_batches_cache[key]


def load_run_config(workdir: pathlib.Path, bindings: list[str]) -> None:
    """Parses the run's operative gin config, then the overrides."""
    from bam_jax.gin_config import parse_gin

    config = workdir / 'config.gin'
    if not workdir.is_dir():
        raise BamJaxError(f'workdir {workdir} does not exist')
    if not config.is_file():
        raise BamJaxError(f'{workdir} has no config.gin: is it a bam_jax run directory?')
    parse_gin([str(config)], bindings)


def evaluate_run(workdir: str | pathlib.Path, progress=print) -> dict:
    """Evaluates the latest checkpoint of `workdir` under the gin config already parsed.

    Returns {'step', 'checkpoint', 'perplexity': {domain: ppl, ..., 'average': mean of the
    domains' ppl}, 'loss': {domain: mean NLL}, 'tokens': {domain: count},
    'routing': {domain: {layer: [fraction per expert]}}} ('routing' empty for a dense model).
    """
    workdir = pathlib.Path(workdir).absolute()
    step_dir = ckpt.resolve_checkpoint(workdir, 'workdir')
    model_config, data_config, train_config = ModelConfig(), data.DataConfig(), TrainConfig()
    mesh = create_mesh(MeshConfig())
    abstract = abstract_model(model_config)
    graphdef, abstract_params = split_params(abstract)
    expected = {k: (v.shape, v.dtype) for k, v in flatten(abstract_params).items()}
    ckpt.check_same_params(expected, ckpt.read_param_shapes(step_dir), f'checkpoint {step_dir}')
    shardings = param_shardings(abstract, mesh)
    params = ckpt.restore_params(step_dir, abstract_params, shardings)
    sharding = batch_sharding(mesh)
    step = jax.jit(lambda p, b: forward(graphdef, p, b), in_shardings=(shardings, sharding),
                   out_shardings=replicated(mesh))

    result = {'step': int(step_dir.name), 'checkpoint': str(step_dir),
              'perplexity': {}, 'loss': {}, 'tokens': {}, 'routing': {}}
    with jax.set_mesh(mesh):
        for domain in data.eval_domain_names(data_config):
            total, count, loads = 0.0, 0.0, {}
            for batch in _cached_eval_batches(data_config, domain, train_config.batch_size, train_config.seq_len):
                batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
                         for k, v in batch.items()}
                nll, n, aux = step(params, batch)
                total, count = total + float(nll), count + float(n)
                for layer, values in aux.items():  # token-weighted over batches
                    loads[layer] = loads.get(layer, 0.0) + float(n) * np.asarray(values['load'])
            loss = total / max(count, 1.0)
            result['loss'][domain], result['tokens'][domain] = loss, count
            result['perplexity'][domain] = perplexity(loss)
            if loads:
                result['routing'][domain] = {layer: (v / max(count, 1.0)).tolist() for layer, v in loads.items()}
            progress(f'{domain}: perplexity {result["perplexity"][domain]:.3f} over {count:,.0f} tokens')
    result['perplexity']['average'] = float(np.mean(list(result['perplexity'].values())))
    return result


def format_perplexity(result: dict) -> str:
    names = list(result['perplexity'])
    header = '| ' + ' | '.join(['step', *names]) + ' |'
    row = '| ' + ' | '.join([str(result['step']), *(f'{result["perplexity"][n]:.3f}' for n in names)]) + ' |'
    return '\n'.join([header, '|' + '---|' * (len(names) + 1), row])


def format_routing(result: dict) -> str:
    """Per layer kind, per layer and domain: the fraction of tokens each expert receives."""
    lines = []
    for kind in ('ffn', 'attn'):
        layers = sorted({layer for by_layer in result['routing'].values() for layer in by_layer
                         if layer.endswith('/' + kind)}, key=lambda name: int(name.split('/')[1]))
        if not layers:
            continue
        experts = len(next(iter(result['routing'].values()))[layers[0]])
        lines.append(f'{kind} experts: fraction of tokens per expert (soft routing, Lory: mean weight)')
        lines.append(f'{"layer":<8} {"domain":<10} ' + ' '.join(f'{f"e{e}":>6}' for e in range(experts)))
        for layer in layers:
            for domain, by_layer in result['routing'].items():
                fractions = ' '.join(f'{v:>6.3f}' for v in by_layer[layer])
                lines.append(f'{layer.split("/")[1]:<8} {domain:<10} {fractions}')
    return '\n'.join(lines)


def eval_command(workdirs: Sequence[str | pathlib.Path], bindings: list[str], as_json: bool = False) -> list[dict]:
    """`bam-jax eval`: evaluate each run, print (tables, or one JSON object per line on stdout),
    save its eval.json and routing map. Every workdir is checked before any is evaluated."""
    workdirs = [pathlib.Path(w).absolute() for w in workdirs]
    for workdir in workdirs:
        load_run_config(workdir, bindings)
    log = (lambda line: print(line, file=sys.stderr)) if as_json else print  # noqa: E731
    results = []
    for workdir in workdirs:
        if len(workdirs) > 1:
            log(f'== {workdir}')
        load_run_config(workdir, bindings)
        result = evaluate_run(workdir, progress=log)
        result['overrides'] = list(bindings)
        write_json_atomic(workdir / RESULTS_FILE, result)
        png = save_routing_map(result['routing'], workdir / PNG_FILE, title=f'{workdir.name}, step {result["step"]}')
        if as_json:
            print(json.dumps(result), flush=True)
        else:
            print(format_perplexity(result))
            if result['routing']:
                print(format_routing(result))
        log(f'wrote {workdir / RESULTS_FILE}' + (f' and {png}' if png else ''))
        results.append(result)
    return results
