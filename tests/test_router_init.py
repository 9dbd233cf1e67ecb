"""Routers initialised from the experts' domains (bam_jax/upcycle/router_init.py), against a
hand-made model whose blocks' inputs are known: with every attention and FFN output projection
zero, the residual stream stays the token's embedding, so each block's router input is
RMSNorm(embedding) and a domain's mean input is a numpy sum over its tokens. The rows follow from
the rule written again here (centred across experts, normalised, one scale)."""

import json
import math

import numpy as np
import pytest

from bam_jax.errors import BamJaxError
from bam_jax.models import ModelConfig
from bam_jax.upcycle import router_init
from bam_jax.upcycle.core import UpcycleSpec, upcycle

from helpers import assert_one_line_error
from references import np_rms_norm
from upcycle_cases import dense, random_params  # noqa: F401 - the dense fixture

CONFIG = ModelConfig(vocab_size=64, d_model=8, num_layers=2, num_heads=2, num_kv_heads=2, d_ff=16, dtype='float32')
START, PAD = 0, 63
DOMAIN_TOKENS = [range(3, 31), range(3, 16), range(16, 31)]  # the seed's mixture, then two experts'


def silent(seed):
    """A dense model whose attention and FFNs add nothing to the residual stream."""
    params = random_params(CONFIG, seed)
    return {k: np.zeros_like(v) if k.endswith(('attn/wo', 'ffn/wo')) else v for k, v in params.items()}


def batches(domain, start=START, pad=PAD):
    """Two batches of packed rows from the domain's tokens: each segment opens with the start
    token, and each row ends in padding."""
    rng = np.random.default_rng(domain)
    out = []
    for _ in range(2):
        inputs = np.full((2, 12), pad, np.int32)
        segment_ids = np.zeros((2, 12), np.int32)
        positions = np.zeros((2, 12), np.int32)
        for row in range(2):
            for segment, (lo, hi) in enumerate([(0, 5), (5, 9)], 1):
                inputs[row, lo] = start
                inputs[row, lo + 1:hi] = rng.choice(DOMAIN_TOKENS[domain], hi - lo - 1)
                segment_ids[row, lo:hi] = segment
                positions[row, lo:hi] = np.arange(hi - lo)
        out.append({'inputs': inputs, 'segment_ids': segment_ids, 'positions': positions})
    return out


def expected_means(params, samples, layer):
    """Each domain's mean RMSNorm(embedding) at `layer`, over real tokens after the start token."""
    embedding, scale = params['embed/embedding'], params[f'layers/{layer}/norm/scale']
    means = []
    for sample in samples:
        tokens = np.concatenate([b['inputs'][(b['segment_ids'] > 0) & (b['positions'] > 0)] for b in sample])
        means.append(np_rms_norm(embedding[tokens].astype(np.float64), scale, CONFIG.norm_eps).mean(axis=0))
    return np.stack(means)


def expected_rows(means):
    """The rule: centre across experts, L2-normalise, scale the own expert's lead over the others'
    mean logit at each domain's mean to ln(3 (E - 1)) on average."""
    experts = len(means)
    unit = (means - means.mean(axis=0))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    logits = means @ unit.T
    lead = np.mean([logits[d, d] - (logits[d].sum() - logits[d, d]) / (experts - 1) for d in range(experts)])
    return (math.log(3 * (experts - 1)) / lead * unit).T


@pytest.mark.parametrize('method', ['btx', 'bam', 'lory'])
def test_rows_are_each_domains_mean_router_input_by_the_rule(method):
    models = [silent(seed) for seed in range(3)]
    spec = UpcycleSpec(method, 3, (0, 1, 2))
    moe, moe_config = upcycle(models, CONFIG, spec)
    samples = {m: batches(m) for m in range(3)}
    record = router_init.domain_rows(spec, moe, moe_config, models[0], CONFIG, samples, inputs='seed')
    kinds = ['ffn', 'attn'] if method == 'bam' else ['ffn']
    for layer in range(CONFIG.num_layers):
        rows = expected_rows(expected_means(models[0], [samples[m] for m in range(3)], layer))
        for kind in kinds:
            np.testing.assert_allclose(moe[f'layers/{layer}/{kind}/router/kernel'], rows, rtol=2e-5, atol=1e-6)
            site = f'layers/{layer}/{kind}'
            assert site in record['scale'] and set(record['own_share'][site]) == {0, 1, 2}
    # layer by layer, the MoE's own inputs: its norms are the models' averages, nothing else moves
    layerwise = dict(upcycle(models, CONFIG, spec)[0])
    router_init.domain_rows(spec, layerwise, moe_config, models[0], CONFIG, samples, inputs='layerwise')
    for layer in range(CONFIG.num_layers):
        rows = expected_rows(expected_means(layerwise, [samples[m] for m in range(3)], layer))
        np.testing.assert_allclose(layerwise[f'layers/{layer}/ffn/router/kernel'], rows, rtol=2e-5, atol=1e-6)


