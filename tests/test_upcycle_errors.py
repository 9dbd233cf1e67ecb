# ruff: noqa: F811 - the fixtures imported from upcycle_cases are test arguments
"""The upcycler's user errors (one line, nothing written) and its atomic output: an interrupted
run leaves nothing, an overwrite replaces the output only once the new one is whole."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from bam_jax import cli
from bam_jax import workdir as ckpt
from bam_jax.errors import BamJaxError
from bam_jax.upcycle import io as upcycle_io
from bam_jax.upcycle import upcycle_checkpoints

from helpers import assert_one_line_error, run_cli
from upcycle_cases import dense, read_params, step_dir, tmp_dir, tree_bytes, upcycled  # noqa: F401 (fixtures)

# --- 6. user errors: one line, nothing written -----------------------------------------------

def cli_upcycle(*args):
    return run_cli('upcycle', *args, timeout=120)


def assert_nothing_written(out: pathlib.Path):
    assert not out.exists()
    assert not tmp_dir(out).exists()
    assert not (out.parent / f'.{out.name}.upcycle-old').exists()


def test_cli_different_architectures(dense, tmp_path):
    out = tmp_path / 'out'
    proc = cli_upcycle('--method=btx', f'--seed={dense["seed"][0]}',
                       f'--experts={dense["code"][0]},{dense["wide"][0]}', f'--out={out}')
    assert_one_line_error(proc, 'different architectures: layers/0/ffn/wi_gate has shape (32, 64) in seed '
                                f'but shape (32, 128) in {dense["wide"][0]}')
    assert_nothing_written(out)


def test_cli_existing_output_is_kept_without_overwrite_and_replaced_with_it(dense, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('keep me')
    args = ['--method=bam', f'--seed={dense["seed"][0]}', f'--experts={dense["code"][0]},{dense["law"][0]}',
            f'--out={out}']
    assert_one_line_error(cli_upcycle(*args), f'{out} exists; pass --overwrite to replace it')
    assert tree_bytes(out) == {'notes.txt': b'keep me'}
    assert not tmp_dir(out).exists()

    # Success returns from main (an error would end this process: run those in a subprocess).
    assert cli.main(['upcycle', *args, '--overwrite', '--router_seed=3']) == 0
    stdout = capsys.readouterr().out
    assert 'bam: 3 experts (seed, ' in stdout and '3 FFN experts per layer;' in stdout
    assert f'wrote {out}; next: bam-jax train --gin_file={out}/model.gin --gin_file=gin/mix_bam.gin' in stdout
    assert not (out / 'notes.txt').exists() and not tmp_dir(out).exists()
    summary = json.loads((out / 'upcycle.json').read_text())
    assert summary['router_seed'] == 3 and summary['model']['moa']['num_experts'] == 3


def _error_cases(dense, tmp_path):
    junk = tmp_path / 'junk'
    junk.mkdir()
    (junk / 'notes.txt').write_text('not a checkpoint')
    run = lambda name: str(dense[name][0])  # noqa: E731
    return {
        'architecture': (dict(method='bam', experts=[run('code'), run('wide')], seed=run('seed')),
                         r'different architectures: layers/0/ffn/wi_gate has shape \(32, 64\) in seed '
                         r'but shape \(32, 128\) in .*wide'),
        'missing_parameter': (dict(method='btx', experts=[run('seed'), run('sequential')]),
                              r'different architectures: layers/0/attn_norm/scale has no such parameter in '
                              r'.*seed but shape \(32,\) in .*sequential'),
        'config_field': (dict(method='btx', experts=[run('code'), run('rope')], seed=run('seed')),
                         r'different architectures: ModelConfig.rope_theta is 10000.0 in seed but 500.0 in '),
        'vocabulary': (dict(method='btx', experts=[run('code'), run('vocab512')], seed=run('seed')),
                       r'different vocabularies: seed has 384 tokens, .*vocab512 has 512'),
        'nonexistent': (dict(method='btx', experts=[run('code'), str(tmp_path / 'nope')], seed=run('seed')),
                        r'nope does not exist'),
        'not_a_checkpoint': (dict(method='btx', experts=[run('code'), str(junk)], seed=run('seed')),
                             r'junk is not a bam_jax checkpoint'),
        'one_model': (dict(method='btx', experts=[], seed=run('seed')),
                      r'btx needs at least two expert models, got 1'),
        'one_expert_without_seed': (dict(method='bam', experts=[run('code')], seed=run('seed'), seed_expert=False),
                                    r'bam needs at least two expert models, got 1'),
        'sparse_two_models': (dict(method='sparse_upcycle', experts=[run('code')], seed=run('seed')),
                              r'sparse_upcycle takes exactly one dense model, got 2'),
        'unknown_method': (dict(method='moe', experts=[run('code'), run('law')], seed=run('seed')),
                           r"unknown upcycle method 'moe'; choose from btx, bam, bam_shared_kv, sparse_upcycle, lory"),
        'lory_split': (dict(method='lory', experts=[run('code')], seed=run('seed'), expert_split=2),
                       r'lory merges whole FFNs: expert_split must be 1'),
        'split_zero': (dict(method='btx', experts=[run('code')], seed=run('seed'), expert_split=0),
                       r'expert_split must be >= 1, got 0'),
        'split_not_dividing': (dict(method='btx', experts=[run('code')], seed=run('seed'), expert_split=3),
                               r'd_ff \(64\) is not divisible by expert_split \(3\)'),
    }


ERRORS = ['architecture', 'missing_parameter', 'config_field', 'vocabulary', 'nonexistent', 'not_a_checkpoint',
          'one_model', 'one_expert_without_seed', 'sparse_two_models', 'unknown_method', 'lory_split', 'split_zero',
          'split_not_dividing', 'already_moe', 'already_lory', 'damaged']


def damaged_copy(run: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
    """A copy of the run whose tensor data is zeroed: its metadata reads, its arrays do not."""
    shutil.copytree(run, to)
    data = [f for f in (to / 'checkpoints' / '1' / 'params').glob('ocdbt.process_*/d/*') if f.is_file()]
    assert data
    for f in data:
        f.write_bytes(b'\0' * 16)
    return to


@pytest.mark.parametrize('case', ERRORS)
def test_user_errors_raise_one_line_and_write_nothing(dense, upcycled, tmp_path, case):
    if case == 'already_moe':
        previous, _ = upcycled('btx', ['code', 'law'], seed='seed')
        kwargs = dict(method='bam', experts=[str(dense['code'][0]), str(previous)], seed=str(dense['seed'][0]))
        pattern = rf'{previous}/checkpoints/0 is already a mixture-of-experts model; upcycle dense models'
    elif case == 'already_lory':
        previous, _ = upcycled('lory', ['code', 'law'], seed='seed')
        kwargs = dict(method='btx', experts=[str(dense['code'][0]), str(previous)], seed=str(dense['seed'][0]))
        pattern = rf'{previous}/checkpoints/0 is already a mixture-of-experts model; upcycle dense models'
    elif case == 'damaged':  # found only while streaming: the temporary output must go too
        damaged = damaged_copy(dense['law'][0], tmp_path / 'damaged')
        kwargs = dict(method='btx', experts=[str(dense['code'][0]), str(damaged)], seed=str(dense['seed'][0]))
        pattern = rf'cannot read embed/embedding from {damaged}/checkpoints/1: '
    else:
        kwargs, pattern = _error_cases(dense, tmp_path)[case]
    out = tmp_path / 'out'
    with pytest.raises(BamJaxError, match=pattern) as raised:
        upcycle_checkpoints(out=out, progress=False, **kwargs)
    assert '\n' not in str(raised.value)
    assert_nothing_written(out)


# --- 7. atomic output ------------------------------------------------------------------------

def interrupt_after(monkeypatch, tensors: int):
    """Makes the upcycler's tensor builder raise KeyboardInterrupt (Ctrl-C) after `tensors`
    tensors, some of them already saved."""
    real, built = upcycle_io.build, []

    def build(*args, **kwargs):
        if len(built) == tensors:
            raise KeyboardInterrupt
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(upcycle_io, 'build', build)
    return built


def test_interrupted_upcycle_leaves_no_output_and_a_rerun_succeeds(dense, upcycled, tmp_path, monkeypatch):
    args = ('btx', [str(dense['code'][0]), str(dense['law'][0])])
    out = tmp_path / 'out'
    built = interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        upcycle_checkpoints(*args, out, seed=str(dense['seed'][0]), progress=False)
    assert len(built) == 5
    assert_nothing_written(out)
    with pytest.raises(BamJaxError, match='does not exist'):
        ckpt.resolve_checkpoint(out)
    monkeypatch.undo()

    # A killed run cannot clean up: its half-written temporary directory is replaced.
    stale = tmp_dir(out) / 'checkpoints' / '0' / 'params'
    stale.mkdir(parents=True)
    (stale / 'half_written').write_text('stale')
    with pytest.raises(BamJaxError, match='is not a bam_jax checkpoint'):
        ckpt.resolve_checkpoint(tmp_dir(out))

    upcycle_checkpoints(*args, out, seed=str(dense['seed'][0]), progress=False)
    assert not tmp_dir(out).exists() and not (out / 'checkpoints' / '0' / 'params' / 'half_written').exists()
    _, reference = upcycled('btx', ['code', 'law'], seed='seed')
    params = read_params(step_dir(out))
    assert params.keys() == reference.keys()
    for path, value in reference.items():
        np.testing.assert_array_equal(params[path], value)


def test_overwrite_replaces_the_output_and_a_failed_overwrite_keeps_it(dense, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    seed = str(dense['seed'][0])
    upcycle_checkpoints('btx', [str(dense['code'][0]), str(dense['law'][0])], out, seed=seed, progress=False)
    first = tree_bytes(out)
    upcycle_checkpoints('btx', [str(dense['math'][0]), str(dense['law'][0])], out, seed=seed, overwrite=True,
                        progress=False)
    assert json.loads((out / 'upcycle.json').read_text())['expert_models'][1] == str(dense['math'][0])
    np.testing.assert_array_equal(read_params(step_dir(out))['layers/0/ffn/experts/wo'][1],
                                  dense['math'][1]['layers/0/ffn/wo'])
    assert not tmp_dir(out).exists() and not (tmp_path / '.out.upcycle-old').exists()
    second = tree_bytes(out)
    assert second != first

    interrupt_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        upcycle_checkpoints('bam', [str(dense['code'][0]), str(dense['law'][0])], out, seed=seed, overwrite=True,
                            progress=False)
    monkeypatch.undo()
    assert tree_bytes(out) == second
    assert ckpt.read_model_config(step_dir(out)).moa is None  # still the btx output
    assert not tmp_dir(out).exists() and not (tmp_path / '.out.upcycle-old').exists()

    # An existing file is replaced as well (when asked to).
    file = tmp_path / 'file'
    file.write_text('old')
    upcycle_checkpoints('btx', [str(dense['code'][0]), str(dense['law'][0])], file, seed=seed, overwrite=True,
                        progress=False)
    assert ckpt.resolve_checkpoint(file) == step_dir(file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file', 'out']
