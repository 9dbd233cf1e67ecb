"""The tables of launch/router_study.sh: routers from the experts' domains against random ones,
and expert surgery, from the runs it wrote under OUT.

    python -m bam_jax.benchmarks.router_study OUT     (prints the tables, writes OUT/router_study.json)
    python -m bam_jax.benchmarks.router_study OUT --rescale   (writes the `scaled` inits, below)

Inits: random (router seeds 0 and 1), scaled (those random rows rescaled to the domain rows'
mean column norm: the domain rows' scale without their directions), domain (seed inputs),
layerwise.

  step 0    each upcycled model before mix training: average perplexity, and each expert
            domain's share of routing on its own expert (FFN top-1; BAM attention: mean weight)
  mix       150 mix steps: the final average validation loss, and the first validation step
            (every 15) at or below the random init's final loss, the mean of its two runs
  surgery   the fifth domain added (man pages): its perplexity in the four-expert mix, after
            `experts add`, after router-only training on 5% of the mix's tokens, and in a full
            upcycle and mix of all five; the law expert removed: every domain's change
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

EXPERTS = ('code', 'law', 'math')
DOMAINS = ('general', 'code', 'law', 'math')
INITS = ('random', 'scaled', 'domain', 'layerwise')


def rescale(out: pathlib.Path) -> None:
    """OUT/{method}_scaled_s{seed}_init: the random inits with every router column rescaled to
    the mean column norm of the domain init's router."""
    from bam_jax import storage, workdir
    from bam_jax.upcycle.gin_file import model_gin
    from bam_jax.workdir import outputs, tensors

    for method in ('btx', 'bam'):
        domain = tensors.CheckpointReader(workdir.resolve_checkpoint(out / f'{method}_domain_s0_init'))
        for seed in (0, 1):
            source = workdir.resolve_checkpoint(out / f'{method}_random_s{seed}_init')
            reader, target = tensors.CheckpointReader(source), storage.path(out / f'{method}_scaled_s{seed}_init')
            params = {path: reader.read(path) for path in reader.nbytes}
            for path in (p for p in params if p.endswith('/router/kernel')):
                norm = np.linalg.norm(domain.read(path), axis=0).mean()
                params[path] = (params[path] / np.linalg.norm(params[path], axis=0) * norm).astype(np.float32)
            config = workdir.read_model_config(source)
            with outputs.atomic_output(target, 'upcycle', overwrite=True) as tmp:
                tensors.write_params(tmp, sorted(params.items()), budget=1 << 26)
                outputs.write_model_config(tmp, config)
                (tmp / 'model.gin').write_text(model_gin(config, target, 'router_study --rescale'))


def _last_json(path: pathlib.Path) -> dict | None:
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.startswith('{')]
    return json.loads(lines[-1]) if lines else None


def _shares(result: dict) -> dict[str, dict[str, float]]:
    shares: dict[str, dict[str, float]] = {}
    for kind in ('ffn', 'attn'):
        names = result.get('experts', {}).get(kind, [])
        names = names if 'code' in names else ['seed', *EXPERTS]  # unnamed experts: the study's upcycle order
        for domain in EXPERTS:
            index = names.index(domain)
            values = [v[index] for layer, v in result['routing'][domain].items() if layer.endswith('/' + kind)]
            if values:
                shares.setdefault(kind, {})[domain] = float(np.mean(values))
    return shares


def step0(out: pathlib.Path) -> list[dict]:
    rows = []
    for method in ('btx', 'bam'):
        for init in INITS:
            for seed in (0, 1):
                result = _last_json(out / f'{method}_{init}_s{seed}_init.eval.json')
                if result:
                    rows.append({'run': f'{method}_{init}_s{seed}', 'perplexity': result['perplexity'],
                                 'own_share': _shares(result)})
    return rows


