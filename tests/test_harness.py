"""bam_jax as an lm-evaluation-harness model (bam_jax.evaluate.harness) and `bam-jax eval --tasks`,
on the session's tiny trained BAM run (byte vocabulary, length 64), against bam_jax's own forward
pass and evaluation step, and a hand computation of a task's score."""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from bam_jax import gin_config
from bam_jax.errors import BamJaxError
from bam_jax.evaluate.harness import BamJaxLM
from bam_jax.generate import LanguageModel
from bam_jax.models import merge_params
from bam_jax.train.step import make_eval_step

from helpers import assert_one_line_error, cli_in_process

TEXT = ('Permission is hereby granted, free of charge, to any person obtaining a copy of this software and '
        'associated documentation files, to deal in the Software without restriction, including the rights '
        'to use, copy, modify, merge, publish and distribute it.')


@pytest.fixture(scope='module')
def harness(bam_run):
    configs = gin_config.load_run_config(pathlib.Path(bam_run['run']), [])
    lm = LanguageModel.restore(bam_run['run'], configs.model, configs.data, configs.mesh, configs.max_length,
                               batch_size=4)
    assert lm.max_length == 64 and lm.start_id == 0
    return BamJaxLM(lm=lm, progress=None)


def request(kind, *args):
    return Instance(kind, {}, args, 0)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens):
    return merge_params(graphdef, params)(tokens)


def forward_log_probs(lm, ids):
    """log P(ids[i] | ids[:i]) for i >= 1, from one plain forward pass of the model. The row is
    padded on the right to the model's length, which a causal model's earlier positions never
    see: every call is the same compiled program."""
    row = np.zeros((1, lm.max_length), np.int32)
    row[0, :len(ids) - 1] = ids[:-1]
    logits = _logits(lm.graphdef, lm.params, row)
    log_probs = np.asarray(jax.nn.log_softmax(logits[0, :len(ids) - 1].astype(jnp.float32), axis=-1))
    return log_probs[np.arange(len(ids) - 1), ids[1:]]


