"""The routers table: routers initialised from the experts' domains (`bam-jax upcycle
--router_init=domain`) against random ones, at step 0 of the mix (no mix training), on the seed
and experts of `make demo` (runs/demo/{seed,code,law,math}; the table is skipped without them).

For BTX and BAM, each init: the held-out perplexity of the upcycled model per domain, and the share
of each expert domain's tokens routed top-1 to its own expert (FFN; BAM's soft attention experts:
the mean weight on the own expert), the mean over layers; next to each expert alone on its own
domain. Every model is evaluated by `bam-jax eval` with the same settings, in its own process.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

RUNS = 'runs/demo'
EXPERTS = ('code', 'law', 'math')
INITS = {'random': [], 'domain (seed inputs)': ['--router_init=domain'],
         'domain (layerwise)': ['--router_init=domain', '--router_inputs=layerwise']}
EVAL = ['--gin.TrainConfig.seq_len=128', '--gin.DataConfig.eval_batches=8', '--json']


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, '-m', 'bam_jax.cli', *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f'bam-jax {args[0]} failed: {done.stderr.strip().splitlines()[-1]}')
    return done.stdout


def _evaluate(workdir: pathlib.Path) -> dict:
    return json.loads(_cli('eval', f'--workdir={workdir}', *EVAL).strip().splitlines()[-1])


def _own_shares(result: dict) -> dict[str, dict[str, float]]:
    """{'ffn' | 'attn': {domain: mean over layers of the routing on the domain's own expert}}."""
    shares: dict[str, dict[str, float]] = {}
    for kind, names in result['experts'].items():
        for domain in EXPERTS:
            if domain in names:
                values = [fractions[names.index(domain)] for layer, fractions in result['routing'][domain].items()
                          if layer.endswith('/' + kind)]
                shares.setdefault(kind, {})[domain] = sum(values) / len(values)
    return shares


def run(runs: str = RUNS) -> dict | None:
    runs = pathlib.Path(runs)
    if not all((runs / name / 'checkpoints').is_dir() for name in ('seed', *EXPERTS)):
        print(f'routers table skipped: no `make demo` runs under {runs}')
        return None
    rows = []
    with tempfile.TemporaryDirectory(prefix='bam_jax-routers-') as tmp:
        for method in ('btx', 'bam'):
            for init, flags in INITS.items():
                out = pathlib.Path(tmp) / f'{method}_{len(rows)}'
                start = time.perf_counter()
                _cli('upcycle', f'--method={method}', f'--seed={runs / "seed"}',
                     f'--experts={",".join(str(runs / e) for e in EXPERTS)}', f'--out={out}', *flags)
                seconds = time.perf_counter() - start
                result = _evaluate(out)
                rows.append({'method': method, 'init': init, 'upcycle_s': seconds,
                             'perplexity': result['perplexity'], 'own_share': _own_shares(result)})
        alone = {}
        for expert in EXPERTS:  # from a copy: eval writes eval.json into the run it reads
            copy = pathlib.Path(tmp) / f'alone_{expert}'
            shutil.copytree(runs / expert, copy, ignore=shutil.ignore_patterns('tb', 'eval.json', '*.png'))
            alone[expert] = _evaluate(copy)['perplexity'][expert]
    return {'runs': str(runs), 'rows': rows, 'expert_alone': alone}


def print_table(r: dict | None) -> None:
    if r is None:
        return
    print(f'routers at step 0 of the mix, on {r["runs"]}: perplexity per domain; share routed to the own expert '
          '(FFN top-1 / BAM attention mean weight), mean over layers')
    header = (f'{"method":<6} {"init":<22}' + ''.join(f'{d:>8}' for d in ('general', *EXPERTS, 'average'))
              + ''.join(f'{"own " + d:>10}' for d in EXPERTS) + f'{"upcycle s":>10}')
    print(header)
    print('-' * len(header))
    for row in r['rows']:
        shares = row['own_share']
        own = ''.join(f'{shares["ffn"][d]:>5.2f}/{shares["attn"][d]:.2f}' if 'attn' in shares
                      else f'{shares["ffn"][d]:>10.2f}' for d in EXPERTS)
        print(f'{row["method"]:<6} {row["init"]:<22}'
              + ''.join(f'{row["perplexity"][d]:>8.2f}' for d in ('general', *EXPERTS, 'average'))
              + own + f'{row["upcycle_s"]:>10.1f}')
    print(f'{"each expert alone, own domain":<29}{"-":>8}' + ''.join(f'{r["expert_alone"][d]:>8.2f}' for d in EXPERTS))
