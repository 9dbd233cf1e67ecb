"""`bam-jax eval`: held-out perplexity per domain, downstream tasks if asked (--tasks, through
lm-evaluation-harness), and, for expert models, the routing map.

The run is rebuilt from its own operative config (WORKDIR/config.gin) plus any overrides, so
the same checkpoint can be evaluated with another routing mode or top_k
(--gin.MoEConfig.routing="'soft'"), and restored from its latest checkpoint. Routed experts run
dropless: every token reaches its chosen experts, whatever its batch. Several runs can be
evaluated in one call; runs with the same data settings share their validation batches.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import jax

from bam_jax import storage
from bam_jax.evaluate.routing_map import save_routing_map
from bam_jax.generate import LanguageModel
from bam_jax.gin_config import RunConfig, load_run_config
from bam_jax.parallel import batch_sharding, replicated
from bam_jax.train.step import make_eval_step
from bam_jax.train.validation import ValidationBatches, validate
from bam_jax.workdir import files, write_json_atomic


def evaluate_run(workdir: str | storage.Path, configs: RunConfig, batches: ValidationBatches | None = None,
                 progress=print, tasks: Sequence[str] = (), num_fewshot: int | None = None,
                 limit: int | None = None) -> dict:
    """Evaluates the latest checkpoint of `workdir` under `configs`, the run's own (its
    config.gin plus overrides: gin_config.load_run_config). Validation rows are its training
    batches' shape (TrainConfig.batch_size x seq_len), as in training.

    batches: validation batches to share with other evaluations (default: read afresh).
    tasks: downstream tasks run through lm-evaluation-harness (bam_jax.evaluate.downstream), with
    num_fewshot and limit (items per task) if given; their scores go under 'tasks'.
    Returns {'step', 'checkpoint', 'perplexity': {domain: ppl, ..., 'average': mean of the
    domains' ppl}, 'loss': {domain: mean NLL}, 'tokens': {domain: count},
    'routing': {domain: {layer: [fraction per expert]}} ('routing' empty for a dense model),
    'experts': {'ffn' | 'attn': the name of each expert, in the order of 'routing''s fractions},
    'settings_changed': {setting: [the checkpoint's, this evaluation's]}} (routing, top_k,
    compute dtype... set differently from the checkpoint).
    """
    model = LanguageModel.restore(workdir, configs.model, configs.data, configs.mesh, configs.max_length, progress)
    data_config, train_config = configs.data, configs.train
    shardings = jax.tree.map(lambda a: a.sharding, model.params)
    sharding = batch_sharding(model.mesh)
    step = jax.jit(make_eval_step(model.graphdef), in_shardings=(shardings, sharding),
                   out_shardings=replicated(model.mesh))
    with jax.set_mesh(model.mesh):
        result = validate(step, model.params, batches or ValidationBatches(), data_config, train_config.batch_size,
                          train_config.seq_len, sharding, progress)
    if tasks:
        from bam_jax.evaluate.downstream import run_tasks
        result['tasks'] = run_tasks(model, tasks, data_config, num_fewshot=num_fewshot, limit=limit,
                                    progress=progress)
    experts = {kind: labels for kind in ('ffn', 'attn') if (labels := model.config.expert_labels(kind))}
    return {'step': int(model.step_dir.name), 'checkpoint': str(model.step_dir), **result, 'experts': experts,
            'settings_changed': model.settings_changed}


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
        names = result.get('experts', {}).get(kind) or [f'e{e}' for e in range(experts)]
        width = max(6, *(len(n) for n in names))
        lines.append(f'{kind} experts: fraction of tokens per expert (soft routing, Lory: mean weight)')
        lines.append(f'{"layer":<8} {"domain":<10} ' + ' '.join(f'{n:>{width}}' for n in names))
        for layer in layers:
            for domain, by_layer in result['routing'].items():
                fractions = ' '.join(f'{v:>{width}.3f}' for v in by_layer[layer])
                lines.append(f'{layer.split("/")[1]:<8} {domain:<10} {fractions}')
    return '\n'.join(lines)


def eval_command(workdirs: Sequence[str | storage.Path], bindings: list[str], as_json: bool = False,
                 tasks: Sequence[str] = (), num_fewshot: int | None = None, limit: int | None = None) -> list[dict]:
    """`bam-jax eval`: evaluate each run, print (tables, or one JSON object per line on stdout),
    save its eval.json and routing map. Every workdir, and every task name, is checked before any
    run is evaluated."""
    workdirs = [storage.path(w) for w in workdirs]
    configs = [load_run_config(workdir, bindings) for workdir in workdirs]
    if tasks:
        from bam_jax.evaluate.downstream import check_tasks
        check_tasks(tasks, num_fewshot, limit, configs[0].data)
    log = (lambda line: print(line, file=sys.stderr)) if as_json else print  # noqa: E731
    batches = ValidationBatches()  # runs with the same data settings share them
    results = []
    for workdir, run_configs in zip(workdirs, configs):
        if len(workdirs) > 1:
            log(f'== {workdir}')
        result = evaluate_run(workdir, run_configs, batches, progress=log, tasks=tasks, num_fewshot=num_fewshot,
                              limit=limit)
        result['overrides'] = list(bindings)
        results.append(result)
        if jax.process_index() != 0:  # a multi-process job: every process computed the same result
            continue
        write_json_atomic(workdir / files.EVAL, result)
        png = save_routing_map(result['routing'], workdir / files.ROUTING_MAP,
                               title=f'{workdir.name}, step {result["step"]}', experts=result['experts'])
        if as_json:
            print(json.dumps(result), flush=True)
        else:
            print(format_perplexity(result))
            if result['routing']:
                print(format_routing(result))
            if result.get('tasks'):
                from bam_jax.evaluate.downstream import format_tasks
                print(format_tasks(result['tasks']))
        log(f'wrote {workdir / files.EVAL}' + (f' and {png}' if png else ''))
    return results
