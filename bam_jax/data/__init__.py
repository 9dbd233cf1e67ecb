"""Data: raw documents prepared into token files (`bam-jax prepare-data`), and the training and
validation batches read from them.

  sources       raw files (JSONL, Parquet, text; local or in a bucket) read as streams
  corpora       the built-in domains: general, code, law, math (math_problems)
  prepare       de-duplication, the split, tokenization, the prepared domain and its manifest
  prepare_pod   the same with many workers (a pod's hosts), each reading its share of the files
  token_files   the prepared format: flat token ids and a document index per part
  token_stream  the training stream: windows of tokens, shuffled per epoch, mixtures, any step
  batches       a DataConfig's training stream and validation batches
  similarity    Lory's similarity order
  vocab         the vocabularies: bytes, SentencePiece, a Hugging Face tokenizer

Importing the package needs neither seqio nor TensorFlow; they load only with a SentencePiece or
Hugging Face vocabulary (vocab.py, hf_tokenizer.py).
"""

from bam_jax.data.batches import eval_batches, source_rates, train_batches
from bam_jax.data.config import DataConfig, eval_domain_names
from bam_jax.data.corpora import BUILTIN_DOMAINS, normalise
from bam_jax.data.math_problems import problem as math_problem
from bam_jax.data.tokenizer_files import copy_tokenizer_files, write_byte_tokenizer
from bam_jax.data.user_domains import DomainSpec, text_domain
from bam_jax.data.vocab import config_start_id, start_id, vocab_size, vocabulary

__all__ = [
    'BUILTIN_DOMAINS',
    'config_start_id',
    'DataConfig',
    'DomainSpec',
    'copy_tokenizer_files',
    'eval_batches',
    'eval_domain_names',
    'math_problem',
    'normalise',
    'source_rates',
    'start_id',
    'text_domain',
    'train_batches',
    'vocab_size',
    'vocabulary',
    'write_byte_tokenizer',
]
