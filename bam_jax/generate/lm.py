"""A run's checkpoint as a language model: token log-likelihoods and generation, in batches.

This is the interface downstream evaluation builds on. Inference routes dropless, so every
score is a function of its own request only, whatever the batch or the device count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bam_jax import data, storage
from bam_jax.errors import BamJaxError
from bam_jax.generate.engine import Engine
from bam_jax.generate.sampling import GREEDY, Sampling
from bam_jax.models import ModelConfig, abstract_model, merge_params, param_shardings, split_params
from bam_jax.parallel import MeshConfig, create_mesh
from bam_jax.workdir import check_model, resolve_checkpoint, restore_params


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's generation. stop_reason: 'eos', 'stop' (a stop string; text and ids end
    before it) or 'length' (max_new_tokens, or the model's length)."""
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    stop_reason: str


def _score(graphdef, params, tokens, targets, weights, segment_ids, prompt_len):
    """(sum of the weighted targets' log-probabilities [B], whether each was the arg-max [B])."""
    logits = merge_params(graphdef, params)(tokens, segment_ids, prompt_len=prompt_len)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return jnp.sum(target_lp * weights, axis=-1), jnp.all(greedy, axis=-1)


class LanguageModel:
    """A model with its parameters, its mesh and its run's vocabulary.

    max_length: the longest sequence it is used on (a run's training length): contexts are cut
    from the left to fit, and generation stops there.
    Every text the model reads starts with `start_id`, as every document did in training (the
    inputs are the targets shifted right, with data.start_id(vocabulary) in front: 0 for bytes and
    SentencePiece, a Hugging Face tokenizer's BOS, or its EOS when it has none); ids given and
    returned exclude it.
    """

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params, vocabulary, max_length: int,
                 mesh: Mesh | None = None, batch_size: int = 16):
        self.config, self.graphdef, self.params, self.mesh = config, graphdef, params, mesh
        self.vocabulary, self.max_length, self.batch_size = vocabulary, max_length, batch_size
        self.start_id = data.start_id(vocabulary)
        self.engine = Engine(graphdef, config, mesh)
        self.step_dir: storage.Path | None = None  # set by restore
        self.settings_changed: dict = {}
        self._score = jax.jit(functools.partial(_score, graphdef))

    @classmethod
    def restore(cls, workdir: str | storage.Path, config: ModelConfig, data_config: data.DataConfig,
                mesh_config: MeshConfig, max_length: int, progress: Callable[[str], None] | None = None,
                batch_size: int = 16) -> LanguageModel:
        """The latest checkpoint of `workdir` as `config` (its settings may differ from the
        checkpoint's), read with data_config's vocabulary, on mesh_config's mesh. The configs are
        a run's (gin_config.load_run_config: its config.gin plus overrides)."""
        from bam_jax.models.config import describe_changes

        step_dir = resolve_checkpoint(storage.path(workdir), 'workdir')
        changed = check_model(config, step_dir, f'checkpoint {step_dir}')
        if changed and progress:
            progress(f'settings changed since that checkpoint: {describe_changes(changed)}')
        mesh = create_mesh(mesh_config)
        abstract = abstract_model(config)
        graphdef, abstract_params = split_params(abstract)
        params = restore_params(step_dir, abstract_params, param_shardings(abstract, mesh))
        model = cls(config, graphdef, params, data.vocabulary(data_config), max_length, mesh, batch_size)
        model.step_dir, model.settings_changed = step_dir, changed
        return model

    @property
    def eos_id(self) -> int:
        return self.vocabulary.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.vocabulary.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.vocabulary.decode([int(i) for i in ids])

    def _batches(self, items: Sequence, key: Callable) -> list[list[int]]:
        """Indices of `items` in batches of batch_size, longest first (similar lengths share a batch)."""
        order = sorted(range(len(items)), key=lambda i: -key(items[i]))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      progress: Callable[[str], None] | None = None) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): (log P(continuation | context), whether
        greedy decoding gives exactly the continuation).

        start_id + context + continuation is cut from the left to max_length + 1 tokens (the
        first is only read), so long contexts lose their oldest tokens.
        A Lory model merges its experts from the context, as it does from a prompt.
        """
        rows = []
        for context, continuation in requests:
            if not continuation:
                raise BamJaxError('loglikelihood: a request has an empty continuation')
            whole = [self.start_id, *context, *continuation]
            whole = whole[-(self.max_length + 1):]
            scored = min(len(continuation), len(whole) - 1)
            rows.append((whole, scored))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        with self.engine.on_mesh():
            for done, batch in enumerate(self._batches(rows, key=lambda r: len(r[0]))):
                width = -(-max(len(rows[i][0]) - 1 for i in batch) // self.engine.bucket) * self.engine.bucket
                arrays = np.zeros((4, self.batch_size, width), np.int32)  # tokens, targets, weights, segments
                prompt_len = np.ones(self.batch_size, np.int32)
                for r, i in enumerate(batch):
                    whole, scored = rows[i]
                    n = len(whole) - 1
                    arrays[0, r, :n], arrays[1, r, :n] = whole[:-1], whole[1:]
                    arrays[2, r, n - scored:n] = 1
                    arrays[3, r, :n] = 1
                    prompt_len[r] = n - scored + 1
                inputs = [self.engine.put(a) for a in (*arrays, prompt_len)]
                logp, greedy = self._score(self.params, *inputs)
                for r, i in enumerate(batch):
                    results[i] = (float(logp[r]), bool(greedy[r]))
                if progress:
                    progress(f'log-likelihoods: {min((done + 1) * self.batch_size, len(rows))}/{len(rows)} requests')
        return results

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *, sampling: Sampling = GREEDY,
                 seed: int = 0, stop: Sequence[str] = (), progress: Callable[[str], None] | None = None
                 ) -> list[Completion]:
        """A completion per prompt (token ids, each non-empty; with the start token and one new token, at
        most max_length).

        Generation stops at EOS, at any of the `stop` strings, after max_new_tokens, or when the
        sequence reaches max_length. Prompts run in batches of batch_size, longest first;
        prompt i's sampling depends on the seed and on i's place in its batch only.
        """
        if max_new_tokens < 1:
            raise BamJaxError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise BamJaxError(f'prompt {i} is empty')
            if len(prompt) + 2 > self.max_length:
                raise BamJaxError(f'prompt {i} has {len(prompt)} tokens; this model takes at most '
                                  f'{self.max_length - 2} (its length is {self.max_length}, less a start '
                                  'token and one new token)')
        results: list[Completion | None] = [None] * len(prompts)
        finished = 0
        for batch in self._batches(prompts, key=len):
            rows = [[self.start_id, *prompts[i]] for i in batch]
            limits = [min(max_new_tokens, self.max_length - len(r)) for r in rows]
            stopped = (lambda b, ids: self._stop_at(ids, stop) is not None) if stop else None
            what = f'prompts {finished + 1}-{finished + len(rows)} of {len(prompts)}'
            tokens = None if progress is None else (
                lambda step, steps, what=what: progress(f'{what}: {step}/{steps} new tokens'))
            outputs = self.engine.generate(self.params, rows, limits, eos_id=self.eos_id, sampling=sampling,
                                           seed=seed, stopped=stopped, progress=tokens)
            for i, row, out in zip(batch, rows, outputs):
                results[i] = self._completion(row[1:], out, stop)
            finished += len(batch)
        return results

    def _stop_at(self, ids: list[int], stop: Sequence[str]) -> int | None:
        """Where the earliest stop string starts in the decoded ids, or None."""
        text = self.decode([t for t in ids if t != self.eos_id])
        found = [text.find(s) for s in stop if s and s in text]
        return min(found) if found else None

    def _completion(self, prompt: list[int], out: list[int], stop: Sequence[str]) -> Completion:
        if self.eos_id in out:
            ids, reason = out[:out.index(self.eos_id)], 'eos'
        else:
            ids, reason = out, 'length'
        cut = self._stop_at(ids, stop) if stop else None
        if cut is not None:
            # the fewest tokens whose text reaches the cut (the stop string itself is dropped)
            n = next(n for n in range(len(ids) + 1) if len(self.decode(ids[:n])) >= cut)
            return Completion(prompt, ids[:n], self.decode(ids)[:cut], 'stop')
        return Completion(prompt, ids, self.decode(ids), reason)
