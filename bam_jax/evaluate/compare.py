"""A comparison table of runs: held-out perplexity per domain, from each run's eval.json
(`bam-jax eval`), or else the last validation in its metrics.json; and, when every run's
eval.json has downstream task scores (`bam-jax eval --tasks`), each task's primary score and
their average, with the same order checks (a higher score is better).

  python -m bam_jax.evaluate.compare --run seed=runs/seed --run code=runs/code ... --out runs/report
      [--order bam,bam_shared_kv,btx_top1,seed ...] [--rerun btx_top1=runs/btx_top1_seed1 ...]

Prints a markdown table and writes it with a JSON copy to --out. Each --order names runs whose
average perplexity should increase in that order (BAM's claim: BAM expert-KV < BAM shared-KV <
BTX < seed); the result says whether it held. Each --rerun is run NAME trained again with other
seeds (router init, data order). It gives the run-to-run noise of each gap in an order: when
both runs of a gap were rerun, how much the gap changed between the two seeds (runs sharing a
data order move together, so the paired gap is steadier than either run); when only one was,
how much that run moved. An order counts as clear only when every gap exceeds its noise.
"""

from __future__ import annotations

import argparse
import json
import sys

from bam_jax import storage
from bam_jax.errors import BamJaxError
from bam_jax.workdir import files, write_json_atomic


def final_perplexities(workdir: storage.Path) -> dict[str, float]:
    """{domain: perplexity} from the run's eval.json, or its last validation in metrics.json."""
    evaluated = storage.path(workdir) / files.EVAL
    if evaluated.is_file():
        return json.loads(evaluated.read_text())['perplexity']
    path = storage.path(workdir) / files.METRICS
    if not path.is_file():
        raise BamJaxError(f'{workdir} has no {files.METRICS}: has the run trained?')
    evals = json.loads(path.read_text()).get('eval', [])
    if not evals:
        raise BamJaxError(f'{path} has no validation results')
    last = evals[-1]
    return {key[:-len('/perplexity')]: value for key, value in last.items() if key.endswith('/perplexity')}


def downstream_scores(workdir: storage.Path) -> dict[str, float]:
    """{task: its primary score} from the run's eval.json (`bam-jax eval --tasks`), groups left
    out, plus 'average' over the tasks; {} when the run has none."""
    evaluated = storage.path(workdir) / files.EVAL
    tasks = json.loads(evaluated.read_text()).get('tasks', {}) if evaluated.is_file() else {}
    scores = {name: record[record['primary']] for name, record in tasks.items()
              if not record.get('group') and record.get('primary') in record}
    return {**scores, 'average': sum(scores.values()) / len(scores)} if scores else {}


def order_check(table: dict, rerun_table: dict, order: list[str], higher_is_better: bool = False) -> dict:
    """Whether the average gets worse along `order` (perplexity increases, or a score decreases);
    each step's gap (positive: as expected) and its noise."""
    sign = -1.0 if higher_is_better else 1.0
    steps = []
    for a, b in zip(order, order[1:]):
        step = {'runs': [a, b], 'gap': sign * (table[b]['average'] - table[a]['average']), 'rerun_gap': None,
                'noise': None}
        if a in rerun_table and b in rerun_table:
            step['rerun_gap'] = sign * (rerun_table[b]['average'] - rerun_table[a]['average'])
            step['noise'] = abs(step['gap'] - step['rerun_gap'])
        elif a in rerun_table or b in rerun_table:
            moved = [abs(table[n]['average'] - rerun_table[n]['average']) for n in (a, b) if n in rerun_table]
            step['noise'] = max(moved)
        steps.append(step)
    known = [step for step in steps if step['noise'] is not None]
    return {
        'order': list(order),
        'held': all(step['gap'] > 0 for step in steps),
        'steps': steps,
        'gaps_above_noise': all(step['gap'] > step['noise'] for step in known) if known else None,
    }


