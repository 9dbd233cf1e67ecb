"""Routers against numpy and hand computations: the gating modes of route(), the auxiliary
losses and metrics, router gradients in a small model, and the routed configs' validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bam_jax.errors import BamJaxError
from bam_jax.models import ModelConfig, abstract_model, merge_params, split_params
from bam_jax.models.config import MoAConfig, MoEConfig, RoutedConfig
from bam_jax.models.routing import (
    call_with_aux,
    combine_weights,
    load_balance_loss,
    load_fractions,
    route,
    router_aux,
    router_entropy,
    z_loss,
)

import references
from references import np_softmax

# ---------------------------------------------------------------------------------------
# numpy references (and np_softmax from tests/references.py)

def np_logsumexp(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1)
    return m + np.log(np.exp(x - m[..., None]).sum(-1))


def np_top_k(logits, k):
    """Indices of the k largest logits, largest first; ties go to the lower index."""
    logits = np.asarray(logits, np.float64)
    return np.argsort(-logits, axis=-1, kind='stable')[..., :k]


# Distinct logits, leading dims [2, 3], 5 experts.
LOGITS = np.array([
    [[2.0, -1.0, 0.5, 1.5, 0.0],
     [-0.3, 0.7, 0.1, -2.0, 1.2],
     [0.0, 0.25, 3.0, 0.5, -1.0]],
    [[1.0, 1.1, 1.2, 1.3, 1.4],
     [-4.0, 2.5, -0.5, 0.6, 2.4],
     [0.9, -0.9, 0.3, 0.0, -0.2]],
], np.float32)
E = LOGITS.shape[-1]


close = functools.partial(references.close, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# route()

@pytest.mark.parametrize('k', [1, 2, 3])
def test_top_k_softmax_gate_is_the_full_softmax(k):
    cfg = RoutedConfig(num_experts=E, routing='top_k', top_k=k, gate='softmax')
    index, gate, probs = route(jnp.asarray(LOGITS), cfg)
    want_index = np_top_k(LOGITS, k)
    want_probs = np_softmax(LOGITS)
    assert index.dtype == jnp.int32 and index.shape == (2, 3, k) and gate.shape == (2, 3, k)
    np.testing.assert_array_equal(np.asarray(index), want_index)
    close(probs, want_probs)
    close(gate, np.take_along_axis(want_probs, want_index, -1))
    # Not renormalised: the kept gates sum to less than one (strictly, for k < E).
    assert np.all(np.asarray(gate).sum(-1) < 1 - 1e-3)
    # Largest first.
    assert np.all(np.diff(np.asarray(gate), axis=-1) <= 0)


@pytest.mark.parametrize('k', [1, 2, 4])
def test_top_k_renormalize_gate_is_a_softmax_over_the_kept_logits(k):
    cfg = RoutedConfig(num_experts=E, routing='top_k', top_k=k, gate='renormalize')
    index, gate, probs = route(jnp.asarray(LOGITS), cfg)
    want_index = np_top_k(LOGITS, k)
    np.testing.assert_array_equal(np.asarray(index), want_index)
    kept = np.take_along_axis(LOGITS.astype(np.float64), want_index, -1)
    close(gate, np_softmax(kept))
    close(np.asarray(gate).sum(-1), np.ones((2, 3)))
    close(probs, np_softmax(LOGITS))  # probs stay the full softmax (for the aux losses)


def test_renormalized_top2_by_hand():
    # logits (0, log 3, log 2): top 2 are experts 1, 2 with exp-weights 3, 2 -> gates 3/5, 2/5;
    # the full softmax gives them 3/6, 2/6.
    logits = jnp.log(jnp.array([[1.0, 3.0, 2.0]]))
    renorm = RoutedConfig(num_experts=3, top_k=2, gate='renormalize')
    full = RoutedConfig(num_experts=3, top_k=2, gate='softmax')
    index, gate, _ = route(logits, renorm)
    np.testing.assert_array_equal(np.asarray(index), [[1, 2]])
    close(gate, [[0.6, 0.4]])
    _, gate, _ = route(logits, full)
    close(gate, [[0.5, 1 / 3]])


def test_soft_routing_gives_every_expert_its_softmax():
    cfg = RoutedConfig(num_experts=E, routing='soft')
    index, gate, probs = route(jnp.asarray(LOGITS), cfg)
    np.testing.assert_array_equal(np.asarray(index), np.broadcast_to(np.arange(E), LOGITS.shape))
    close(gate, np_softmax(LOGITS))
    close(probs, np_softmax(LOGITS))
    close(combine_weights(index, gate, E), np_softmax(LOGITS))


@pytest.mark.parametrize('gate_form', ['softmax', 'renormalize'])
def test_sample_top1_without_rng_is_the_argmax(gate_form):
    cfg = RoutedConfig(num_experts=E, routing='sample_top1', gate=gate_form)
    index, gate, probs = route(jnp.asarray(LOGITS), cfg, rng=None)
    want = LOGITS.argmax(-1)[..., None]
    np.testing.assert_array_equal(np.asarray(index), want)
    if gate_form == 'softmax':
        close(gate, np.take_along_axis(np_softmax(LOGITS), want, -1))
    else:
        close(gate, np.ones((2, 3, 1)))  # a softmax over one kept logit
    close(probs, np_softmax(LOGITS))


def test_sample_top1_samples_from_the_softmax():
    target = np.array([0.1, 0.2, 0.3, 0.4])
    n = 40_000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(target, jnp.float32)) + 1.7, (n, 4))  # shift: softmax-invariant
    cfg = RoutedConfig(num_experts=4, routing='sample_top1')
    index, gate, _ = jax.jit(lambda z, r: route(z, cfg, r))(logits, jax.random.key(0))
    index, gate = np.asarray(index)[:, 0], np.asarray(gate)[:, 0]
    freq = np.bincount(index, minlength=4) / n
    # Standard error of a frequency is <= sqrt(0.25 / 40000) = 0.0025; allow 4 of them.
    np.testing.assert_allclose(freq, target, atol=0.01)
    # The gate is the chosen expert's clean softmax probability, not the noisy one.
    close(gate, target[index], rtol=1e-5)
    # The same key gives the same draw; another key a different one; no key: always the argmax.
    again, _, _ = route(logits[:64], cfg, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(again)[:, 0], index[:64])
    other, _, _ = route(logits[:64], cfg, jax.random.key(1))
    assert np.any(np.asarray(other)[:, 0] != index[:64])
    argmax, _, _ = route(logits[:64], cfg)
    assert np.all(np.asarray(argmax) == 3)


def test_sample_top1_follows_a_dominant_logit():
    # A logit 30 nats above the rest is chosen whatever the noise (Gumbel tails are too thin).
    logits = np.zeros((256, 6), np.float32)
    chosen = np.arange(256) % 6
    logits[np.arange(256), chosen] = 30.0
    cfg = RoutedConfig(num_experts=6, routing='sample_top1')
    index, gate, _ = route(jnp.asarray(logits), cfg, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(index)[:, 0], chosen)
    close(gate[:, 0], np_softmax(logits)[np.arange(256), chosen])


def test_top_k_ties_and_ordering():
    # Equal logits: the lower index comes first; chosen experts come largest first.
    logits = jnp.array([[1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    cfg = RoutedConfig(num_experts=4, top_k=2, gate='renormalize')
    index, gate, _ = route(logits, cfg)
    np.testing.assert_array_equal(np.asarray(index), [[0, 1], [3, 1], [0, 1]])
    assert len(set(np.asarray(index)[2])) == 2  # distinct experts even when all tie
    close(gate[0], [0.5, 0.5])
    close(gate[2], [0.5, 0.5])
    e = np.exp(3.0)
    close(gate[1], [e / (e + 1), 1 / (e + 1)])
    # sample_top1's arg-max breaks ties the same way.
    index, gate, _ = route(logits, RoutedConfig(num_experts=4, routing='sample_top1'))
    np.testing.assert_array_equal(np.asarray(index), [[0], [3], [0]])
    close(gate[2], [0.25])


# ---------------------------------------------------------------------------------------
# Auxiliary losses and metrics on hand-made numbers.

def test_load_balance_loss_by_hand_top1():
    # 4 tokens, 2 experts, k=1. Assignments: experts 0, 0, 1, 0 -> f = (3/4, 1/4).
    # Mean probabilities: P0 = (0.9 + 0.6 + 0.3 + 0.8) / 4 = 0.65, P1 = 0.35.
    # Loss = E * sum_e f_e P_e = 2 * (0.75 * 0.65 + 0.25 * 0.35) = 2 * 0.575 = 1.15.
    probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    index = jnp.array([[0], [0], [1], [0]])
    close(load_fractions(index, 2), [0.75, 0.25])
    close(load_balance_loss(probs, index), 1.15, rtol=1e-6)


def test_load_balance_loss_by_hand_top2():
    # 2 tokens, 3 experts, k=2: assignments 0, 1, 0, 2 -> f = (1/2, 1/4, 1/4).
    # P = ((0.5 + 0.4) / 2, (0.3 + 0.1) / 2, (0.2 + 0.5) / 2) = (0.45, 0.2, 0.35).
    # Loss = 3 * (0.5 * 0.45 + 0.25 * 0.2 + 0.25 * 0.35) = 3 * 0.3625 = 1.0875.
    probs = jnp.array([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5]])
    index = jnp.array([[0, 1], [0, 2]])
    close(load_fractions(index, 3), [0.5, 0.25, 0.25])
    close(load_balance_loss(probs, index), 1.0875, rtol=1e-6)
    # Leading dims are flattened: the same numbers as [1, 2, ...] give the same loss.
    close(load_balance_loss(probs[None], index[None]), 1.0875, rtol=1e-6)


def test_load_balance_loss_is_one_when_uniform():
    e, n = 4, 12
    probs = jnp.full((n, e), 1 / e)
    index = jnp.arange(n * 2).reshape(n, 2) % e  # each expert gets n*2/e assignments
    close(load_balance_loss(probs, index), 1.0, rtol=1e-6)
    # Collapsed routing (everything on expert 0 with probability 1) gives the maximum, E.
    collapsed = jnp.zeros((n, e)).at[:, 0].set(1.0)
    close(load_balance_loss(collapsed, jnp.zeros((n, 1), jnp.int32)), float(e), rtol=1e-6)


def test_z_loss_by_hand():
    # logsumexp(0, 0) = log 2; logsumexp(1, 2) = 2 + log(1 + e^-1).
    logits = np.array([[0.0, 0.0], [1.0, 2.0]], np.float32)
    lse = np.array([np.log(2.0), 2.0 + np.log1p(np.exp(-1.0))])
    close(z_loss(jnp.asarray(logits)), np.mean(lse ** 2), rtol=1e-6)
    close(np.mean(lse ** 2), (0.6931471805599453 ** 2 + 2.3132616875182228 ** 2) / 2, rtol=1e-12)
    close(z_loss(jnp.asarray(LOGITS)), np.mean(np_logsumexp(LOGITS) ** 2), rtol=1e-6)


def test_router_entropy():
    probs = np_softmax(LOGITS)
    want = np.mean(-(probs * np.log(probs)).sum(-1))
    close(router_entropy(jnp.asarray(probs, jnp.float32)), want, rtol=1e-6)
    close(router_entropy(jnp.full((3, 8), 1 / 8)), np.log(8), rtol=1e-6)
    # A one-hot distribution has zero entropy (and no NaN from 0 * log 0).
    one_hot = jnp.eye(4)
    assert float(router_entropy(one_hot)) == 0.0


def test_load_fractions_sum_to_one():
    rng = np.random.default_rng(0)
    index = rng.integers(0, 7, (3, 5, 2))
    fractions = np.asarray(load_fractions(jnp.asarray(index), 7))
    close(fractions.sum(), 1.0, rtol=1e-6)
    close(fractions, np.bincount(index.reshape(-1), minlength=7) / index.size)


@pytest.mark.parametrize('routing, top_k', [('top_k', 2), ('soft', 1), ('sample_top1', 1)])
def test_router_aux_loss_is_the_weighted_sum(routing, top_k):
    cfg = RoutedConfig(num_experts=E, routing=routing, top_k=top_k, load_balance_weight=0.3, z_loss_weight=0.07)
    logits = jnp.asarray(LOGITS)
    index, _, probs = route(logits, cfg)
    aux = router_aux(logits, probs, index, cfg, dropped_fraction=0.25)
    np_probs = np_softmax(LOGITS)
    np_index = np.asarray(index).reshape(-1, np.asarray(index).shape[-1])
    f = np.bincount(np_index.reshape(-1), minlength=E) / np_index.size
    balance = E * np.sum(f * np_probs.reshape(-1, E).mean(0))
    z = np.mean(np_logsumexp(LOGITS) ** 2)
    close(aux['load_balance'], balance, rtol=1e-6)
    close(aux['z_loss'], z, rtol=1e-6)
    close(aux['loss'], 0.3 * balance + 0.07 * z, rtol=1e-6)
    close(aux['entropy'], np.mean(-(np_probs * np.log(np_probs)).sum(-1)), rtol=1e-6)
    close(aux['dropped_fraction'], 0.25)
    # load: assignment shares, or the mean gate for soft routing; either sums to one.
    close(aux['load'], np_probs.reshape(-1, E).mean(0) if routing == 'soft' else f, rtol=1e-6)
    close(np.asarray(aux['load']).sum(), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Router gradients in a small model: the router learns through the gates and the aux losses.

TINY = dict(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, d_ff=32, dtype='float32')


def random_params(cfg, seed=0):
    """(graphdef, params) with numpy-drawn weights of the abstract model's shapes (no eager init)."""
    graphdef, shapes = split_params(abstract_model(cfg))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if 'scale' in jax.tree_util.keystr(path):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize('moe', [
    MoEConfig(num_experts=4, routing='top_k', top_k=1, gate='softmax'),
    MoEConfig(num_experts=4, routing='top_k', top_k=2, gate='renormalize'),
    MoEConfig(num_experts=4, routing='soft'),
    MoEConfig(num_experts=4, routing='sample_top1', gate='softmax'),
], ids=['top1-softmax', 'top2-renormalize', 'soft', 'sample_top1'])
def test_router_gradients_are_finite_and_nonzero(moe):
    cfg = ModelConfig(**TINY, moe=moe)
    graphdef, params = random_params(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def losses(params):
        model = merge_params(graphdef, params)
        logits, aux = call_with_aux(model, inputs, train=True, rng=jax.random.key(5))
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
        assert sorted(aux) == ['layers/0/ffn', 'layers/1/ffn']
        return nll, sum(a['loss'] for a in aux.values())

    nll_grad, aux_grad = jax.jit(jax.jacrev(losses))(params)  # one compile for both
    total_grad = jax.tree.map(jnp.add, nll_grad, aux_grad)
    for grads in (nll_grad, total_grad):
        for i in range(cfg.num_layers):
            g = np.asarray(grads['layers'][str(i)]['ffn']['router']['kernel'])
            assert g.shape == (cfg.d_model, 4)
            assert np.all(np.isfinite(g)), i
            assert np.abs(g).max() > 1e-8, i  # the NLL alone reaches the router through the gates


# ---------------------------------------------------------------------------------------
# Config validation.

@pytest.mark.parametrize('make', [
    lambda: MoEConfig(routing='switch'),
    lambda: MoEConfig(gate='sigmoid'),
    lambda: MoEConfig(num_experts=4, top_k=5),
    lambda: MoEConfig(num_experts=4, top_k=0),
    lambda: MoEConfig(num_experts=0),
    lambda: MoEConfig(num_experts=2, expert_split=2, top_k=5),
    lambda: MoEConfig(expert_split=0),
    lambda: MoEConfig(capacity_factor_train=0.0),
    lambda: MoEConfig(load_balance_weight=-0.1),
    lambda: MoAConfig(routing='hard'),
    lambda: MoAConfig(num_experts=2, routing='top_k', top_k=3),
    lambda: MoAConfig(z_loss_weight=-1.0),
    lambda: ModelConfig(**TINY, moe=MoEConfig(expert_split=3)),   # d_ff 32 % 3
    lambda: ModelConfig(**{**TINY, 'd_ff': 30}, moe=MoEConfig(expert_split=4)),
], ids=['moe-routing', 'moe-gate', 'moe-top_k>E', 'moe-top_k=0', 'moe-no-experts', 'moe-top_k>E*C',
        'moe-split0', 'moe-capacity-train', 'moe-lb-weight', 'moa-routing',
        'moa-top_k>E', 'moa-z-weight', 'split-3', 'split-4'])
def test_routed_config_errors(make):
    with pytest.raises(BamJaxError):
        make()


def test_routed_config_valid_edges():
    # top_k may reach num_experts * expert_split (the routed experts), and d_ff may split evenly.
    moe = MoEConfig(num_experts=2, expert_split=2, top_k=4)
    assert moe.num_routed_experts == 4 and moe.experts_per_token == 4
    assert ModelConfig(**TINY, moe=MoEConfig(expert_split=4)).moe.expert_split == 4
    assert MoEConfig(routing='soft').experts_per_token == 4
    assert MoEConfig(routing='sample_top1').experts_per_token == 1
    assert MoAConfig().routing == 'soft'