def mix(out: pathlib.Path) -> list[dict]:
    rows = []
    for method in ('btx', 'bam'):
        curves = {}
        for init in INITS:
            for seed in (0, 1):
                metrics = out / f'{method}_{init}_s{seed}' / 'metrics.json'
                if (out / f'{method}_{init}_s{seed}' / 'budget.json').is_file():
                    evals = json.loads(metrics.read_text())['eval']
                    curves[(init, seed)] = [(r['step'], r['average/loss']) for r in evals]
        randoms = [c[-1][1] for (init, _), c in curves.items() if init == 'random']
        if not randoms:
            continue
        target = float(np.mean(randoms))
        for (init, seed), curve in curves.items():
            reach = next((step for step, loss in curve if loss <= target), None)
            rows.append({'run': f'{method}_{init}_s{seed}', 'final_loss': curve[-1][1], 'steps': curve[-1][0],
                         'reaches_random_final_at': reach, 'random_final_loss': target, 'curve': curve})
    return rows


def surgery(out: pathlib.Path) -> dict | None:
    runs = {name: _last_json(out / f'{name}.eval5.json')
            for name in ('btx_domain_s0', 'add5', 'add5_router', 'btx5', 'remove_law', 'seed')}
    if any(result is None for result in runs.values()):
        return None
    ppl = {name: result['perplexity'] for name, result in runs.items()}
    base = ppl['btx_domain_s0']['manpages']
    gain = {name: base - ppl[name]['manpages'] for name in ('add5', 'add5_router', 'btx5')}
    return {'perplexity': ppl, 'manpages_gain': gain,
            'router_only_share_of_full_gain': gain['add5_router'] / gain['btx5'] if gain['btx5'] else None,
            'old_domains_change_after_router_only': {
                d: ppl['add5_router'][d] / ppl['btx_domain_s0'][d] - 1 for d in DOMAINS},
            'remove_law_change': {d: ppl['remove_law'][d] / ppl['btx_domain_s0'][d] - 1 for d in DOMAINS}}


def print_tables(result: dict) -> None:
    print('step 0 (no mix training)       ' + ''.join(f'{d:>9}' for d in (*DOMAINS, 'average'))
          + '   own share: ' + ' '.join(f'{d:>10}' for d in EXPERTS))
    for row in result['step0']:
        shares = row['own_share']
        own = ' '.join(f'{shares["ffn"][d]:.2f}/{shares["attn"][d]:.2f}' if 'attn' in shares
                       else f'{shares["ffn"][d]:>10.2f}' for d in EXPERTS)
        print(f'{row["run"]:<31}' + ''.join(f'{row["perplexity"][d]:>9.3f}' for d in (*DOMAINS, 'average'))
              + '              ' + own)
    print('\nmix (150 steps)                final loss   reaches the random init\'s final loss at step')
    for row in result['mix']:
        reach = row['reaches_random_final_at']
        print(f'{row["run"]:<31}{row["final_loss"]:>10.4f}   {reach if reach is not None else "never":>5} '
              f'of {row["steps"]} (random: {row["random_final_loss"]:.4f})')
    if result['surgery']:
        s = result['surgery']
        print('\nsurgery                        ' + ''.join(f'{d:>10}' for d in (*DOMAINS, 'manpages')))
        for name in ('seed', 'btx_domain_s0', 'remove_law', 'add5', 'add5_router', 'btx5'):
            print(f'{name:<31}' + ''.join(f'{s["perplexity"][name][d]:>10.3f}' for d in (*DOMAINS, 'manpages')))
        share = s['router_only_share_of_full_gain']
        print(f'router-only training reaches {share:.0%} of the full mix\'s gain on manpages' if share is not None
              else 'the full mix gains nothing on manpages')


def main(out: str, *flags: str) -> None:
    out = pathlib.Path(out)
    if '--rescale' in flags:
        rescale(out)
        return
    result = {'step0': step0(out), 'mix': mix(out), 'surgery': surgery(out)}
    print_tables(result)
    (out / 'router_study.json').write_text(json.dumps(result, indent=1) + '\n')
    print(f'wrote {out / "router_study.json"}')


if __name__ == '__main__':
    main(*sys.argv[1:])
