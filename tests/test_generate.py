"""The decode engine against independent references: the full forward pass (prefill + decode
logits), a cache-free greedy loop, each prompt alone (batches of mixed lengths), one device (the
8-device mesh), hand-made distributions (sampling), and the cache's size per architecture."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from bam_jax.generate import Engine, LanguageModel, Sampling, cache_bytes, cache_spec
from bam_jax.generate.sampling import sample, top_k_filter, top_p_filter
from bam_jax.gin_config import load_run_config
from bam_jax.models import ModelConfig, abstract_model, build_model, merge_params, param_shardings, split_params
from bam_jax.models.config import LoryConfig, MoAConfig, MoEConfig
from bam_jax.parallel import MeshConfig, create_mesh

import references
from helpers import assert_one_line_error, cli_in_process, restore

# Prefill and decode compute the same sums as the full pass in another grouping (one position
# against all of them, a cache against the sequence): float32 rounding, nothing more.
close = functools.partial(references.close, rtol=1e-5, atol=1e-5)

# Large enough weights (init_std) that routers, gates and next tokens differ from token to token.
BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                   dtype='float32', init_std=0.3)
ARCHS = {
    'dense': {},
    'btx_top1': dict(moe=MoEConfig(num_experts=3, top_k=1)),
    'btx_top2': dict(moe=MoEConfig(num_experts=3, top_k=2, gate='renormalize')),
    'bam_expert_kv': dict(moe=MoEConfig(num_experts=3), moa=MoAConfig(num_experts=3)),
    'bam_shared_kv': dict(moe=MoEConfig(num_experts=3), moa=MoAConfig(num_experts=3, shared_kv=True)),
    'lory': dict(lory=LoryConfig(num_experts=3, segment_len=4)),
}
EOS = 1


def arch(name, parallel=True, num_layers=2):
    return dataclasses.replace(BASE, parallel_block=parallel, num_layers=num_layers, **ARCHS[name])


# The generation tests run one-layer models (compiling a decode loop is most of their cost); the
# prefill and decode test above covers the cache's passage through several layers.
def small(name, parallel=True):
    return arch(name, parallel, num_layers=1)


PROMPT_LENGTHS = (3, 9, 17)


def prompts_of(lengths=PROMPT_LENGTHS):
    return [random_tokens(n, seed=n).tolist() for n in lengths]


def random_tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(2, BASE.vocab_size, shape).astype(np.int32)


@functools.cache
def model_of(config):
    """(params, engine, forward) of a randomly initialised model; forward(params, tokens [B, T],
    prompt_len [B]) is the full pass without a cache (Lory merges from the first prompt_len tokens)."""
    graphdef, params = split_params(build_model(config, seed=1))
    forward = jax.jit(lambda p, t, n: merge_params(graphdef, p)(t, prompt_len=n))
    return params, Engine(graphdef, config, bucket=4, prefill_chunk=4, cache_bucket=32), forward


@pytest.mark.parametrize('parallel', [True, False], ids=['parallel', 'sequential'])
@pytest.mark.parametrize('name', list(ARCHS))
def test_prefill_and_decode_equal_full_forward(name, parallel):
    """Rows of 12 tokens: prompts of 5 and 2 tokens prefilled (in two chunks of 4, but Lory's at
    once), then one token per decode step; each step's logits are the full pass's at that
    position (Lory: merged from the prompt)."""
    params, engine, forward = model_of(arch(name, parallel))
    rows = random_tokens((2, 12))
    lengths = np.array([5, 2], np.int32)
    want = np.asarray(forward(params, jnp.asarray(rows), jnp.asarray(lengths)))
    assert np.abs(want).max() > 1.0  # not about near-zero logits
    prompts, _ = engine.pad_prompts([rows[0, :5], rows[1, :2]])
    logits, cache = engine.prefill(params, jnp.asarray(prompts), jnp.asarray(lengths), engine.new_cache(2, 16))
    close(logits, want[[0, 1], lengths - 1])
    for step in range(1, 7):
        position = lengths - 1 + step
        logits, cache = engine.decode_step(params, jnp.asarray(rows[[0, 1], position]), jnp.asarray(position),
                                           cache)
        close(logits, want[[0, 1], position])


def naive_greedy(config, prompt, new_tokens, width=32):
    """Greedy decoding without a cache: the full pass over the growing sequence, each time."""
    params, _, forward = model_of(config)
    seq = list(prompt)
    while len(seq) < len(prompt) + new_tokens:
        row = np.zeros((1, width), np.int32)  # padding after the sequence: causal, so never read
        row[0, :len(seq)] = seq
        logits = forward(params, jnp.asarray(row), jnp.asarray([len(prompt)]))
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.mark.parametrize('name, parallel', [('btx_top1', True), ('bam_shared_kv', False), ('lory', True)])
def test_greedy_equals_cache_free_loop_and_each_prompt_alone(name, parallel):
    """A batch of three prompts of 3, 9 and 17 tokens: each row's 10 greedy tokens are the cache-free
    loop's, and what the prompt gives alone (dropless routing: no row depends on another)."""
    config = small(name, parallel)
    params, engine, _ = model_of(config)
    prompts = prompts_of()
    batch = engine.generate(params, prompts, 10, eos_id=-2)  # an id never sampled: no early stop
    for prompt, out in zip(prompts, batch):
        assert out == naive_greedy(config, prompt, 10)
        assert engine.generate(params, [prompt], 10, eos_id=-2) == [out]


