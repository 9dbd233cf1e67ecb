"""`bam-jax eval`: per-domain perplexity, the routing map, overrides, and errors as one line.

The session's tiny BAM run and its `eval --json` (conftest.bam_run) are checked here; tests that
evaluate again work on a copy of it. The two tests that use it come first: xdist's load scheduler
hands the first two tests to one worker, so the other one trains and evaluates the dense run
meanwhile instead of waiting for the lock.
"""

import json
import math
import pathlib
import shutil

import gin
import jax
import numpy as np
import pytest

from bam_jax import data
from bam_jax.gin_config import parse_gin
from bam_jax.models import ModelConfig, abstract_model, merge_params, split_params
from bam_jax.train import TrainConfig

from helpers import assert_one_line_error, cli_in_process, finish, restore, start_eval, train_run

DOMAINS = ('general', 'code', 'law', 'math')
DENSE = ['gin/models/tiny.gin', 'gin/seed.gin']
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
def independent_losses(run: pathlib.Path, step: int, domains) -> dict[str, tuple[float, float]]:
    """{domain: (mean NLL, tokens)} of the eval batches, from the restored weights, in plain JAX."""
    step_dir = run / 'checkpoints' / str(step)
    parse_gin([str(run / 'config.gin')], [])
    model_config, data_config, train_config = ModelConfig(), data.DataConfig(), TrainConfig()
    gin.clear_config()  # what follows is independent of the run's bindings
    assert model_config.moe is not None and model_config.moa is not None
    params = jax.tree.map(np.asarray, restore(step_dir / 'params'))
    graphdef, _ = split_params(abstract_model(model_config))
    logits_fn = jax.jit(lambda p, tokens, segments, positions: merge_params(graphdef, p)(tokens, segments, positions))

    # The eval ran on EVAL_DEVICES devices, this runs on one: dropless routing makes them equal.
    losses = {}
    for domain in domains:
        total, count = 0.0, 0.0
        for batch in data.eval_batches(data_config, domain, train_config.batch_size, train_config.seq_len):
            logits = logits_fn(params, batch['inputs'], batch['segment_ids'], batch['positions'])
            logits = np.asarray(logits, np.float64)
            log_probs = logits - logits.max(-1, keepdims=True)
            log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
            nll = -np.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
            total += float((nll * batch['loss_weights']).sum())
            count += float(batch['loss_weights'].sum())
        losses[domain] = (total / count, count)
    return losses


def test_eval_json(bam_run):
    """`eval --json`: the schema, eval.json, the routing map, and perplexities checked independently."""
    result = bam_run['result']
    perplexity = result['perplexity']
    assert list(perplexity) == [*DOMAINS, 'average']
    for name, value in perplexity.items():
        assert math.isfinite(value) and value > 0, name
    assert perplexity['average'] == pytest.approx(np.mean([perplexity[d] for d in DOMAINS]), rel=1e-12)
    for domain in DOMAINS:
        assert perplexity[domain] == pytest.approx(math.exp(result['loss'][domain]), rel=1e-12)
        assert result['tokens'][domain] > 0
    assert result['step'] == 1
    assert pathlib.Path(result['checkpoint']) == bam_run['run'] / 'checkpoints' / '1'
    assert result['overrides'] == []

    layers = {f'layers/0/{kind}' for kind in ('ffn', 'attn')}
    assert list(result['routing']) == list(DOMAINS)
    for domain, by_layer in result['routing'].items():
        assert set(by_layer) == layers, domain
        for layer, fractions in by_layer.items():
            assert len(fractions) == 4, (domain, layer)
            assert all(0 <= f <= 1 for f in fractions), (domain, layer)
            assert sum(fractions) == pytest.approx(1.0, abs=1e-5), (domain, layer)
    # Progress went to stderr.
    for domain in DOMAINS:
        assert f'{domain}: perplexity' in bam_run['cli']['stderr']
    assert 'wrote' in bam_run['cli']['stderr']

    assert json.loads((bam_run['run'] / 'eval.json').read_text()) == result
    png = bam_run['run'] / 'routing_map.png'
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    for domain, (loss, tokens) in independent_losses(bam_run['run'], 1, ('law', 'math')).items():
        assert tokens == result['tokens'][domain]
        assert result['loss'][domain] == pytest.approx(loss, rel=1e-4)
        assert perplexity[domain] == pytest.approx(math.exp(loss), rel=1e-4)


def test_gin_overrides(bam_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / 'run'
    shutil.copytree(bam_run['run'], run)
    status, out, err = cli_in_process(monkeypatch, capsys, 'eval', f'--workdir={run}',
                                      "--gin.MoEConfig.routing='soft'")
    assert status == 0, err[-3000:]
    result = json.loads((run / 'eval.json').read_text())
    assert result['overrides'] == ["MoEConfig.routing = 'soft'"]
    before, after = bam_run['result']['perplexity'], result['perplexity']
    assert any(abs(after[d] - before[d]) > 1e-3 * before[d] for d in DOMAINS), (before, after)
    # The table: the perplexity row, then the routing sections.
    assert out.index('| step | general | code | law | math | average |') < out.index('ffn experts')
    assert f'| 1 | {after["general"]:.3f} |' in out
    assert 'ffn experts: fraction of tokens per expert' in out
    assert 'attn experts: fraction of tokens per expert' in out
    assert (run / 'routing_map.png').read_bytes()[:8] == PNG_MAGIC

    # An override that changes the architecture cannot restore the checkpoint: one line, no output.
    status, out, err = cli_in_process(monkeypatch, capsys, 'eval', f'--workdir={run}', '--gin.MoEConfig.num_experts=3')
    assert_one_line_error((status, err), "holds a run of a different model: moe is {'num_experts': 4, "
                          "'expert_split': 1} there, {'num_experts': 3, 'expert_split': 1} here")
    assert out == ''


def test_dense_run_has_no_routing(tmp_path, monkeypatch, capsys):
    run = tmp_path / 'dense'
    train_run(DENSE, run, 'ModelConfig.num_layers = 1')
    status, out, err = cli_in_process(monkeypatch, capsys, 'eval', f'--workdir={run}', '--json')
    assert status == 0, err[-3000:]
    result = json.loads(out)
    assert result['routing'] == {}
    assert set(result['perplexity']) == {*DOMAINS, 'average'}
    assert json.loads((run / 'eval.json').read_text()) == result
    assert not (run / 'routing_map.png').exists()
    assert 'wrote' in err and 'routing_map.png' not in err

    # In a process of its own, the error that Orbax's metadata read leads to is still one line.
    failed = finish(start_eval(f'--workdir={run}', '--gin.ModelConfig.d_ff=256', '--json'))
    assert_one_line_error((failed['status'], failed['stderr']), 'holds a run of a different model: d_ff is 512 there, '
                          '256 here')
    assert failed['stdout'] == ''


def test_directory_without_config_gin(tmp_path, monkeypatch, capsys):
    (tmp_path / 'checkpoints').mkdir()
    status, out, err = cli_in_process(monkeypatch, capsys, 'eval', f'--workdir={tmp_path}')
    assert_one_line_error((status, err), 'has no config.gin')
    assert out == ''


def test_nonexistent_workdir(tmp_path, monkeypatch, capsys):
    status, out, err = cli_in_process(monkeypatch, capsys, 'eval', f'--workdir={tmp_path / "nope"}', '--json')
    assert_one_line_error((status, err), str(tmp_path / 'nope'))
    assert out == ''
