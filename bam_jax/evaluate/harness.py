"""A bam_jax run as an lm-evaluation-harness model, registered under the name `bam_jax`.

    lm_eval.simple_evaluate(model='bam_jax', model_args='workdir=runs/bam', tasks=[...])

after `import bam_jax.evaluate.harness`; or `bam-jax eval --workdir=DIR --tasks=...`; or the
harness's own command line with this model added: `python -m bam_jax.evaluate.harness run
--model bam_jax --model_args workdir=DIR --tasks ...` (lm_eval's command line has no way to load
a model class from another package, so this runs it with the class registered).

Every request goes through bam_jax.generate.LanguageModel, with the run's own vocabulary and its
start token before every text:
  loglikelihood          batched, longest first, one forward pass per batch; a context is cut
                         from the left to the model's length (LanguageModel.loglikelihood)
  loglikelihood_rolling  a document's tokens in consecutive chunks of the model's length, each
                         read from the start token, as bam_jax's training and `bam-jax eval` read
                         documents: the sum is the run's own held-out NLL of that text
  generate_until         the generation engine, with the request's stop strings and
                         max_gen_toks; a context is cut from the left to leave room for them (but
                         keeps at least half the model's length: generation ends at the length)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from bam_jax import storage
from bam_jax.errors import BamJaxError
from bam_jax.generate import LanguageModel
from bam_jax.generate.sampling import GREEDY, Sampling

DEFAULT_MAX_GEN_TOKS = 256


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# What lm_eval itself passes every model besides model_args (its --batch_size, --device ...).
HARNESS_ARGS = frozenset({'max_batch_size', 'device'})


@register_model('bam_jax')
class BamJaxLM(LM):
    """model_args: workdir=DIR (the run; its config.gin, or an upcycled/imported model's
    model.gin), gin="NAME=VALUE;NAME=VALUE" (overrides, as bam-jax eval's --gin.NAME=VALUE).
    Or, from Python, lm=LanguageModel(...). batch_size comes from the harness (default 16)."""

    def __init__(self, workdir: str | None = None, gin: str = '', lm: LanguageModel | None = None,
                 batch_size: int | str | None = None, progress: Callable[[str], None] | None = _stderr,
                 **harness):
        super().__init__()
        unknown = sorted(set(harness) - HARNESS_ARGS)
        if unknown:  # a silently ignored setting (dtype=float32) would read as if it had applied
            raise BamJaxError(f"the bam_jax harness model takes model_args workdir and gin, not {', '.join(unknown)} "
                              '(model settings go in gin="NAME=VALUE;...")')
        size = 16 if batch_size in (None, 'auto') else int(str(batch_size).split(':')[0])
        if lm is None:
            if workdir is None:
                raise BamJaxError('the bam_jax harness model needs model_args workdir=DIR')
            from bam_jax.gin_config import load_run_config
            configs = load_run_config(storage.path(workdir), [b for b in gin.split(';') if b.strip()])
            lm = LanguageModel.restore(workdir, configs.model, configs.data, configs.mesh, configs.max_length,
                                       progress, batch_size=size)
        self.lm, self.progress = lm, progress

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    @property
    def tokenizer_name(self) -> str:
        return type(self.lm.vocabulary).__name__

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), split where the whole text's tokens split: trailing
        spaces of the context move to the continuation, and the whole is encoded once, so a
        merge across the boundary is scored as the model would read it."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.lm.encode(context + continuation), self.lm.encode(context)
        if whole[:len(head)] != head:  # the boundary merged: fall back to separate encodings
            return head, self.lm.encode(continuation)
        return head, whole[len(head):]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair(*request.args) for request in requests]
        if any(not continuation for _, continuation in pairs):
            raise BamJaxError('loglikelihood: a request has an empty continuation')
        results = self.lm.loglikelihood(pairs, progress=self.progress)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial('loglikelihood', request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        chunks, owner = [], []
        length = self.lm.max_length
        for i, request in enumerate(requests):
            tokens = self.lm.encode(request.args[0])
            for start in range(0, len(tokens), length):
                chunks.append(([], tokens[start:start + length]))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.lm.loglikelihood(chunks, progress=self.progress) if chunks else []):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
        return totals

    def generate_until(self, requests) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings = [_generation_settings(request.args[1]) for request in requests]
        for i, setting in enumerate(settings):
            groups.setdefault(setting, []).append(i)
        out: list[str] = [''] * len(requests)
        for (stop, max_new, sampling), indices in groups.items():
            # The start token, the context, the new tokens; a context keeps at least half the length.
            room = max(self.lm.max_length // 2, self.lm.max_length - 1 - max_new)
            prompts = [self._prompt(requests[i].args[0], room) for i in indices]
            completions = self.lm.generate(prompts, max_new, sampling=sampling, stop=list(stop),
                                           progress=self.progress)
            for i, completion in zip(indices, completions):
                out[i] = completion.text
                self.cache_hook.add_partial('generate_until', requests[i].args, completion.text)
        return out

    def _prompt(self, context: str, room: int) -> list[int]:
        """The context's ids, cut from the left to `room`; an empty context reads EOS (a
        document boundary) after the start token."""
        ids = self.lm.encode(context)[-room:]
        return ids or [self.lm.eos_id]


def _generation_settings(kwargs: dict) -> tuple[tuple[str, ...], int, Sampling]:
    """(stop strings, max new tokens, sampling) of a request's generation kwargs."""
    kwargs = dict(kwargs or {})
    until = kwargs.pop('until', None) or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    max_new = int(kwargs.pop('max_gen_toks', DEFAULT_MAX_GEN_TOKS))
    temperature = float(kwargs.pop('temperature', 0.0) or 0.0)
    if not kwargs.pop('do_sample', False) or temperature == 0.0:
        return until, max_new, GREEDY
    return until, max_new, Sampling(temperature=temperature, top_k=int(kwargs.get('top_k') or 0),
                                    top_p=float(kwargs.get('top_p') or 1.0))


def main() -> None:
    """lm_eval's own command line, with the bam_jax model registered and bam_jax's offline tasks
    on the include path (unless one is given), cut from the built-in corpora prepared with the
    default data settings."""
    from lm_eval.__main__ import cli_evaluate

    from bam_jax.data import DataConfig
    from bam_jax.evaluate.offline_tasks import write_tasks
    if len(sys.argv) > 1 and sys.argv[1] in ('run', 'ls', 'validate') and '--include_path' not in sys.argv:
        sys.argv += ['--include_path', str(write_tasks(DataConfig()))]
    cli_evaluate()


if __name__ == '__main__':
    main()
