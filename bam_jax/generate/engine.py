"""The decode engine: prefill, one decode step, and a decode loop that runs on the device.

All three are pure functions of (params, inputs, cache), jit-compiled once per shape with the
cache donated, so each step updates the cache in place. Prompts of different lengths share a
batch right-padded: row b's prompt fills cache slots 0..len_b-1, its n-th new token goes to
slot len_b + n, and each query reads the slots up to its own position (layers.cache_mask), so
no row ever reads padding or another row's state. Routed FFN experts run dropless at inference
(bam_jax/models/moe.py), so a row's tokens never depend on its batch-mates.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from bam_jax.generate.cache import cache_shardings, cache_spec, init_cache
from bam_jax.generate.sampling import GREEDY, Sampling, sample
from bam_jax.models import Block, ModelConfig, merge_params
from bam_jax.parallel.sharding import logical_to_spec

NOTHING = -1  # in a row's output after it stopped


def prefill(graphdef: nnx.GraphDef, params, tokens, lengths, cache, offset, logits):
    """Runs the prompts' tokens offset .. offset + C - 1 in one forward pass and fills the cache.

    tokens: [B, C] int, those tokens of the right-padded prompts; lengths: [B] >= 1, the whole
    prompts' lengths. A long prompt goes in chunks (Engine.prefill), each attending to the cache
    the earlier ones filled; a Lory model needs the whole prompt in one (its merge reads it all).
    logits: [B, V], what earlier chunks found (zeros before the first).
    Returns (logits [B, V] float32 of each row's next token, where its prompt ends in this chunk,
    else the given ones; cache).
    """
    batch, width = tokens.shape
    positions = offset + jnp.broadcast_to(jnp.arange(width), (batch, width))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # padding: 0 (Lory's merge skips it)
    model = merge_params(graphdef, params)
    hidden, cache = model.hidden(tokens, segment_ids, positions, prompt_len=lengths, cache=cache)
    last = lengths - 1 - offset
    found = model.logits(jnp.take_along_axis(hidden, jnp.clip(last, 0, width - 1)[:, None, None], axis=1))[:, 0]
    return jnp.where(((last >= 0) & (last < width))[:, None], found, logits), cache


def decode_step(graphdef: nnx.GraphDef, params, tokens, positions, cache):
    """Appends one token per row. tokens, positions: [B] -> (logits [B, V] float32, cache)."""
    model = merge_params(graphdef, params)
    logits, cache = model(tokens[:, None], None, positions[:, None], cache=cache)
    return logits[:, 0], cache


def _step_keys(keys, count):
    return jax.vmap(jax.random.fold_in)(keys, count)


def first_token(logits, cache, lengths, keys, max_new, eos_id, *, sampling: Sampling):
    """The first new token, from prefill's logits. Returns the loop state: {'cache', 'token' [B]
    (the last new token), 'position' [B] (its slot), 'count' [B] (new tokens so far),
    'max_new' [B], 'done' [B], 'keys' [B]}."""
    token = sample(logits, _step_keys(keys, jnp.zeros_like(lengths)), sampling)
    count = jnp.ones_like(lengths)
    return {'cache': cache, 'token': token, 'position': lengths, 'count': count, 'max_new': max_new,
            'done': (token == eos_id) | (count >= max_new), 'keys': keys}


def decode_loop(graphdef, state: dict, params, eos_id, *, steps: int, sampling: Sampling):
    """Up to `steps` decode steps in one lax.while_loop, ending early once every row is done.

    Returns (state, tokens [B, steps]: each step's new token, NOTHING for rows already done).
    """
    batch = state['token'].shape[0]

    def body(carry):
        i, state, out = carry
        logits, cache = decode_step(graphdef, params, state['token'], state['position'], state['cache'])
        active = ~state['done']
        token = jnp.where(active, sample(logits, _step_keys(state['keys'], state['count']), sampling), NOTHING)
        count = state['count'] + active
        state = dict(state, cache=cache, token=jnp.where(active, token, state['token']),
                     position=state['position'] + active, count=count,
                     done=state['done'] | (token == eos_id) | (count >= state['max_new']))
        return i + 1, state, out.at[:, i].set(token)

    def more(carry):
        i, state, _ = carry
        return (i < steps) & ~jnp.all(state['done'])

    out = jnp.full((batch, steps), NOTHING, jnp.int32)
    _, state, out = jax.lax.while_loop(more, body, (0, state, out))
    return state, out


class Engine:
    """Compiled prefill, decode step and decode loop for one model, on an optional mesh.

    decode_step, start (prefill and the first token) and loop (decode_loop) run the module's
    functions, jit-compiled with the cache (or the loop state) donated; generate drives them.
    params must be placed as the model's parameter shardings on that mesh (or unplaced without
    one). Prompt widths are rounded up to a multiple of `bucket` and cache lengths to one of
    `cache_bucket`, so batches of similar shapes share their compilations; prompts are
    prefilled in chunks of `prefill_chunk` tokens (a multiple of bucket), which bounds the
    attention scores' memory at long context.
    """

    def __init__(self, graphdef: nnx.GraphDef, config: ModelConfig, mesh: Mesh | None = None, bucket: int = 64,
                 prefill_chunk: int = 256, cache_bucket: int = 64):
        if prefill_chunk % bucket:
            raise ValueError(f'prefill_chunk {prefill_chunk} is not a multiple of bucket {bucket}')
        self.graphdef, self.config, self.mesh = graphdef, config, mesh
        self.bucket, self.prefill_chunk, self.cache_bucket = bucket, prefill_chunk, cache_bucket
        self._prefill = jax.jit(functools.partial(prefill, graphdef), donate_argnums=3)
        self._first_token = jax.jit(first_token, static_argnames='sampling', donate_argnums=1)
        self.decode_step = jax.jit(functools.partial(decode_step, graphdef), donate_argnums=3)
        self.loop = jax.jit(functools.partial(decode_loop, graphdef), static_argnames=('steps', 'sampling'),
                            donate_argnums=0)

    def prefill(self, params, tokens: np.ndarray, lengths: np.ndarray, cache):
        """prefill over the whole right-padded prompts [B, P], chunk by chunk (at once where a
        sublayer needs it: Block.whole_prompt_prefill).
        Returns (logits [B, V] of each row's next token, cache)."""
        width = tokens.shape[1]
        chunk = width if Block.whole_prompt_prefill(self.config) else min(width, self.prefill_chunk)
        logits = jnp.zeros((tokens.shape[0], self.config.vocab_size), jnp.float32)
        lengths = self.put(lengths)
        for offset in range(0, width, chunk):
            logits, cache = self._prefill(params, self.put(tokens[:, offset:offset + chunk]), lengths, cache,
                                          offset, logits)
        return logits, cache

    def start(self, params, tokens: np.ndarray, lengths: np.ndarray, cache, keys, max_new: np.ndarray, eos_id: int,
              sampling: Sampling = GREEDY) -> dict:
        """prefill and the first new token: the decode loop's state (first_token)."""
        logits, cache = self.prefill(params, tokens, lengths, cache)
        return self._first_token(logits, cache, self.put(lengths), keys, self.put(max_new), eos_id,
                                 sampling=sampling)

    def new_cache(self, batch: int, max_len: int):
        """A zero cache for `batch` rows of up to `max_len` tokens, placed on the mesh."""
        spec = cache_spec(self.config, batch, max_len)
        return init_cache(spec, cache_shardings(self.config, spec, self.mesh) if self.mesh else None)

    def on_mesh(self):
        """The context to run under: the engine's mesh (the expert layers dispatch over it), if any."""
        return jax.set_mesh(self.mesh) if self.mesh else contextlib.nullcontext()

    def put(self, array: np.ndarray):
        """A host batch array onto the mesh, split over the data-parallel axes where it divides."""
        if self.mesh is None:
            return jnp.asarray(array)
        names = ('batch',) + (None,) * (array.ndim - 1)
        return jax.device_put(array, NamedSharding(self.mesh, logical_to_spec(names, array.shape, self.mesh)))

    def pad_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded [B, P] token ids (P a multiple of bucket) and the lengths [B]."""
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        width = -(-int(lengths.max()) // self.bucket) * self.bucket
        tokens = np.zeros((len(prompts), width), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
        return tokens, lengths

    def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 eos_id: int, sampling: Sampling = GREEDY, seed: int = 0, steps_per_call: int = 64,
                 stopped: Callable[[int, list[int]], bool] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """New tokens for each prompt (token ids, each of length >= 1), EOS included if emitted.

        max_new_tokens: for all rows or per row (>= 1). Row b's sampling key is
        fold_in(fold_in(key(seed), b), n) for its n-th token. stopped(row, tokens so far) is
        asked between device calls of `steps_per_call` steps (stop strings); a row it accepts
        stops there. progress(steps so far, most steps) follows each call.
        """
        batch = len(prompts)
        max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (batch,)).copy()
        tokens, lengths = self.pad_prompts(prompts)
        cache = self.new_cache(batch, -(-(tokens.shape[1] + int(max_new.max())) // self.cache_bucket)
                               * self.cache_bucket)
        keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.key(seed), b))(jnp.arange(batch))
        with self.on_mesh():
            state = self.start(params, tokens, lengths, cache, keys, max_new, eos_id, sampling)
            outputs = [[int(t)] for t in np.asarray(state['token'])]
            done = np.asarray(state['done']).copy()
            while not done.all():
                done |= [stopped is not None and stopped(b, out) for b, out in enumerate(outputs)]
                if done.all():
                    break
                state['done'] = self.put(done)
                state, new = self.loop(state, params, eos_id, steps=steps_per_call, sampling=sampling)
                for row, chunk in zip(outputs, np.asarray(new)):
                    row.extend(int(t) for t in chunk if t != NOTHING)
                done = np.asarray(state['done']).copy()
                if progress:
                    progress(max(len(out) for out in outputs), int(max_new.max()))
        return outputs

