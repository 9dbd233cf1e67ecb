"""Data: built-in corpora, seqio tasks and mixtures, packed numpy batches.

Importing the package is light: DataConfig, the corpora and the tokenizer files need neither
seqio nor TensorFlow, so the model, training step, generation, upcycler and Hugging Face paths
import it on a machine that has neither (the accelerator check runs there). The names below that
read data through seqio load their module, and TensorFlow with it, on first use.
"""

import importlib

from bam_jax.data.config import DataConfig, eval_domain_names
from bam_jax.data.corpora import (
    BUILTIN_DOMAINS,
    Corpus,
    Document,
    load_corpus,
    normalise,
)
from bam_jax.data.math_problems import problem as math_problem
from bam_jax.data.tokenizer_files import copy_tokenizer_files, write_byte_tokenizer
from bam_jax.data.user_domains import DomainSpec, text_domain
from bam_jax.data.vocab import start_id, vocabulary

# name -> the module that defines it; each of these imports seqio and TensorFlow.
_ON_DEMAND = {
    'HFTokenizerVocabulary': 'hf_tokenizer',
    'train_batches': 'pipeline',
    'eval_batches': 'pipeline',
    'resolve_source': 'pipeline',
    'MIX_MIXTURE': 'tasks',
    'SEED_MIXTURE': 'tasks',
    'register_all': 'tasks',
    'task_name': 'tasks',
    'TrainStream': 'train_stream',
    'shard_count': 'train_stream',
    'stream_state_prefixes': 'train_stream',
}


def __getattr__(name):
    if name not in _ON_DEMAND:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'{__name__}.{_ON_DEMAND[name]}'), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


__all__ = [
    'BUILTIN_DOMAINS',
    'Corpus',
    'DataConfig',
    'Document',
    'DomainSpec',
    'copy_tokenizer_files',
    'eval_domain_names',
    'load_corpus',
    'math_problem',
    'normalise',
    'start_id',
    'text_domain',
    'vocabulary',
    'write_byte_tokenizer',
    *_ON_DEMAND,
]
