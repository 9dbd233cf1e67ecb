"""Downstream tasks through lm-evaluation-harness: bam_jax's offline tasks and any of the harness's.

run_tasks drives lm_eval.simple_evaluate with the run's LanguageModel (bam_jax.evaluate.harness)
and a TaskManager that knows the harness's own tasks plus bam_jax's (offline_tasks: bam_math,
bam_code, bam_law, bam_general, the group bam_domains), and returns each task's metrics in one
flat record per task, the form eval.json keeps under 'tasks'.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from bam_jax import data
from bam_jax.errors import BamJaxError
from bam_jax.evaluate import offline_tasks
from bam_jax.generate import LanguageModel

# Bootstrap resamples for the stderr of metrics without a closed form (accuracy has one).
BOOTSTRAP_ITERS = 1000


def _task_manager(tasks: Sequence[str], data_config: data.DataConfig):
    from lm_eval.tasks import TaskManager
    # bam_jax's tasks read files it wrote: nothing may be fetched for them.
    ours = set(tasks) <= {*offline_tasks.TASKS, offline_tasks.GROUP}
    if ours:
        os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
        os.environ.setdefault('HF_HUB_OFFLINE', '1')
    # Indexing the harness's hundreds of task files takes seconds: only when one of them is asked for.
    return TaskManager(include_path=str(offline_tasks.write_tasks(data_config)), include_defaults=not ours)


def check_tasks(tasks: Sequence[str], num_fewshot: int | None, limit: int | None, data_config: data.DataConfig):
    """The TaskManager (bam_jax's tasks cut from data_config's prepared domains), after refusing
    unknown names and bad options in one line."""
    if num_fewshot is not None and num_fewshot < 0:
        raise BamJaxError(f'--num_fewshot must be >= 0, got {num_fewshot}')
    if limit is not None and limit < 1:
        raise BamJaxError(f'--limit must be >= 1, got {limit}')
    manager = _task_manager(tasks, data_config)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        ours = ', '.join((*offline_tasks.TASKS, offline_tasks.GROUP))
        raise BamJaxError(f"unknown task {unknown[0]!r}: bam_jax has {ours}; `lm-eval ls tasks` lists the harness's")
    return manager


def _metrics(values: dict) -> dict:
    """The harness's 'acc,none' / 'exact_match,answer' keys as 'acc' / 'exact_match' ('<metric>/
    <filter>' where one metric comes under several filters), and 'acc_stderr,none' as 'acc_stderr'."""
    keys = [key for key, value in values.items() if ',' in key and isinstance(value, (int, float))]
    filters: dict[str, set] = {}
    for key in keys:
        metric, filter_name = key.split(',', 1)
        filters.setdefault(metric.removesuffix('_stderr'), set()).add(filter_name)
    out = {}
    for key in keys:
        metric, filter_name = key.split(',', 1)
        base = metric.removesuffix('_stderr')
        name = base if len(filters[base]) == 1 else f'{base}/{filter_name}'
        out[name + metric[len(base):]] = float(values[key])
    return out


def run_tasks(lm: LanguageModel, tasks: Sequence[str], data_config: data.DataConfig, *,
              num_fewshot: int | None = None, limit: int | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """The scores of `lm` (a run read with data_config) on `tasks`: {task: {'acc': ...,
    'acc_stderr': ..., ..., 'n': items scored, 'primary': metric name,
    'chance': chance level (bam_jax's tasks; None otherwise), 'group': whether it is a group}} for
    each task and group asked for (a group's member tasks come too)."""
    import lm_eval

    from bam_jax.evaluate.harness import BamJaxLM

    manager = check_tasks(tasks, num_fewshot, limit, data_config)
    out = lm_eval.simple_evaluate(model=BamJaxLM(lm=lm, progress=progress), tasks=list(tasks),
                                  num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False,
                                  bootstrap_iters=BOOTSTRAP_ITERS)
    results = {}
    groups = set(out.get('groups', {}))
    for name, values in {**out['results'], **out.get('groups', {})}.items():
        metrics = _metrics(values)
        if not metrics:  # a group that reports no aggregate of its own (bam_domains)
            continue
        samples = out.get('n-samples', {}).get(name, {})
        primary = offline_tasks.PRIMARY.get(name) or next((m for m in metrics if not m.endswith('_stderr')), None)
        results[name] = {**metrics, 'n': samples.get('effective'), 'primary': primary,
                         'chance': offline_tasks.CHANCE.get(name), 'group': name in groups}
    return results


def format_tasks(tasks: dict) -> str:
    """One row per task and metric: value, its stderr, the chance level, the items scored."""
    lines = [f'{"task":<16} {"metric":<20} {"value":>7} {"stderr":>7} {"chance":>7} {"n":>6}']
    for name, record in tasks.items():
        for metric, value in record.items():
            if metric in ('n', 'primary', 'chance', 'group') or metric.endswith('_stderr'):
                continue
            stderr = record.get(f'{metric}_stderr')
            chance = record['chance'] if metric == record['primary'] and record['chance'] is not None else None
            lines.append(f'{name:<16} {metric:<20} {value:>7.3f} '
                         f'{"" if stderr is None else f"{stderr:.3f}":>7} '
                         f'{"" if chance is None else f"{chance:.3f}":>7} {record["n"] or "":>6}')
    return '\n'.join(lines)
