"""DataConfig, the gin-configurable description of what a run reads.

Light on purpose: gin parses a run's config.gin (which binds DataConfig) in commands that read no
data (export, generation, the upcycler), so this module imports neither seqio nor TensorFlow.
"""

import dataclasses

import gin

from bam_jax.data import corpora
from bam_jax.data.user_domains import DomainSpec
from bam_jax.errors import BamJaxError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how.

    source: a domain ('code', or a user domain's name), 'seed', 'mix',
      comma-separated domains (an equal-rate mixture of them), or the name of
      any registered seqio task or mixture with a 'targets' feature.
    eval_domains: domains evaluated on their validation split; user domains
      are evaluated only when named here.
    spm_path: a SentencePiece model (.model) as the vocabulary.
    tokenizer_path: a Hugging Face tokenizer as the vocabulary: a directory
      with tokenizer.json (a model's directory), or that file. Not with
      spm_path. Neither: the byte vocabulary (vocab.py).
    eval_batches: cap on validation batches per domain (0: no cap).
    user_domains: DomainSpecs from `text_domain(...)`.
    max_file_bytes, max_domain_bytes: size limits of the built-in corpora.
    similarity_group_documents: prepare-data puts a domain's training split
      in similarity order over groups of this many documents (its memory
      bound), into a variant of its own, DOMAIN.similar.
    data_dir: where `bam-jax prepare-data` writes prepared domains (a local
      path or a bucket, gs://...), one directory per domain (prepare.py).
    similarity_batching: the training split of every domain reads chains of
      similar documents (as in Lory; similarity.py) joined into texts of about
      `similarity_group_bytes` bytes, so a training row holds related
      documents. Validation is unchanged.
    data_shards: the training documents are split into this many disjoint
      shards, each giving an equal part of every batch, and divided among
      the processes (train_stream.py). 0: one per process. Fix it to make a
      run's batches independent of the number of processes (a run resumed
      on another slice size, or checked against one process).
    """
    source: str = 'seed'
    eval_domains: tuple = ('general', 'code', 'law', 'math')
    spm_path: str | None = None
    tokenizer_path: str | None = None
    validation_fraction: float = 0.05
    shuffle_buffer: int = 1000
    eval_batches: int = 8
    user_domains: tuple = ()
    math_documents: int = corpora.DEFAULT_MATH_DOCUMENTS
    max_file_bytes: int = corpora.MAX_FILE_BYTES
    max_domain_bytes: int = corpora.MAX_DOMAIN_BYTES
    similarity_batching: bool = False
    similarity_group_bytes: int = 16384
    similarity_group_documents: int = 8192
    data_shards: int = 0
    data_dir: str = '~/.cache/bam_jax/data'

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
        if self.shuffle_buffer < 1:
            raise BamJaxError(f'shuffle_buffer must be >= 1, got '
                              f'{self.shuffle_buffer}')
        if self.data_shards < 0:
            raise BamJaxError(f'data_shards must be >= 0, got '
                              f'{self.data_shards}')
        if self.similarity_group_documents < 1:
            raise BamJaxError(f'similarity_group_documents must be >= 1, got '
                              f'{self.similarity_group_documents}')
        if self.similarity_group_bytes < 1:
            raise BamJaxError(f'similarity_group_bytes must be >= 1, got '
                              f'{self.similarity_group_bytes}')

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
