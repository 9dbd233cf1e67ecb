"""The Hugging Face remote-code model (bam_jax/hf/remote) against bam_jax itself.

Each tiny model is exported as an export does it (safetensors named by the checkpoint paths,
config_dict's config.json, copy_code's two files) and read back with
AutoModelForCausalLM.from_pretrained(trust_remote_code=True). Its logits must be bam_jax's
inference logits, and its greedy generate() with a KV cache bam_jax's Engine's tokens, for every
architecture and attention option. The Engine has no beam search: a Lory model's beam search is
checked against one over bam_jax's forward pass without a cache. Weights are drawn with numpy
(large, and norm scales and biases away from 1 and 0), so routers disagree between tokens and every
parameter matters.
"""

import ast
import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch  # the test extra: missing, this fails instead of skipping
import transformers

from bam_jax.generate import Engine
from bam_jax.hf import remote
from bam_jax.models import ModelConfig, abstract_model, flatten, merge_params, split_params
from bam_jax.models.config import LoryConfig, MoAConfig, MoEConfig
from bam_jax.models.params import unflatten

# The same float32 function in another summation order (XLA against torch): rounding only. The
# logits are of order 1-10.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)

BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                   dtype='float32')
# head_dim 8: wavelengths 6, 63, 628 and 6283; with an original length of 400 and bands 1 and 8
# the first is kept, the second blended, the last two divided by the factor.
LLAMA3 = dict(rope_scaling='llama3', rope_scaling_factor=4.0, rope_low_freq_factor=1.0,
              rope_high_freq_factor=8.0, rope_original_max_len=400)
EXTRAS = dict(qkv_bias=True, qk_norm=True, sliding_window=4, **LLAMA3)
ARCHS = {
    'dense': {},
    'dense_sequential_tied': dict(parallel_block=False, tie_embeddings=True),
    'btx_top2_softmax': dict(moe=MoEConfig(num_experts=3, top_k=2)),
    'btx_top2_renormalize': dict(moe=MoEConfig(num_experts=3, top_k=2, gate='renormalize')),
    'btx_expert_split': dict(moe=MoEConfig(num_experts=2, expert_split=2, top_k=2, gate='renormalize')),
    'bam_expert_kv': dict(moe=MoEConfig(num_experts=3), moa=MoAConfig(num_experts=3)),
    'bam_shared_kv': dict(moe=MoEConfig(num_experts=3), moa=MoAConfig(num_experts=3, shared_kv=True)),
    # Soft FFN experts; attention experts by arg-max top-1 (sample_top1 at inference).
    'bam_routing': dict(moe=MoEConfig(num_experts=3, routing='soft'),
                        moa=MoAConfig(num_experts=3, routing='sample_top1', shared_kv=True)),
    'lory': dict(lory=LoryConfig(num_experts=3, segment_len=4)),
    # q/k/v biases, q/k norm, llama3 RoPE scaling and a window shorter than the sequence; the BAM
    # ones with other routings too (top-2 attention experts, arg-max top-1 or top-2 FFN experts).
    'dense_extras': dict(parallel_block=False, **EXTRAS),
    'bam_expert_kv_extras': dict(moe=MoEConfig(num_experts=3, routing='sample_top1'),
                                 moa=MoAConfig(num_experts=3, routing='top_k', top_k=2, gate='renormalize'),
                                 **EXTRAS),
    'bam_shared_kv_extras': dict(parallel_block=False, moe=MoEConfig(num_experts=3, top_k=2),
                                 moa=MoAConfig(num_experts=3, shared_kv=True), qkv_bias=True, qk_norm=True,
                                 sliding_window=5, rope_scaling='linear', rope_scaling_factor=2.0),
}
TOKENS = np.random.RandomState(0).randint(0, BASE.vocab_size, (2, 11))
START = 0  # every text bam_jax reads begins with its start id: 0 for the byte vocabulary
PROMPTS = [[START, *np.random.RandomState(n).randint(2, BASE.vocab_size, n).tolist()] for n in (5, 9)]
NEW_TOKENS = 10


