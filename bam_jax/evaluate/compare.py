"""A comparison table of runs: held-out perplexity per domain, from each run's metrics.json.

  python -m bam_jax.evaluate.compare --run seed=runs/seed --run code=runs/code ... --out runs/report

Prints a markdown table and writes it with a JSON copy to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from bam_jax.errors import BamJaxError
from bam_jax.train.metrics import METRICS_FILE, write_json_atomic


def final_perplexities(workdir: pathlib.Path) -> dict[str, float]:
    """{domain: perplexity} of the run's last validation."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise BamJaxError(f'{workdir} has no {METRICS_FILE}: has the run trained?')
    evals = json.loads(path.read_text()).get('eval', [])
    if not evals:
        raise BamJaxError(f'{path} has no validation results')
    last = evals[-1]
    return {key[:-len('/perplexity')]: value for key, value in last.items() if key.endswith('/perplexity')}


def comparison(runs: dict[str, pathlib.Path]) -> dict:
    """Per-run perplexities, and for each run named like a domain whether it is best there."""
    table = {name: final_perplexities(path) for name, path in runs.items()}
    domains = [d for d in next(iter(table.values())) if d != 'average']
    best = {d: min(table, key=lambda run: table[run].get(d, float('inf'))) for d in domains}
    experts = [name for name in runs if name in domains]
    return {
        'perplexity': table,
        'best_run_per_domain': best,
        'experts_best_on_own_domain': {e: best[e] == e for e in experts},
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
    args = parser.parse_args(argv)
    try:
        runs = {}
        for spec in args.run:
            name, eq, path = spec.partition('=')
            if not eq:
                raise BamJaxError(f'--run takes NAME=WORKDIR, got {spec!r}')
            runs[name] = pathlib.Path(path)
        result = comparison(runs)
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
    print(f'saved {out / "comparison.md"} and {out / "comparison.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