def test_mesh_equals_one_device():
    """BAM (expert-KV attention experts, top-1 FFN experts) on the 8-device mesh, batch and experts
    spread (data 2 x expert 4), generates what one device generates."""
    config = dataclasses.replace(small('bam_expert_kv'), moe=MoEConfig(num_experts=4), moa=MoAConfig(num_experts=4))
    params, engine, _ = model_of(config)
    prompts = prompts_of((4, 7, 2, 12, 5, 9, 3, 6))
    want = engine.generate(params, prompts, 6, eos_id=-2)
    mesh = create_mesh(MeshConfig(data=2, expert=4))
    graphdef, _ = split_params(build_model(config, seed=1))
    on_mesh = Engine(graphdef, config, mesh, bucket=4, prefill_chunk=4, cache_bucket=32)
    placed = jax.device_put(params, param_shardings(build_model(config), mesh))
    assert placed['layers']['0']['ffn']['experts']['wi_gate'].sharding.spec[0] == 'expert'
    assert on_mesh.generate(placed, prompts, 6, eos_id=-2) == want


def test_cache_bytes():
    """Shared-KV attention experts cache exactly what the dense model caches; expert KV, N times as
    much. Lory's K/V are the dense ones, plus one merged FFN per row."""
    kv = 2 * BASE.num_layers * 4 * 32 * BASE.num_kv_heads * BASE.resolved_head_dim * 4  # K and V, float32
    spec = {name: cache_spec(arch(name), batch=4, max_len=32) for name in ARCHS}
    assert cache_bytes(spec['dense']) == kv
    assert cache_bytes(spec['btx_top2']) == kv
    assert jax.tree.map(lambda x: (x.shape, x.dtype), spec['bam_shared_kv']) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), spec['dense'])
    assert cache_bytes(spec['bam_expert_kv']) == 3 * kv
    merged = BASE.num_layers * 4 * 3 * BASE.d_model * BASE.d_ff * 4
    assert cache_bytes(spec['lory']) == kv + merged
    params, engine, _ = model_of(arch('bam_expert_kv'))
    assert cache_bytes(engine.new_cache(4, 32)) == 3 * kv


# ---------------------------------------------------------------------------------------
# Sampling

HAND_LOGITS = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))


def draws(logits, sampling, n=400):
    keys = jax.random.split(jax.random.key(0), n)
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, logits.shape[-1]))
    return set(np.asarray(sample(rows, keys, sampling)).tolist())