def random_params(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """{checkpoint path: weight} for every parameter of the model, drawn with numpy: matrices
    N(0, 0.3^2), routers N(0, 1), norm scales 1 + N(0, 0.3^2), biases N(0, 0.5^2)."""
    rng = np.random.RandomState(seed)
    _, shapes = split_params(abstract_model(config))
    out = {}
    for path, leaf in flatten(shapes).items():
        name = path.rsplit('/', 1)[-1]
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name in ('scale', 'q_norm', 'k_norm'):
            out[path] = 1 + 0.3 * noise
        elif name in ('bq', 'bk', 'bv'):
            out[path] = 0.5 * noise
        else:
            out[path] = noise if path.endswith('router/kernel') else 0.3 * noise
    return out


@dataclasses.dataclass(eq=False)  # hashed by identity: one per architecture
class Exported:
    config: ModelConfig
    graphdef: object
    params: dict  # bam_jax's nested parameter dict
    flat: dict  # {'layers/0/attn/wq': np.ndarray}
    directory: pathlib.Path
    hf: object  # the transformers model read from the export
    loading_info: dict
    forward: object  # bam_jax's inference forward pass, compiled: tokens [B, T] -> logits

    def logits(self, tokens, prompt_len=None) -> np.ndarray:
        return np.asarray(self.forward(self.params, jnp.asarray(tokens), prompt_len))


def bam_jax_logits(graphdef, params, tokens, prompt_len):
    """bam_jax's inference forward pass (train=False): float32 logits [B, T, V]."""
    return merge_params(graphdef, params)(tokens, prompt_len=prompt_len)


@pytest.fixture(scope='module')
def export(tmp_path_factory):
    """export(name) -> Exported, made once per architecture for the whole file."""
    root = tmp_path_factory.mktemp('hf_remote')

    @functools.cache
    def make(name: str) -> Exported:
        from transformers import AutoModelForCausalLM

        config = dataclasses.replace(BASE, **ARCHS[name])
        graphdef, _ = split_params(abstract_model(config))
        flat = random_params(config, seed=1)
        directory = root / name
        directory.mkdir()
        safetensors.numpy.save_file({path.replace('/', '.'): value for path, value in flat.items()},
                                    str(directory / 'model.safetensors'))
        (directory / 'config.json').write_text(json.dumps(remote.config_dict(config)))
        remote.copy_code(directory)
        hf, info = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
        params = unflatten({path: jnp.asarray(value) for path, value in flat.items()})
        forward = jax.jit(functools.partial(bam_jax_logits, graphdef), static_argnums=2)
        return Exported(config, graphdef, params, flat, directory, hf.eval(), info, forward)

    return make


def hf_logits(exported: Exported, tokens, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return exported.hf(torch.as_tensor(np.asarray(tokens)), **kwargs).logits.numpy()


def cache_of(output):
    """The cache a forward returned (`cache` in transformers 5, `past_key_values` before)."""
    return output.cache if hasattr(output, 'cache') else output.past_key_values


def cached_keys(cache, layer: int):
    """[B, heads, S, Dh] keys a transformers cache holds for `layer`."""
    return cache.layers[layer].keys if hasattr(cache, 'layers') else cache.key_cache[layer]


# ---------------------------------------------------------------------------------------
# The export


def test_files_import_no_bam_jax_and_the_package_no_torch():
    """The copied files read only torch, transformers, the standard library and each other;
    bam_jax.hf.remote itself needs no torch."""
    here = pathlib.Path(remote.__file__).parent
    for name in remote.FILES:
        for node in ast.walk(ast.parse((here / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f'{node.module}.py' in remote.FILES, name
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    assert module.split('.')[0] in {'torch', 'transformers', 'dataclasses', 'math'}, (name, module)
    imported = [n for n in ast.walk(ast.parse(pathlib.Path(remote.__file__).read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in imported if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in imported if isinstance(n, ast.ImportFrom)}
    assert not {m for m in names if m.split('.')[0] in ('torch', 'transformers')}


@pytest.mark.parametrize('name', ['bam_expert_kv_extras', 'bam_shared_kv_extras', 'dense_sequential_tied'])
def test_parameters_are_the_checkpoint_paths(export, name):
    """Every parameter is a checkpoint path with '/' -> '.', of the same shape, and the export
    loads with nothing missing or left over (an untied unembed is absent when tied)."""
    exported = export(name)
    names = {k: tuple(v.shape) for k, v in exported.hf.state_dict().items()}
    assert names == {path.replace('/', '.'): value.shape for path, value in exported.flat.items()}
    assert not exported.loading_info['missing_keys'] and not exported.loading_info['unexpected_keys']
    assert ('unembed.kernel' in names) == (not exported.config.tie_embeddings)


def test_config_round_trip(export):
    """config.json holds ModelConfig.to_dict() and the standard keys, and reads back as both."""
    exported = export('bam_shared_kv_extras')
    config = exported.hf.config
    assert config.model_type == 'bam_jax' and config.architectures == ['BamJaxForCausalLM']
    assert ModelConfig.from_dict(config.bam_jax) == exported.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (64, 32, 2, 4, 2, 8)
    saved = json.loads((exported.directory / 'config.json').read_text())
    assert saved['auto_map']['AutoModelForCausalLM'] == 'modeling_bam_jax.BamJaxForCausalLM'
    assert remote.config_dict(exported.config, eos_token_id=1)['eos_token_id'] == 1


# ---------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize('name', list(ARCHS))
def test_logits_equal_bam_jax(export, name):
    """The forward pass without a cache is bam_jax's model(tokens) at inference (Lory: its
    per-segment routing)."""
    exported = export(name)
    expected = exported.logits(TOKENS)
    np.testing.assert_allclose(hf_logits(exported, TOKENS, use_cache=False), expected, **TOLERANCE)
    # A plain call (use_cache defaults to True) computes the same.
    np.testing.assert_allclose(hf_logits(exported, TOKENS), expected, **TOLERANCE)


@pytest.mark.parametrize('name, heads', [('bam_expert_kv', 3 * 2), ('bam_shared_kv', 2), ('btx_top2_softmax', 2)])
def test_cache_holds_the_layer_kv_heads(export, name, heads):
    """Expert K/V caches N*K heads per layer; shared K/V (and BTX) only the dense model's K."""
    exported = export(name)
    with torch.no_grad():
        cache = cache_of(exported.hf(torch.as_tensor(TOKENS), use_cache=True))
    for layer in range(exported.config.num_layers):
        assert tuple(cached_keys(cache, layer).shape) == (2, heads, TOKENS.shape[1], 8)


@pytest.mark.parametrize('name', ['bam_expert_kv_extras', 'lory'])
def test_prefill_and_decode_logits(export, name):
    """A prompt through an empty cache, then tokens one by one: bam_jax's logits with the prompt
    (Lory: merged once from the prompt, bam_jax's prompt_len path) for every position."""
    exported = export(name)
    prompt = 6
    expected = exported.logits(TOKENS, prompt_len=prompt)
    cache = exported.hf.cache_class()
    got = [hf_logits(exported, TOKENS[:, :prompt], **{cache_arg(): cache})]
    mask = torch.ones(TOKENS.shape, dtype=torch.long)
    for t in range(prompt, TOKENS.shape[1]):
        got.append(hf_logits(exported, TOKENS[:, t:t + 1], attention_mask=mask[:, :t + 1], **{cache_arg(): cache}))
    np.testing.assert_allclose(np.concatenate(got, axis=1), expected, **TOLERANCE)


def cache_arg() -> str:
    """The name forward's cache argument has in the installed transformers."""
    return 'cache' if int(transformers.__version__.split('.')[0]) >= 5 else 'past_key_values'


# Row operations decoding methods apply to a cache (beam search's reorder_cache; contrastive
# search's batch_repeat_interleave and batch_select_indices), as (method, argument) calls on a
# cache prefilled with TOKENS' two rows, and the rows of TOKENS they leave.
ROW_OPERATIONS = {
    'reorder_cache': ([('reorder_cache', torch.tensor([1, 0]))], [1, 0]),
    'repeat_then_select': ([('batch_repeat_interleave', 2), ('batch_select_indices', torch.tensor([3, 0, 2]))],
                           [1, 0, 1]),
}


@pytest.mark.parametrize('calls, rows', ROW_OPERATIONS.values(), ids=list(ROW_OPERATIONS))
def test_lory_merges_follow_their_rows(export, calls, rows):
    """After the cache's row operations (reordering, repeating and selecting rows), each row
    decodes with its own prompt's merged FFN: bam_jax's prompt_len logits of the rows they leave.
    The two prompts' merges differ, so a merge left in its old row would show."""
    exported = export('lory')
    prompt = 6
    cache = exported.hf.cache_class()
    hf_logits(exported, TOKENS[:, :prompt], **{cache_arg(): cache})
    wi_gate = cache.lory[0][0]  # [B, 1, D, F]
    assert not torch.allclose(wi_gate[0], wi_gate[1], atol=1e-2)
    for method, argument in calls:
        getattr(cache, method)(argument)
    tokens = TOKENS[rows]
    got = [hf_logits(exported, tokens[:, t:t + 1], **{cache_arg(): cache}) for t in range(prompt, tokens.shape[1])]
    np.testing.assert_allclose(np.concatenate(got, axis=1), exported.logits(tokens, prompt_len=prompt)[:, prompt:],
                               **TOLERANCE)


def test_lory_refuses_a_cache_without_its_merges(export):
    """A plain DynamicCache has no place for the merged FFNs: a Lory model asks for its cache_class
    (other models decode with any DynamicCache)."""
    with pytest.raises(ValueError, match='cache_class'):
        hf_logits(export('lory'), TOKENS, **{cache_arg(): transformers.DynamicCache()})
    exported = export('btx_top2_softmax')
    np.testing.assert_allclose(hf_logits(exported, TOKENS, **{cache_arg(): transformers.DynamicCache()}),
                               exported.logits(TOKENS), **TOLERANCE)


# ---------------------------------------------------------------------------------------
# generate()


@functools.cache
def bam_jax_greedy(exported: Exported) -> list[list[int]]:
    """bam_jax's greedy continuation of each of PROMPTS (START first), by its decode engine."""
    engine = Engine(exported.graphdef, exported.config, bucket=16, prefill_chunk=16, cache_bucket=16)
    return engine.generate(exported.params, PROMPTS, NEW_TOKENS, eos_id=-1,  # no EOS: all NEW_TOKENS
                           steps_per_call=NEW_TOKENS)


def hf_generate(exported: Exported, prompts, left_pad: bool = False, **kwargs) -> list[list[int]]:
    """generate()'s new tokens for prompts, one at a time or as one left-padded batch."""
    batches = [prompts] if left_pad else [[p] for p in prompts]
    out = []
    for batch in batches:
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            new = exported.hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                                       **kwargs)[:, width:]
        out.extend(new.tolist())
    return out


@pytest.mark.parametrize('name', ['bam_expert_kv', 'bam_shared_kv', 'btx_top2_renormalize', 'lory'])
def test_greedy_generate_equals_bam_jax(export, name):
    """Greedy generate() with the KV cache gives bam_jax's tokens, prompt by prompt and for the
    prompts left-padded into one batch (the attention mask keeps padding out)."""
    exported = export(name)
    expected = bam_jax_greedy(exported)
    assert len(set(map(tuple, expected))) > 1 and all(len(set(row)) > 1 for row in expected)  # not degenerate
    assert hf_generate(exported, PROMPTS, do_sample=False) == expected
    assert hf_generate(exported, PROMPTS, left_pad=True, do_sample=False) == expected


@pytest.mark.parametrize('name', ['bam_expert_kv_extras', 'bam_shared_kv_extras'])
def test_generate_left_padded(export, name):
    """With a sliding window and the other attention options too, a left-padded batch generates
    what each prompt does alone (test_prefill_and_decode_logits checks the cached path's logits)."""
    exported = export(name)
    alone = hf_generate(exported, PROMPTS, do_sample=False)
    assert hf_generate(exported, PROMPTS, left_pad=True, do_sample=False) == alone


def test_generate_without_cache_and_sampling(export):
    """generate() without a cache decodes the same tokens; sampling runs and, keeping only the top
    token, is greedy."""
    exported = export('bam_shared_kv')
    expected = bam_jax_greedy(exported)
    assert hf_generate(exported, PROMPTS, do_sample=False, use_cache=False) == expected
    torch.manual_seed(0)
    sampled = hf_generate(exported, PROMPTS, do_sample=True, temperature=1.5, top_k=20)
    assert [len(row) for row in sampled] == [NEW_TOKENS] * len(PROMPTS)
    assert all(0 <= t < BASE.vocab_size for row in sampled for t in row)
    assert hf_generate(exported, PROMPTS, do_sample=True, top_k=1) == expected


BEAM_PROMPTS = [*PROMPTS, [START, *np.random.RandomState(7).randint(2, BASE.vocab_size, 7).tolist()]]
NUM_BEAMS = 3


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def reference_beam_search(exported: Exported, prompts, num_beams: int, new_tokens: int):
    """Beam search without EOS over bam_jax's forward pass without a cache: each step recomputes
    every beam's whole sequence (right-padded, which a causal model never reads), Lory merging
    from the prompt (prompt_len). Each step keeps the num_beams highest summed log-probs over all
    (beam, token) continuations, starting from one beam, as generate() does.

    Returns (new tokens [P, n, new_tokens] best first, scores [P, n]: the summed log-probs over
    new_tokens, generate()'s length_penalty 1, and whether some step after the first took a beam
    from another slot than its own, i.e. reordered the beams).
    """
    batch, n = len(prompts), num_beams
    lengths = np.array([len(p) for p in prompts])
    seqs = np.zeros((batch, n, lengths.max() + new_tokens), np.int32)
    for i, prompt in enumerate(prompts):
        seqs[i, :, :len(prompt)] = prompt
    scores = np.full((batch, n), -np.inf)
    scores[:, 0] = 0.0
    forward = jax.jit(functools.partial(bam_jax_logits, exported.graphdef))
    prompt_len = jnp.asarray(np.repeat(lengths, n))
    reordered = False
    for step in range(new_tokens):
        logits = np.asarray(forward(exported.params, jnp.asarray(seqs.reshape(batch * n, -1)), prompt_len))
        last = logits.reshape(batch, n, *logits.shape[1:])[np.arange(batch), :, lengths + step - 1]  # [P, n, V]
        total = (scores[..., None] + log_softmax(last)).reshape(batch, -1)  # [P, n * V]
        best = np.argsort(-total, axis=1, kind='stable')[:, :n]
        parents, tokens = np.divmod(best, last.shape[-1])
        reordered |= step > 0 and bool((parents != np.arange(n)).any())
        seqs = np.take_along_axis(seqs, parents[..., None], axis=1)
        seqs[np.arange(batch)[:, None], np.arange(n), (lengths + step)[:, None]] = tokens
        scores = np.take_along_axis(total, best, axis=1)
    new = np.stack([seqs[i, :, length:length + new_tokens] for i, length in enumerate(lengths)])
    return new, scores / new_tokens, reordered


def test_lory_beam_search_equals_reference(export):
    """Beam search with the cache generate() makes (a cache_class), on left-padded prompts of
    different content: the beams and scores of reference_beam_search, whose beams do get
    reordered; the same with a cache passed in."""
    exported = export('lory')
    expected, expected_scores, reordered = reference_beam_search(exported, BEAM_PROMPTS, NUM_BEAMS, NEW_TOKENS)
    assert reordered
    width = max(map(len, BEAM_PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in BEAM_PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in BEAM_PROMPTS])
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, num_beams=NUM_BEAMS,
                  num_return_sequences=NUM_BEAMS, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = exported.hf.generate(ids, **kwargs)
        passed = exported.hf.generate(ids, **{cache_arg(): exported.hf.cache_class()}, **kwargs)
    assert isinstance(cache_of(out), exported.hf.cache_class)
    assert sorted(cache_of(out).lory) == list(range(exported.config.num_layers))
    shape = (len(BEAM_PROMPTS), NUM_BEAMS, NEW_TOKENS)
    assert out.sequences[:, width:].reshape(shape).tolist() == expected.tolist()
    np.testing.assert_allclose(out.sequences_scores.reshape(shape[:2]).numpy(), expected_scores, **TOLERANCE)
    assert torch.equal(passed.sequences, out.sequences)
