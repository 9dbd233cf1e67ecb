"""A comparison table of runs: held-out perplexity per domain, from each run's eval.json
(`bam-jax eval`), or else the last validation in its metrics.json.

  python -m bam_jax.evaluate.compare --run seed=runs/seed --run code=runs/code ... --out runs/report
      [--order bam,bam_shared_kv,btx,seed]

Prints a markdown table and writes it with a JSON copy to --out. --order names runs whose
average perplexity should increase in that order (BAM's claim: BAM expert-KV < BAM shared-KV
< BTX < seed); the result says whether it held.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from bam_jax.errors import BamJaxError
from bam_jax.evaluate.evaluator import RESULTS_FILE
from bam_jax.train.metrics import METRICS_FILE, write_json_atomic


def final_perplexities(workdir: pathlib.Path) -> dict[str, float]:
    """{domain: perplexity} from the run's eval.json, or its last validation in metrics.json."""
    evaluated = pathlib.Path(workdir) / RESULTS_FILE
    if evaluated.is_file():
        return json.loads(evaluated.read_text())['perplexity']
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise BamJaxError(f'{workdir} has no {METRICS_FILE}: has the run trained?')
    evals = json.loads(path.read_text()).get('eval', [])
    if not evals:
        raise BamJaxError(f'{path} has no validation results')
    last = evals[-1]
    return {key[:-len('/perplexity')]: value for key, value in last.items() if key.endswith('/perplexity')}


def comparison(runs: dict[str, pathlib.Path], order: list[str] = ()) -> dict:
    """Per-run perplexities, for each run named like a domain whether it is best there, and
    whether the average perplexity increases along `order`."""
    table = {name: final_perplexities(path) for name, path in runs.items()}
    missing = [name for name in order if name not in table]
    if missing:
        raise BamJaxError(f'--order names runs that are not given: {missing}')
    averages = [table[name]['average'] for name in order]
    domains = [d for d in next(iter(table.values())) if d != 'average']
    best = {d: min(table, key=lambda run: table[run].get(d, float('inf'))) for d in domains}
    experts = [name for name in runs if name in domains]
    return {
        'perplexity': table,
        'best_run_per_domain': best,
        'experts_best_on_own_domain': {e: best[e] == e for e in experts},
        'order': list(order),
        'order_held': all(a < b for a, b in zip(averages, averages[1:])) if order else None,
    }


def markdown(result: dict) -> str:
    table = result['perplexity']
    domains = sorted(next(iter(table.values())), key=lambda d: (d == 'average', d))
    lines = ['| run | ' + ' | '.join(domains) + ' |', '|---' * (len(domains) + 1) + '|']
    for run, values in table.items():
        cells = []
        for d in domains:
            mark = '**' if result['best_run_per_domain'].get(d) == run else ''
            cells.append(f'{mark}{values[d]:.3f}{mark}')
        lines.append(f'| {run} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bam_jax.evaluate.compare')
    parser.add_argument('--run', action='append', required=True, help='NAME=WORKDIR, repeatable')
    parser.add_argument('--out', required=True, help='directory for comparison.md and comparison.json')
    parser.add_argument('--order', default='', help='comma list of runs expected in increasing average perplexity')
    args = parser.parse_args(argv)
    try:
        runs = {}
        for spec in args.run:
            name, eq, path = spec.partition('=')
            if not eq:
                raise BamJaxError(f'--run takes NAME=WORKDIR, got {spec!r}')
            runs[name] = pathlib.Path(path)
        result = comparison(runs, [name for name in args.order.split(',') if name])
    except BamJaxError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / 'comparison.md').write_text(text + '\n')
    write_json_atomic(out / 'comparison.json', result)
    print(text)
    for expert, ok in result['experts_best_on_own_domain'].items():
        print(f'{expert} expert best on {expert}: {"yes" if ok else "no"}')
    if result['order']:
        print(f'average perplexity {" < ".join(result["order"])}: {"held" if result["order_held"] else "did NOT hold"}')
    print(f'saved {out / "comparison.md"} and {out / "comparison.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
