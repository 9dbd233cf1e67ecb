"""Lory's segment-merged FFN experts against independent references: copies of one dense SwiGLU,
a numpy loop over rows and segments (padding, a short last segment), causality and the stopped
gradient of the first segment through the whole LM, prompt routing, the parameter tree, the
config and the FLOPs by hand."""

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bam_jax.errors import BamJaxError
from bam_jax.models import (
    ModelConfig,
    abstract_model,
    build_model,
    flatten,
    merge_params,
    param_logical_names,
    split_params,
)
from bam_jax.models.config import LoryConfig, MoEConfig
from bam_jax.models.flops import forward_flops_per_token, lory_merge_overhead, train_flops_per_token
from bam_jax.models.layers import SwiGLU
from bam_jax.models.lory import LoryFeedForward
from bam_jax.models.routing import call_with_aux
from bam_jax.models.sublayer import Context

import references
from helpers import numpy_layer, random_x, routed_ffn_params
from references import np_softmax, np_swiglu

D, F, E, T = 32, 48, 3, 4
AUX_KEYS = {'loss', 'load_balance', 'z_loss', 'entropy', 'dropped_fraction', 'load'}


def layer_config(lory=None):
    return ModelConfig(vocab_size=16, d_model=D, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=F,
                       dtype='float32', lory=lory or LoryConfig(num_experts=E, segment_len=T, z_loss_weight=0.1))


def make_layer(*, seed=0, router_scale=3.0, lory=None):
    """(graphdef, params) of a LoryFeedForward with numpy-drawn weights; a wide router so the
    merge weights differ clearly between segments."""
    cfg = layer_config(lory)
    return numpy_layer(lambda rngs: LoryFeedForward(cfg, rngs=rngs),
                       lambda _: routed_ffn_params(D, F, cfg.lory.num_experts, seed=seed, router_scale=router_scale))


def apply_fn(graphdef, prompt_len=None):
    """params, x, segment_ids -> (y, aux) of one layer call."""
    def fn(params, x, segment_ids):
        context = Context(None, None, segment_ids, prompt_len=prompt_len)
        (y, _), aux = call_with_aux(nnx.merge(graphdef, params), x, context)
        return y, aux['']
    return fn


