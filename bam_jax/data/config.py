"""DataConfig, the gin-configurable description of what a run reads.

Light on purpose: gin parses a run's config.gin (which binds DataConfig) in commands that read no
data (export, generation, the upcycler), so this module imports neither seqio nor TensorFlow.
"""

import dataclasses
import os

import gin

from bam_jax.data import corpora
from bam_jax.data.user_domains import DomainSpec
from bam_jax.errors import BamJaxError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how (batches.py reads it, prepare.py prepares it).

    source: a domain ('code', or a user domain's name), 'seed' or 'mix' (the
      four built-in domains at equal rates), comma-separated domains (an
      equal-rate mixture), or domains with rates ('code:3,law:1').
    eval_domains: domains evaluated on their validation split; user domains
      are evaluated only when named here.
    spm_path: a SentencePiece model (.model) as the vocabulary.
    tokenizer_path: a Hugging Face tokenizer as the vocabulary: a directory
      with tokenizer.json (a model's directory), or that file. Not with
      spm_path. Neither: the byte vocabulary (vocab.py).
    validation_fraction: the share of documents, by content hash, held out.
    eval_batches: cap on validation batches per domain (0: no cap).
    user_domains: DomainSpecs from `text_domain(...)`.
    math_documents, max_file_bytes: the built-in corpora's settings
      (corpora.py).
    similarity_batching: every domain's training split in similarity order
      (as in Lory; similarity.py), over groups of similarity_group_documents
      documents (the order's memory bound), so a training row holds related
      documents; a prepared variant of its own, DOMAIN.similar. Validation
      is unchanged.
    data_dir: where prepared domains live (a local path or a bucket,
      gs://...), one directory per domain (prepare.py); by default
      $BAM_JAX_DATA_DIR, else ~/.cache/bam_jax/data.
    """
    source: str = 'seed'
    eval_domains: tuple = ('general', 'code', 'law', 'math')
    spm_path: str | None = None
    tokenizer_path: str | None = None
    validation_fraction: float = 0.05
    eval_batches: int = 8
    user_domains: tuple = ()
    math_documents: int = corpora.DEFAULT_MATH_DOCUMENTS
    max_file_bytes: int = corpora.MAX_FILE_BYTES
    similarity_batching: bool = False
    similarity_group_documents: int = 8192
    data_dir: str = os.environ.get('BAM_JAX_DATA_DIR', '~/.cache/bam_jax/data')

    def __post_init__(self):
        # gin hands over lists; keep the config hashable.
        object.__setattr__(self, 'eval_domains', tuple(self.eval_domains))
        object.__setattr__(self, 'user_domains', tuple(self.user_domains))
        names = [s.name for s in self.user_domains
                 if isinstance(s, DomainSpec)]
        if len(names) != len(self.user_domains):
            raise BamJaxError('DataConfig.user_domains takes text_domain(...) '
                              'entries only')
        if len(set(names)) != len(names):
            raise BamJaxError(f'user domain names repeat: {names}')
        if self.spm_path is not None and self.tokenizer_path is not None:
            raise BamJaxError('set DataConfig.spm_path or '
                              'DataConfig.tokenizer_path, not both')
        if self.similarity_group_documents < 1:
            raise BamJaxError(f'similarity_group_documents must be >= 1, got '
                              f'{self.similarity_group_documents}')

    @property
    def domains(self):
        """All domain names: built-in, then user."""
        return corpora.BUILTIN_DOMAINS + tuple(
            s.name for s in self.user_domains)


def eval_domain_names(config):
    """config.eval_domains (user domains join only when named there)."""
    names = set(config.domains)
    unknown = [d for d in config.eval_domains if d not in names]
    if unknown:
        raise BamJaxError(f'unknown eval domains {unknown}; domains are '
                          f'{list(config.domains)}')
    return config.eval_domains