def comparison(runs: dict[str, storage.Path], orders: list[list[str]] = (),
               reruns: dict[str, storage.Path] | None = None) -> dict:
    """Per-run perplexities, for each run named like a domain whether it is best there, how much
    each rerun ({run name: workdir of its rerun}) moved, and each order's check."""
    reruns = reruns or {}
    missing = sorted(({name for order in orders for name in order} | set(reruns)) - set(runs))
    if missing:
        raise BamJaxError(f'--order or --rerun names runs that are not given with --run: {missing}')
    table = {name: final_perplexities(path) for name, path in runs.items()}
    rerun_table = {name: final_perplexities(path) for name, path in reruns.items()}
    domains = [d for d in next(iter(table.values())) if d != 'average']
    best = {d: min(table, key=lambda run: table[run].get(d, float('inf'))) for d in domains}
    experts = [name for name in runs if name in domains]
    downstream = {name: downstream_scores(path) for name, path in runs.items()}
    if not all(downstream.values()) or len({tuple(sorted(v)) for v in downstream.values()}) != 1:
        downstream = {}  # only when every run has scores on the same tasks
    rerun_downstream = {name: downstream_scores(path) for name, path in reruns.items()} if downstream else {}
    rerun_downstream = {name: values for name, values in rerun_downstream.items() if values}
    return {
        'perplexity': table,
        'best_run_per_domain': best,
        'experts_best_on_own_domain': {e: best[e] == e for e in experts},
        'reruns': {name: {'perplexity': values, 'difference': {d: values[d] - table[name][d] for d in values}}
                   for name, values in rerun_table.items()},
        'orders': [order_check(table, rerun_table, order) for order in orders],
        'downstream': downstream,
        'downstream_orders': [order_check(downstream, rerun_downstream, order, higher_is_better=True)
                              for order in orders] if downstream else [],
    }


def markdown(result: dict) -> str:
    """Perplexity per domain (the best in bold), then each downstream task's primary score."""
    table, downstream = result['perplexity'], result['downstream']
    domains = sorted(next(iter(table.values())), key=lambda d: (d == 'average', d))
    tasks = sorted(next(iter(downstream.values())), key=lambda t: (t == 'average', t)) if downstream else []
    header = domains + [f'{t} (tasks)' if t == 'average' else t for t in tasks]
    lines = ['| run | ' + ' | '.join(header) + ' |', '|---' * (len(header) + 1) + '|']
    for run, values in table.items():
        cells = []
        for d in domains:
            mark = '**' if result['best_run_per_domain'].get(d) == run else ''
            cells.append(f'{mark}{values[d]:.3f}{mark}')
        cells += [f'{downstream[run][t]:.3f}' for t in tasks]
        lines.append(f'| {run} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def verdicts(result: dict) -> list[str]:
    """One line per claim checked: experts on their domains, the reruns, each order."""
    lines = [f'{expert} expert best on {expert}: {"yes" if ok else "no"}'
             for expert, ok in result['experts_best_on_own_domain'].items()]
    for name, rerun in result['reruns'].items():
        lines.append(f'{name} rerun with other seeds: average perplexity {rerun["perplexity"]["average"]:.3f} '
                     f'({rerun["difference"]["average"]:+.3f})')
    checks = [('average perplexity', ' < ', check) for check in result['orders']]
    checks += [('average downstream score', ' > ', check) for check in result['downstream_orders']]
    for what, relation, check in checks:
        gaps = ', '.join(f'{step["gap"]:+.3f}' + ('' if step['noise'] is None else f' (noise {step["noise"]:.3f})')
                         for step in check['steps'])
        verdict = 'held' if check['held'] else 'did NOT hold'
        if check['held'] and check['gaps_above_noise'] is not None:
            verdict += ', every gap above its noise' if check['gaps_above_noise'] else ', but not every gap above noise'
        lines.append(f'{what} {relation.join(check["order"])}: {verdict}; gaps {gaps}')
    return lines


def _named_paths(specs: list[str], flag: str) -> dict[str, storage.Path]:
    named = {}
    for spec in specs:
        name, eq, path = spec.partition('=')
        if not eq or not name:
            raise BamJaxError(f'{flag} takes NAME=WORKDIR, got {spec!r}')
        named[name] = storage.path(path)
    return named


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bam_jax.evaluate.compare')
    parser.add_argument('--run', action='append', required=True, help='NAME=WORKDIR, repeatable')
    parser.add_argument('--out', required=True, help='directory for comparison.md and comparison.json')
    parser.add_argument('--order', action='append', default=[],
                        help='comma list of runs expected in increasing average perplexity, repeatable')
    parser.add_argument('--rerun', action='append', default=[],
                        help='NAME=WORKDIR: run NAME again with other seeds, for the noise; repeatable')
    args = parser.parse_args(argv)
    try:
        runs = _named_paths(args.run, '--run')
        reruns = _named_paths(args.rerun, '--rerun')
        orders = [[name for name in order.split(',') if name] for order in args.order]
        result = comparison(runs, orders, reruns)
    except BamJaxError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    out = storage.path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / 'comparison.md').write_text(text + '\n\n' + '\n'.join(f'- {line}' for line in verdicts(result)) + '\n')
    write_json_atomic(out / 'comparison.json', result)
    print(text)
    print('\n'.join(verdicts(result)))
    print(f'saved {out / "comparison.md"} and {out / "comparison.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
