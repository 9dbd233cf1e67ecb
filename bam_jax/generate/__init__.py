"""Generation: a KV-cache decode engine and a run's checkpoint as a language model.

  cache     the per-layer cache pytree and its size (what each architecture caches, and why)
  sampling  greedy, temperature, top-k, top-p
  engine    prefill, decode step, the on-device decode loop
  lm        LanguageModel: log-likelihoods and generation with a run's vocabulary
  command   `bam-jax generate`
"""

from bam_jax.generate.cache import cache_bytes, cache_spec
from bam_jax.generate.engine import Engine, decode_step, prefill
from bam_jax.generate.lm import Completion, LanguageModel
from bam_jax.generate.sampling import Sampling, sample

__all__ = ['Completion', 'Engine', 'LanguageModel', 'Sampling', 'cache_bytes', 'cache_spec', 'decode_step',
           'prefill', 'sample']