close = functools.partial(references.close, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------
# numpy references (float64), written from the paper's definitions

def np_merged(x, p, w):
    """The SwiGLU with weights sum_e w[e] * expert e's, on rows x [n, D]."""
    merged = [np.tensordot(w, p['experts'][n], axes=1) for n in ('wi_gate', 'wi_up', 'wo')]
    return np_swiglu(x, *merged)


def np_lory(x, segment_ids, params, t):
    """Row by row, segment by segment. Returns (y [B, L, D], aux with load, z_loss, entropy)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    b, length, _ = x.shape
    y = np.zeros_like(x)
    used_logits = []
    for row in range(b):
        starts = range(0, length, t)
        logits = []
        for start in starts:
            seg = slice(start, min(start + t, length))
            real = np.asarray(segment_ids[row, seg]) > 0
            mean = x[row, seg][real].mean(0) if real.any() else np.zeros(x.shape[-1])
            logits.append(mean @ p['router']['kernel'])
        for k, start in enumerate(starts):
            seg = slice(start, min(start + t, length))
            chosen = logits[max(k - 1, 0)]  # segment 1 routes on itself, the others on their predecessor
            y[row, seg] = np_merged(x[row, seg], p, np_softmax(chosen))
            if (np.asarray(segment_ids[row, seg]) > 0).any():
                used_logits.append(chosen)
    used_logits = np.stack(used_logits)
    probs = np_softmax(used_logits)
    lse = np.log(np.exp(used_logits).sum(-1))
    aux = {'load': probs.mean(0), 'z_loss': np.mean(lse ** 2),
           'entropy': np.mean(-(probs * np.log(probs)).sum(-1))}
    return y, aux


# ---------------------------------------------------------------------------------------
# The layer

@pytest.mark.parametrize('prompt_len', [None, 5], ids=['segments', 'prompt'])
def test_identical_experts_equal_dense_swiglu(prompt_len):
    """Merge weights sum to one, so copies of one SwiGLU merge to that SwiGLU, whatever the router."""
    graphdef, params = make_layer(seed=2)
    cfg = layer_config()
    dense_def, _ = nnx.split(nnx.eval_shape(lambda: SwiGLU(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(3)
    w = {'wi_gate': rng.normal(0, D ** -0.5, (D, F)), 'wi_up': rng.normal(0, D ** -0.5, (D, F)),
         'wo': rng.normal(0, F ** -0.5, (F, D))}
    params['experts'] = {n: jnp.asarray(np.broadcast_to(a, (E,) + a.shape), jnp.float32) for n, a in w.items()}
    w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), w)
    x = random_x((2, 10, D), seed=4)  # 3 segments, the last one short
    segment_ids = jnp.ones((2, 10), jnp.int32)
    y, aux = jax.jit(apply_fn(graphdef, prompt_len))(params, x, segment_ids)
    want = jax.jit(lambda p, x: nnx.merge(dense_def, p)(x)[0])(w, x)
    close(y, want, rtol=1e-5, atol=1e-6)
    close(want, np_swiglu(np.asarray(x, np.float64), *(np.asarray(w[n], np.float64)
                                                        for n in ('wi_gate', 'wi_up', 'wo'))))
    assert np.abs(np.asarray(want)).max() > 0.1  # not trivially small
    assert float(aux['entropy']) < 0.9 * np.log(E)  # the router is far from uniform: a real test


@pytest.mark.parametrize('length', [12, 11], ids=['whole-segments', 'short-last-segment'])
def test_equals_numpy_loop(length):
    """Row 0: trailing padding in the second segment and all of the third (length 12).
    Row 1: a padding token in the first segment, a second segment of padding only (its zero mean
    routes the third segment uniformly), then a second packed document. Padding tokens are
    large, so a mean that counted them would be far off."""
    graphdef, params = make_layer(seed=5)
    segment_ids = np.ones((2, length), np.int32)
    segment_ids[0, 7:] = 0
    segment_ids[1, 1] = 0
    segment_ids[1, 4:8] = 0
    segment_ids[1, 8:] = 2
    x = np.asarray(random_x((2, length, D), seed=6))
    x = np.where(segment_ids[..., None] == 0, 50.0, x).astype(np.float32)
    y, aux = jax.jit(apply_fn(graphdef))(params, jnp.asarray(x), jnp.asarray(segment_ids))
    want, want_aux = np_lory(x, segment_ids, params, T)
    assert np.isfinite(np.asarray(y)).all()
    close(y, want, rtol=1e-4, atol=1e-4)  # the padding rows are large; their outputs too
    real = segment_ids > 0
    close(np.asarray(y)[real], want[real])
    for name in ('load', 'z_loss', 'entropy'):
        close(aux[name], want_aux[name], rtol=1e-5, atol=1e-6)
    close(aux['loss'], 0.1 * want_aux['z_loss'], rtol=1e-5)
    close(np.sum(aux['load']), 1.0, rtol=1e-6)
    assert set(aux) == AUX_KEYS
    assert float(aux['load_balance']) == float(aux['dropped_fraction']) == 0.0
    # The segments do not all merge alike, or the test could not tell segments apart.
    assert not np.allclose(want[1, :4], np_merged(x[1, :4], jax.tree.map(np.asarray, params),
                                                  np.full(E, 1 / E)), atol=1e-3)


def test_first_segment_has_no_router_gradient():
    """Outputs of segment 1 depend on the router only through its stopped merge weights;
    those of segment 2 do reach it (through segment 1's mean)."""
    graphdef, params = make_layer(seed=7, lory=LoryConfig(num_experts=E, segment_len=T))
    x = random_x((2, 3 * T, D), seed=8)
    ct = random_x((2, 3 * T, D), seed=9)
    segment_ids = jnp.ones((2, 3 * T), jnp.int32)

    def router_grad(positions):
        def loss(params, x):
            y, _ = apply_fn(graphdef)(params, x, segment_ids)
            return jnp.sum((y * ct)[:, positions])
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    (grads, x_grad) = router_grad(slice(0, T))
    assert np.all(np.asarray(grads['router']['kernel']) == 0.0)
    assert np.abs(np.asarray(grads['experts']['wi_gate'])).max() > 0
    assert np.all(np.asarray(x_grad)[:, T:] == 0.0)  # and nothing flows to later tokens
    (grads, x_grad) = router_grad(slice(T, 2 * T))
    assert np.abs(np.asarray(grads['router']['kernel'])).max() > 1e-6
    assert np.abs(np.asarray(x_grad)[:, :T]).max() > 0  # segment 2's merge comes from segment 1


def test_prompt_routing_equals_training_on_one_segment():
    """With the whole input one segment, routing on the prompt (all of it) is what training does;
    a shorter prompt is one merge from the prompt's real tokens at every position."""
    graphdef, params = make_layer(seed=10)
    x = random_x((2, T, D), seed=11)
    segment_ids = jnp.asarray([[1] * T, [1] * (T - 1) + [0]], jnp.int32)
    y_train, aux_train = jax.jit(apply_fn(graphdef))(params, x, segment_ids)
    y_prompt, aux_prompt = jax.jit(apply_fn(graphdef, prompt_len=T))(params, x, segment_ids)
    close(y_prompt, y_train, rtol=1e-6, atol=1e-7)
    for name in AUX_KEYS:
        close(aux_prompt[name], aux_train[name], rtol=1e-6, atol=1e-7)

    # Prompt of 3 tokens (per row: 3 and 2), then generated positions: 3 segments' worth.
    length = 3 * T
    x = np.asarray(random_x((2, length, D), seed=12))
    segment_ids = np.ones((2, length), np.int32)
    segment_ids[1, 1] = 0
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    for prompt_len, lens in ((3, (3, 3)), (jnp.asarray([3, 2]), (3, 2))):
        y, _ = jax.jit(apply_fn(graphdef, prompt_len))(params, jnp.asarray(x), jnp.asarray(segment_ids))
        for row in range(2):
            real = segment_ids[row, :lens[row]] > 0
            mean = np.asarray(x[row, :lens[row]], np.float64)[real].mean(0)
            want = np_merged(np.asarray(x[row], np.float64), p, np_softmax(mean @ p['router']['kernel']))
            close(np.asarray(y)[row], want)


# ---------------------------------------------------------------------------------------
# The whole LM

LM = dict(vocab_size=40, d_model=D, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=F, dtype='float32',
          lory=LoryConfig(num_experts=E, segment_len=T))


def randomized(config, seed=0):
    """(graphdef, params) with every weight redrawn at unit-ish scale (routers wide)."""
    graphdef, params = split_params(build_model(ModelConfig(**config)))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if 'scale' in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        if 'embedding' in name or 'router' in name:
            fan_in = 1
        elif 'wo' in name:  # attention [H, Dh, D]; experts [E, F, D]
            fan_in = x.shape[-2] * (x.shape[-3] if "['attn']" in name else 1)
        else:
            fan_in = D
        return jnp.asarray(rng.normal(0, fan_in ** -0.5, x.shape), jnp.float32)

    return graphdef, jax.tree_util.tree_map_with_path(draw, params)


@pytest.mark.parametrize('parallel_block', [True, False], ids=['parallel', 'sequential'])
def test_lm_causality_across_segments(parallel_block):
    """A token changed in segment k >= 2 leaves every earlier position's logits unchanged and
    moves its own and later ones. Segment 1 is the exception by design: it routes on its own
    mean, so its last token moves its first position."""
    graphdef, params = randomized({**LM, 'parallel_block': parallel_block}, seed=1)
    length = 4 * T
    tokens = np.random.default_rng(2).integers(0, LM['vocab_size'], (2, length)).astype(np.int32)
    run = jax.jit(lambda t: merge_params(graphdef, params)(t))
    base = np.asarray(run(tokens))
    for t in (T, T + 2, 3 * T - 1, length - 1):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % LM['vocab_size']
        logits = np.asarray(run(changed))
        close(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
        moved = np.abs(logits[:, t:] - base[:, t:]).max(axis=-1)
        assert (moved > 1e-4).all(), f'token {t} did not reach every later position: {moved}'
    changed = tokens.copy()
    changed[:, T - 1] = (changed[:, T - 1] + 1) % LM['vocab_size']
    assert np.abs(np.asarray(run(changed))[:, 0] - base[:, 0]).max() > 1e-4


def test_lm_first_segment_loss_has_no_router_gradient():
    """Through both layers: the loss on segment 1's logits reaches no router; segment 2's does."""
    graphdef, params = randomized(LM, seed=3)
    tokens = np.random.default_rng(4).integers(0, LM['vocab_size'], (2, 3 * T)).astype(np.int32)

    def grads(positions):
        def loss(params):
            logits = merge_params(graphdef, params)(tokens)
            return jnp.sum(jax.nn.log_softmax(logits[:, positions]))
        return jax.jit(jax.grad(loss))(params)

    first, second = grads(slice(0, T)), grads(slice(T, 2 * T))
    for i in ('0', '1'):
        assert np.all(np.asarray(first['layers'][i]['ffn']['router']['kernel']) == 0.0)
        assert np.abs(np.asarray(first['layers'][i]['ffn']['experts']['wo'])).max() > 0
        assert np.abs(np.asarray(second['layers'][i]['ffn']['router']['kernel'])).max() > 1e-6


def test_lm_prompt_routing_equals_training_on_one_segment():
    graphdef, params = randomized(LM, seed=5)
    tokens = np.random.default_rng(6).integers(0, LM['vocab_size'], (2, T)).astype(np.int32)
    run = jax.jit(lambda t, p: merge_params(graphdef, params)(t, prompt_len=p), static_argnums=1)
    close(run(tokens, T), run(tokens, None), rtol=1e-6, atol=1e-6)
    longer = np.concatenate([tokens, tokens], axis=1)  # two segments: training routes segment 2 differently
    assert not np.allclose(np.asarray(run(longer, 2 * T))[:, T:], np.asarray(run(longer, None))[:, T:], atol=1e-4)


@pytest.mark.parametrize('parallel_block', [True, False], ids=['parallel', 'sequential'])
def test_lm_runs_and_reports_merge_weights(parallel_block):
    """The default (bfloat16) LM trains a step's worth of forward and backward; every Lory layer
    reports router_aux's keys with merge weights that sum to one."""
    cfg = ModelConfig(**{**LM, 'dtype': 'bfloat16', 'parallel_block': parallel_block,
                         'lory': LoryConfig(num_experts=E, segment_len=T, z_loss_weight=1e-3)})
    model = build_model(cfg)
    graphdef, params = split_params(model)
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
    segment_ids = np.ones_like(tokens)
    segment_ids[1, 8:] = 0

    def loss(params):
        logits, aux = call_with_aux(merge_params(graphdef, params), tokens, segment_ids, train=True,
                                    rng=jax.random.key(0))
        return jnp.mean(logits) + sum(a['loss'] for a in aux.values()), (logits, aux)

    (_, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert logits.shape == (2, 11, cfg.vocab_size) and np.isfinite(np.asarray(logits)).all()
    assert set(aux) == {'layers/0/ffn', 'layers/1/ffn'}
    for values in aux.values():
        assert set(values) == AUX_KEYS
        assert values['load'].shape == (E,)
        close(np.sum(values['load']), 1.0, rtol=1e-6)
        assert float(values['loss']) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_parameter_tree_is_the_moe_ffn_tree():
    """Same paths, shapes and logical axes as a top-1 MoE of the same size, so checkpoints and the
    upcycler line up."""
    lory = ModelConfig(**LM)
    moe = ModelConfig(**{**LM, 'lory': None, 'moe': MoEConfig(num_experts=E)})
    names = flatten(param_logical_names(abstract_model(lory)))
    assert names == flatten(param_logical_names(abstract_model(moe)))
    shapes = {k: v.shape for k, v in flatten(split_params(abstract_model(lory))[1]).items()}
    assert shapes == {k: v.shape for k, v in flatten(split_params(abstract_model(moe))[1]).items()}
    assert shapes['layers/0/ffn/router/kernel'] == (D, E)
    assert shapes['layers/0/ffn/experts/wi_gate'] == shapes['layers/0/ffn/experts/wi_up'] == (E, D, F)
    assert shapes['layers/0/ffn/experts/wo'] == (E, F, D)
    assert names['layers/0/ffn/router/kernel'] == ('embed', 'route')


# ---------------------------------------------------------------------------------------
# Config, gin, FLOPs

@pytest.mark.parametrize('bad, message', [
    (dict(num_experts=0), 'num_experts must be >= 1'),
    (dict(segment_len=0), 'segment_len must be >= 1'),
    (dict(z_loss_weight=-1.0), 'z_loss_weight must be >= 0'),
])
def test_bad_lory_config_raises(bad, message):
    with pytest.raises(BamJaxError, match=message):
        LoryConfig(**bad)


def test_config_round_trips_and_excludes_moe():
    cfg = ModelConfig(**LM)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()).lory == LoryConfig(num_experts=E, segment_len=T)
    with pytest.raises(BamJaxError, match='moe and ModelConfig.lory'):
        dataclasses.replace(cfg, moe=MoEConfig(num_experts=E))


def test_gin_arch_file(request):
    gin.parse_config_file(str(request.config.rootpath / 'gin/arch/lory.gin'))
    cfg = ModelConfig()
    assert cfg.lory == LoryConfig(num_experts=4, segment_len=32, z_loss_weight=0.0) and cfg.moe is None


def test_flops_by_hand():
    """gin/models/tiny.gin (D 128, 4 layers, H 4, K 2, Dh 32, F 512, V 384) with 4 Lory experts and
    segments of 64 tokens. Per layer: wq, wo 16384 each, wk, wv 8192 each (49152 in all); the
    merged SwiGLU 3*128*512 = 196608; per segment the router 128*4 = 512 and the merge
    4 * 196608 = 786432 multiply-adds, 8 + 12288 per token. Unembedding 128*384 = 49152;
    attention scores and values 2 * 2 * 64 * 4 * 32 = 32768 per layer.
    2 * (4 * (49152 + 196608 + 8 + 12288) + 49152) + 4 * 32768 = 2_293_824."""
    cfg = ModelConfig(vocab_size=384, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=512,
                      lory=LoryConfig(num_experts=4, segment_len=64))
    assert forward_flops_per_token(cfg, 64) == 2_293_824
    assert train_flops_per_token(cfg, 64) == 3 * 2_293_824
    assert lory_merge_overhead(cfg) == 4 / 64
    assert lory_merge_overhead(dataclasses.replace(cfg, lory=None)) == 0.0
