"""The comparison table: orders, experts on their domains and run-to-run noise, checked against
perplexities written here and worked out by hand."""

import json

import pytest

from bam_jax.evaluate import compare


def _run(tmp_path, name, **perplexity):
    workdir = tmp_path / name
    workdir.mkdir()
    perplexity['average'] = sum(perplexity.values()) / len(perplexity)
    (workdir / 'eval.json').write_text(json.dumps({'perplexity': perplexity}))
    return workdir


@pytest.fixture
def runs(tmp_path):
    return {
        'seed': _run(tmp_path, 'seed', code=8.0, math=6.0),            # average 7.0
        'code': _run(tmp_path, 'code', code=5.0, math=11.0),           # 8.0
        'math': _run(tmp_path, 'math', code=10.0, math=2.0),           # 6.0
        'btx': _run(tmp_path, 'btx', code=5.5, math=3.5),              # 4.5
        'bam': _run(tmp_path, 'bam', code=5.2, math=3.2),              # 4.2
    }


def test_orders_gaps_and_noise(tmp_path, runs):
    reruns = {'btx': _run(tmp_path, 'btx_seed1', code=6.1, math=4.1),   # 5.1: moved +0.6
              'bam': _run(tmp_path, 'bam_seed1', code=5.9, math=3.7)}   # 4.8: moved +0.6
    result = compare.comparison(runs, [['bam', 'btx', 'seed'], ['btx', 'bam']], reruns)
    assert result['reruns']['btx']['difference']['average'] == pytest.approx(0.6)
    assert result['reruns']['btx']['difference']['code'] == pytest.approx(0.6)
    first, second = result['orders']
    bam_btx, btx_seed = first['steps']
    # both rerun: the gap went from 0.3 to 0.3 (5.1 - 4.8), so its noise is ~0 though each run moved 0.6
    assert bam_btx['gap'] == pytest.approx(0.3) and bam_btx['rerun_gap'] == pytest.approx(0.3)
    assert bam_btx['noise'] == pytest.approx(0.0)
    # the seed was not rerun: btx's own move is the noise
    assert btx_seed['gap'] == pytest.approx(2.5) and btx_seed['noise'] == pytest.approx(0.6)
    assert first['held'] and first['gaps_above_noise']
    assert not second['held'] and second['steps'][0]['gap'] == pytest.approx(-0.3)
    assert result['experts_best_on_own_domain'] == {'code': True, 'math': True}
    assert result['best_run_per_domain'] == {'code': 'code', 'math': 'math'}


def test_a_gap_within_the_noise_is_not_clear(tmp_path, runs):
    rerun = _run(tmp_path, 'bam_seed1', code=5.8, math=3.8)           # average 4.8: moved 0.6 > gap 0.3
    result = compare.comparison(runs, [['bam', 'btx', 'seed']], {'bam': rerun})
    assert result['orders'][0]['held'] and result['orders'][0]['gaps_above_noise'] is False
    assert 'held, but not every gap above noise' in compare.verdicts(result)[-1]


def test_without_reruns_the_noise_is_unknown(runs):
    (check,) = compare.comparison(runs, [['bam', 'btx']])['orders']
    assert check['steps'][0]['noise'] is None and check['gaps_above_noise'] is None


def test_cli_writes_markdown_and_json(tmp_path, runs, capsys):
    out = tmp_path / 'report'
    args = [f'--run={name}={path}' for name, path in runs.items()]
    assert compare.main([*args, '--out', str(out), '--order', 'bam,btx,seed']) == 0
    printed = capsys.readouterr().out
    assert '| bam | 5.200 | 3.200 | 4.200 |' in printed
    assert 'average perplexity bam < btx < seed: held; gaps +0.300, +2.500' in printed
    assert json.loads((out / 'comparison.json').read_text())['orders'][0]['held'] is True
    assert (out / 'comparison.md').read_text().startswith('| run | code | math | average |')


def test_cli_refuses_a_rerun_of_an_unknown_run(tmp_path, runs, capsys):
    out = tmp_path / 'report'
    args = [f'--run={name}={path}' for name, path in runs.items()]
    assert compare.main([*args, '--out', str(out), '--rerun', f'moe={runs["bam"]}']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and "['moe']" in err and err.count('\n') == 1
    assert not out.exists()


def _with_tasks(workdir, **scores):
    """Adds downstream scores (primary metric acc) to a run's eval.json."""
    evaluated = json.loads((workdir / 'eval.json').read_text())
    evaluated['tasks'] = {name: {'acc': value, 'acc_stderr': 0.05, 'n': 64, 'primary': 'acc', 'chance': 0.25,
                                 'group': False} for name, value in scores.items()}
    evaluated['tasks']['bam_domains'] = {'acc': 0.99, 'primary': 'acc', 'group': True}  # groups are not averaged
    (workdir / 'eval.json').write_text(json.dumps(evaluated))
    return workdir


def test_downstream_columns_and_their_order(tmp_path, runs):
    for name, (code, law) in {'seed': (0.30, 0.28), 'code': (0.40, 0.30), 'math': (0.32, 0.30),
                              'btx': (0.44, 0.36), 'bam': (0.50, 0.40)}.items():
        _with_tasks(runs[name], bam_code=code, bam_law=law)
    rerun = _with_tasks(_run(tmp_path, 'bam_seed1', code=5.3, math=3.3), bam_code=0.46, bam_law=0.38)  # avg 0.42
    result = compare.comparison(runs, [['bam', 'btx', 'seed']], {'bam': rerun})
    assert result['downstream']['bam'] == pytest.approx({'bam_code': 0.50, 'bam_law': 0.40, 'average': 0.45})
    check = result['downstream_orders'][0]
    bam_btx, btx_seed = check['steps']
    assert bam_btx['gap'] == pytest.approx(0.05) and btx_seed['gap'] == pytest.approx(0.11)  # 0.45-0.40, 0.40-0.29
    assert bam_btx['noise'] == pytest.approx(0.03)  # bam's rerun moved 0.45 -> 0.42
    assert check['held'] and check['gaps_above_noise']
    assert 'average downstream score bam > btx > seed: held, every gap above its noise' in compare.verdicts(result)[-1]
    header = compare.markdown(result).splitlines()[0]
    assert header.endswith('| bam_code | bam_law | average (tasks) |')
    # a run without task scores: no downstream columns at all
    (runs['math'] / 'eval.json').write_text(json.dumps({'perplexity': {'code': 10.0, 'math': 2.0, 'average': 6.0}}))
    assert compare.comparison(runs, [['bam', 'btx']])['downstream'] == {}
