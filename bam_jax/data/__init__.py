"""Data: built-in corpora, seqio tasks and mixtures, packed numpy batches.

TensorFlow is told to keep off GPUs/TPUs before anything else imports it.
"""

from bam_jax.data import tf_setup  # noqa: F401  (must come first)
from bam_jax.data.corpora import (
    BUILTIN_DOMAINS,
    Corpus,
    Document,
    load_corpus,
    normalise,
)
from bam_jax.data.hf_tokenizer import (
    HFTokenizerVocabulary,
    copy_tokenizer_files,
    write_byte_tokenizer,
)
from bam_jax.data.math_problems import problem as math_problem
from bam_jax.data.pipeline import (
    DataConfig,
    eval_batches,
    eval_domain_names,
    resolve_source,
    train_batches,
    vocabulary,
)
from bam_jax.data.tasks import (
    MIX_MIXTURE,
    SEED_MIXTURE,
    register_all,
    task_name,
)
from bam_jax.data.train_stream import TrainStream, shard_count, stream_state_prefixes
from bam_jax.data.user_domains import DomainSpec, text_domain
from bam_jax.data.vocab import start_id

__all__ = [
    'BUILTIN_DOMAINS',
    'MIX_MIXTURE',
    'SEED_MIXTURE',
    'TrainStream',
    'Corpus',
    'DataConfig',
    'Document',
    'DomainSpec',
    'HFTokenizerVocabulary',
    'copy_tokenizer_files',
    'eval_batches',
    'eval_domain_names',
    'load_corpus',
    'math_problem',
    'normalise',
    'register_all',
    'resolve_source',
    'shard_count',
    'start_id',
    'stream_state_prefixes',
    'task_name',
    'text_domain',
    'train_batches',
    'vocabulary',
    'write_byte_tokenizer',
]