def test_loglikelihood_is_the_sum_of_token_log_probs_with_left_truncation(harness):
    lm = harness.lm
    pairs = [('The court held', ' that the contract was void'), ('', 'Permission'), ('def add(a, b):', '\n'),
             (TEXT, ' Subject to the conditions.')]  # the last is longer than the model: cut from the left
    results = harness.loglikelihood([request('loglikelihood', c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        ids = [0, *lm.encode(context), *lm.encode(continuation)][-(lm.max_length + 1):]
        scored = forward_log_probs(lm, ids)[-len(lm.encode(continuation)):]
        assert logprob == pytest.approx(float(scored.sum()), rel=1e-5, abs=1e-4)
        assert isinstance(greedy, bool)
    assert len([0, *lm.encode(TEXT)]) > lm.max_length + 1


def test_loglikelihood_rolling_is_the_runs_held_out_nll(harness):
    lm = harness.lm
    (total,) = harness.loglikelihood_rolling([request('loglikelihood_rolling', TEXT)])
    # bam-jax eval's step on the text packed as the data pipeline packs a validation document:
    # chunks of the model's length, each read from the start token.
    ids = lm.encode(TEXT)
    chunks = [ids[i:i + lm.max_length] for i in range(0, len(ids), lm.max_length)]
    batch = {k: np.zeros((len(chunks), lm.max_length), np.float32 if k == 'loss_weights' else np.int32)
             for k in ('inputs', 'targets', 'segment_ids', 'positions', 'loss_weights')}
    for row, chunk in enumerate(chunks):
        n = len(chunk)
        batch['inputs'][row, :n] = [0, *chunk[:-1]]
        batch['targets'][row, :n] = chunk
        batch['segment_ids'][row, :n] = 1
        batch['positions'][row, :n] = np.arange(n)
        batch['loss_weights'][row, :n] = 1
    nll, count, _ = make_eval_step(lm.graphdef)(lm.params, batch)
    assert int(count) == len(ids) > 2 * lm.max_length
    assert total == pytest.approx(-float(nll), rel=1e-5)


def test_generate_until_stops_at_each_stop_sequence_as_the_engine_does(harness):
    lm = harness.lm
    prompt = 'The licensor grants'
    free = lm.generate([lm.encode(prompt)], 24)[0].text  # no stop strings
    stops = sorted({free[i] for i in (2, 5, 9) if i < len(free)})
    assert stops, free
    gen = [request('generate_until', prompt, {'until': [stop], 'max_gen_toks': 24, 'do_sample': False})
           for stop in stops]
    texts = harness.generate_until(gen)
    for stop, text in zip(stops, texts):
        assert text == free[:free.index(stop)]  # cut before the stop's first occurrence
        assert text == lm.generate([lm.encode(prompt)], 24, stop=[stop])[0].text
    # A context longer than the model keeps its end, leaving room for the new tokens.
    (long,) = harness.generate_until([request('generate_until', TEXT, {'until': ['\n\n'], 'max_gen_toks': 8})])
    room = lm.max_length - 1 - 8
    assert long == lm.generate([lm.encode(TEXT)[-room:]], 8, stop=['\n\n'])[0].text


def test_a_task_through_the_harness_scores_as_a_hand_computation(bam_run, harness, tmp_path, monkeypatch, capsys):
    run = tmp_path / 'run'
    shutil.copytree(bam_run['run'], run)
    status, out, err = cli_in_process(monkeypatch, capsys, 'eval', f'--workdir={run}', '--tasks=bam_law',
                                      '--limit=12', '--json')
    assert status == 0, err[-3000:]
    result = json.loads(out)
    assert json.loads((run / 'eval.json').read_text())['tasks'] == result['tasks']
    scored = result['tasks']['bam_law']
    assert scored['n'] == 12 and scored['primary'] == 'acc' and scored['chance'] == 0.25
    from bam_jax.evaluate import offline_tasks
    # By hand: the choice with the highest log-likelihood (per character, for acc_norm) is the answer.
    items = [json.loads(line) for line in
             (offline_tasks.write_tasks(gin_config.load_run_config(run, []).data) / 'bam_law.jsonl')
             .read_text().splitlines()][:12]
    hits, hits_norm = [], []
    for item in items:
        lls = [ll for ll, _ in harness.loglikelihood([request('loglikelihood', item['context'], choice)
                                                      for choice in item['choices']])]
        per_char = [ll / len(choice) for ll, choice in zip(lls, item['choices'])]  # the harness's acc_norm
        hits.append(int(np.argmax(lls)) == item['gold'])
        hits_norm.append(int(np.argmax(per_char)) == item['gold'])
    assert scored['acc'] == pytest.approx(np.mean(hits))
    assert scored['acc_norm'] == pytest.approx(np.mean(hits_norm))


@pytest.mark.parametrize('args, message', [
    (['--tasks=bam_nothing'], "unknown task 'bam_nothing': bam_jax has bam_math"),
    (['--tasks=bam_law', '--limit=0'], '--limit must be >= 1, got 0'),
    (['--tasks=bam_law', '--num_fewshot=-1'], '--num_fewshot must be >= 0'),
    (['--limit=3'], '--num_fewshot and --limit apply to --tasks'),
])
def test_bad_tasks_and_options_are_one_line(bam_run, args, message, monkeypatch, capsys):
    status, out, err = cli_in_process(monkeypatch, capsys, 'eval', f'--workdir={bam_run["run"]}', *args)
    assert_one_line_error((status, err), message)
    assert out == ''


def test_unknown_model_args_are_refused_in_one_line():
    import lm_eval.api.registry

    model = lm_eval.api.registry.get_model('bam_jax')
    with pytest.raises(BamJaxError, match='takes model_args workdir and gin, not dtype') as error:
        model.create_from_arg_string('workdir=runs/x,dtype=float32', {'batch_size': 4, 'device': 'cpu'})
    assert '\n' not in str(error.value)