def test_padding_and_the_start_token_do_not_move_the_rows():
    models = [silent(seed) for seed in range(3)]
    spec = UpcycleSpec('bam', 3, (0, 1, 2))
    kernels = []
    for start, pad in [(START, PAD), (62, 1), (5, 40)]:
        moe, moe_config = upcycle(models, CONFIG, spec)
        router_init.domain_rows(spec, moe, moe_config, models[0], CONFIG,
                                {m: batches(m, start, pad) for m in range(3)})
        kernels.append({k: v for k, v in moe.items() if k.endswith('router/kernel')})
    for other in kernels[1:]:
        assert all(np.array_equal(kernels[0][k], other[k]) for k in kernels[0])


def test_a_domain_sends_its_tokens_to_its_own_expert_when_its_inputs_say_so():
    """Token sets that do not overlap, on a model whose blocks add nothing: every expert domain's
    tokens choose its own expert more often than chance."""
    models = [silent(seed) for seed in range(3)]
    spec = UpcycleSpec('btx', 3, (0, 1, 2))
    moe, moe_config = upcycle(models, CONFIG, spec)
    record = router_init.domain_rows(spec, moe, moe_config, models[0], CONFIG, {m: batches(m) for m in range(3)})
    for layer, shares in record['own_share'].items():
        assert shares[1] > 1 / 3 and shares[2] > 1 / 3, (layer, shares)


def test_split_experts_share_their_models_row_and_random_rows_break_the_tie():
    models = [silent(seed) for seed in range(3)]
    spec = UpcycleSpec('btx', 3, (0, 1, 2), expert_split=2)
    moe, moe_config = upcycle(models, CONFIG, spec)
    random_rows = moe['layers/0/ffn/router/kernel'].copy()
    router_init.domain_rows(spec, moe, moe_config, models[0], CONFIG, {m: batches(m) for m in range(3)})
    rows = np.repeat(expected_rows(expected_means(models[0], [batches(m) for m in range(3)], 0)), 2, axis=1)
    np.testing.assert_allclose(moe['layers/0/ffn/router/kernel'], rows + random_rows, rtol=2e-5, atol=1e-6)


def test_domains_that_look_alike_are_refused():
    with pytest.raises(BamJaxError, match='same mean input'):
        router_init.rows_from_means(np.ones((3, 4)))


def _write_configs(runs, sources):
    for name, source in sources.items():
        (runs[name][0] / 'config.gin').write_text(
            f"DataConfig.source = '{source}'\nDataConfig.math_documents = 60\nTrainConfig.seq_len = 32\n")


def test_the_command_reads_each_runs_domain_and_records_the_shares(dense, tmp_path, cli):  # noqa: F811
    _write_configs(dense, {'seed': 'math', 'code': 'code', 'law': 'law', 'math': 'math'})
    runs = {name: str(dense[name][0]) for name in ('seed', 'code', 'law', 'math')}
    common = ['--method=btx', f'--seed={runs["seed"]}', f'--experts={runs["code"]},{runs["law"]}',
              '--router_init=domain', '--router_tokens=256']
    done = cli('upcycle', *common, '--router_data=general,code,law', f'--out={tmp_path / "out"}', check=True)
    assert 'share routed to the own expert' in done.stdout
    record = json.loads((tmp_path / 'out' / 'upcycle.json').read_text())['router_init']
    assert record['method'] == 'domain' and record['domains'] == ['general', 'code', 'law']
    assert record['tokens'] == 256 and record['inputs'] == 'seed'
    assert set(record['own_share']) == {'layers/0/ffn', 'layers/1/ffn'}
    assert all(set(shares) == {'general', 'code', 'law'} for shares in record['own_share'].values())
    # Experts are named by the runs they came from (the domain each run's config says it read).
    assert json.loads((tmp_path / 'out' / 'upcycle.json').read_text())['expert_names'] == ['math', 'code', 'law']
    evaluated = cli('eval', f'--workdir={tmp_path / "out"}', '--json', '--gin.DataConfig.eval_batches=1',
                        '--gin.TrainConfig.seq_len=32', '--gin.DataConfig.math_documents=60', check=True)
    result = json.loads(evaluated.stdout.splitlines()[-1])
    assert result['experts'] == {'ffn': ['math', 'code', 'law']}
    assert all(len(fractions) == 3 for by_layer in result['routing'].values() for fractions in by_layer.values())
    # Bad input: one line, nothing written.
    for args, message in [(['--router_data=code,law'], '2 domains for 3 input models'),
                          (['--router_data=general,code,nope'], 'unknown domains nope')]:
        assert_one_line_error(cli('upcycle', *common, *args, f'--out={tmp_path / "bad"}'), message)
    assert_one_line_error(cli('upcycle', '--method=sparse_upcycle', f'--seed={runs["seed"]}',
                                  '--router_init=domain', f'--out={tmp_path / "bad"}'), 'sparse_upcycle copies one')
    assert_one_line_error(cli('upcycle', '--method=btx', f'--seed={runs["seed"]}', f'--experts={runs["code"]}',
                                  '--router_tokens=5', f'--out={tmp_path / "bad"}'), 'apply to --router_init=domain')
    assert not (tmp_path / 'bad').exists()