def test_top_k_and_top_p_stay_in_the_allowed_set():
    assert draws(HAND_LOGITS, Sampling(temperature=1.0)) == {0, 1, 2, 3}
    assert draws(HAND_LOGITS, Sampling(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(HAND_LOGITS, Sampling(temperature=1.0, top_p=0.7)) == {0, 1}     # 0.5, then 0.5 < 0.7
    assert draws(HAND_LOGITS, Sampling(temperature=1.0, top_p=0.85)) == {0, 1, 2}  # 0.8 < 0.85
    assert draws(HAND_LOGITS, Sampling(temperature=1.0, top_p=0.5)) == {0}        # 0.5 is not < 0.5
    assert draws(HAND_LOGITS, Sampling(temperature=1.0, top_k=3, top_p=0.7)) == {0, 1}
    np.testing.assert_array_equal(np.isfinite(top_k_filter(jnp.asarray(HAND_LOGITS), 3)), [[1, 1, 1, 0]])
    np.testing.assert_array_equal(np.isfinite(top_p_filter(jnp.asarray(HAND_LOGITS), 0.7)), [[1, 1, 0, 0]])


def test_sampled_generation():
    """The same seed gives the same tokens and another seed others; temperature -> 0 is greedy; a
    row stops at EOS, the other rows go on."""
    params, engine, _ = model_of(small('btx_top1'))
    prompts = prompts_of()
    hot = Sampling(temperature=2.0, top_k=20, top_p=0.95)
    first = engine.generate(params, prompts, 10, eos_id=-2, sampling=hot, seed=7)
    assert engine.generate(params, prompts, 10, eos_id=-2, sampling=hot, seed=7) == first
    assert engine.generate(params, prompts, 10, eos_id=-2, sampling=hot, seed=8) != first
    greedy = engine.generate(params, prompts, 10, eos_id=-2)
    assert first != greedy
    assert engine.generate(params, prompts, 10, eos_id=-2, sampling=Sampling(temperature=1e-4)) == greedy
    eos = greedy[0][4]  # row 0's fifth token: called EOS, row 0 stops there
    stopped = engine.generate(params, prompts, 10, eos_id=eos)
    for row, out in zip(greedy, stopped):
        assert out == (row[:row.index(eos) + 1] if eos in row else row)
    assert len(stopped[0]) <= 5


# ---------------------------------------------------------------------------------------
# The language-model API (byte vocabulary) and `bam-jax generate`

def byte_lm(name='lory', max_length=32):
    config = dataclasses.replace(small(name), vocab_size=384)
    graphdef, params = split_params(build_model(config, seed=1))
    return LanguageModel(config, graphdef, params, seqio.ByteVocabulary(), max_length, batch_size=4), config


def np_log_probs(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_loglikelihood_equals_forward_pass():
    """Each request's log P(continuation | context), in a batch, is the sum over the continuation of
    the token log-probabilities of a plain forward pass over that request alone, read after the
    start token 0 and cut from the left to max_length, with Lory merging from the context.
    greedy: whether every continuation token is the arg-max."""
    lm, config = byte_lm()
    forward = model_of(config)[2]
    requests = [(random_tokens(n, seed=n).tolist(), random_tokens(k, seed=k + 50).tolist())
                for n, k in ((5, 3), (40, 4), (0, 6), (10, 1), (31, 1))]  # 40 + 4 > 32 + 1: cut
    got = lm.loglikelihood(requests)
    for (context, continuation), (logp, greedy) in zip(requests, got):
        whole = ([0] + context + continuation)[-33:]
        n = len(whole) - 1
        logits = np.asarray(forward(lm.params, jnp.asarray([whole[:-1]]), jnp.asarray([n - len(continuation) + 1])))
        token_lp = np.take_along_axis(np_log_probs(logits[0]), np.asarray(whole[1:])[:, None], -1)[:, 0]
        close(logp, token_lp[-len(continuation):].sum())
        assert greedy == bool(np.all(np.argmax(logits[0], -1)[-len(continuation):] == np.asarray(continuation)))
    # A continuation that is the model's own greedy output is greedy.
    context = requests[0][0]
    own = lm.generate([context], 4)[0].completion_ids
    assert len(own) > 0 and lm.loglikelihood([(context, own)])[0][1]


def test_generate_stops_at_stop_strings():
    lm, _ = byte_lm('btx_top1')
    prompt = lm.encode('abc')
    free = lm.generate([prompt], 12)[0]
    assert free.stop_reason == 'length' and len(free.completion_ids) == 12
    stop = free.text[4:6]
    cut = lm.generate([prompt], 12, stop=[stop, 'never there'])[0]
    assert cut.stop_reason == 'stop'
    assert cut.text == free.text[:free.text.find(stop)]
    assert cut.completion_ids == free.completion_ids[:len(cut.completion_ids)]
    assert lm.decode(cut.completion_ids) == cut.text


def test_cli_json_equals_cache_free_greedy(bam_run, tmp_path, monkeypatch, capsys):
    """`generate --prompts=FILE --json` on the session's tiny BAM run: one object per prompt, whose
    completion is the cache-free greedy loop's over the restored checkpoint, decoded by the run's
    byte vocabulary."""
    run_dir = bam_run['run']
    prompts = tmp_path / 'prompts.jsonl'
    prompts.write_text(json.dumps({'prompt': 'def main('}) + '\n\n' + json.dumps('The licensee') + '\n')
    status, out, err = cli_in_process(monkeypatch, capsys, 'generate', f'--workdir={run_dir}',
                                      f'--prompts={prompts}', '--max_new_tokens=8', '--json')
    assert status == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line['prompt'] for line in lines] == ['def main(', 'The licensee']
    vocab = seqio.ByteVocabulary()
    load_run_config(run_dir, [])
    config = ModelConfig()
    graphdef, _ = split_params(abstract_model(config))
    params = restore(run_dir / 'checkpoints' / '1' / 'params')
    forward = jax.jit(lambda p, t: merge_params(graphdef, p)(t))
    for line in lines:
        assert set(line) >= {'prompt', 'completion', 'prompt_ids', 'completion_ids', 'stop_reason'}
        assert line['prompt_ids'] == list(vocab.encode(line['prompt']))
        # the start token every training document began with, then the prompt: what the model read
        assert line['start_id'] == 0 and line['input_ids'] == [0, *line['prompt_ids']]
        seq = list(line['input_ids'])
        for _ in range(8):
            row = np.zeros((1, 64), np.int32)
            row[0, :len(seq)] = seq
            seq.append(int(np.argmax(forward(params, jnp.asarray(row))[0, len(seq) - 1])))
        want = seq[1 + len(line['prompt_ids']):]
        if EOS in want:
            assert line['stop_reason'] == 'eos'
            want = want[:want.index(EOS)]
        assert line['completion_ids'] == want
        assert line['completion'] == vocab.decode(want)
    assert 'new tokens' in err  # progress, on stderr


def test_cli_text_and_errors(bam_run, tmp_path, monkeypatch, capsys):
    run_dir = bam_run['run']
    status, out, err = cli_in_process(monkeypatch, capsys, 'generate', f'--workdir={run_dir}', '--prompt=Licen',
                                      '--max_new_tokens=3', '--temperature=0.8', '--top_k=5', '--seed=3')
    assert status == 0, err
    assert out.startswith('--- 1/1: 5 + ') and '\nLicen' in out
    run = functools.partial(cli_in_process, monkeypatch, capsys, 'generate')
    assert_one_line_error(run(f'--workdir={run_dir}', '--prompt=')[::2], 'prompt 0 is empty')
    assert_one_line_error(run(f'--workdir={run_dir}', '--prompt=' + 'x' * 63)[::2], 'prompt 0 has 63 tokens',
                          'at most 62')
    assert_one_line_error(run(f'--workdir={run_dir}')[::2], 'either as --prompt')
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    assert_one_line_error(run(f'--workdir={run_dir}', f'--prompts={bad}')[::2], 'bad.jsonl:2')
    empty_run = tmp_path / 'no_checkpoint'
    empty_run.mkdir()
    shutil.copy(run_dir / 'config.gin', empty_run / 'config.gin')
    assert_one_line_error(run(f'--workdir={empty_run}', '--prompt=a')[::2], 'is not a bam_jax checkpoint')
    assert_one_line_error(run(f'--workdir={run_dir}', '--prompt=a', '--top_p=0')[::2], 'top_p must be in (0, 1]')
