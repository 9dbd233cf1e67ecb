"""Vocabularies: bytes by default, a SentencePiece model or a Hugging Face tokenizer when configured.

    bytes          ByteVocabulary(): 259 ids, pad 0, eos 1, unk 2, byte b -> b + 3 (seqio's, ByT5's)
    spm_path       seqio.SentencePieceVocabulary of a .model file
    tokenizer_path HFTokenizerVocabulary of a Hugging Face tokenizer directory (tokenizer.json)

Every document's decoder input starts with `start_id(vocabulary)`: 0 for bytes and SentencePiece
(seqio's shift right puts it there), the tokenizer's BOS for a Hugging Face tokenizer, or its EOS
when it has no BOS (the token that separates its documents, as in Qwen).
"""

import functools
import os

from bam_jax import storage
from bam_jax.data.tokenizer_files import TOKENIZER_FILES
from bam_jax.errors import BamJaxError


def _model_path(path):
    return str(storage.path(path))


def vocabulary_key(spm_path=None, tokenizer_path=None):
    """A hashable identity of the vocabulary, for task registration:
    ('bytes',), ('spm', absolute path) or ('hf', absolute path)."""
    if spm_path is not None and tokenizer_path is not None:
        raise BamJaxError('set DataConfig.spm_path or DataConfig.tokenizer_path, not both')
    if tokenizer_path is not None:
        return ('hf', _model_path(tokenizer_path))
    return ('bytes',) if spm_path is None else ('spm', _model_path(spm_path))


BYTE_VOCAB_SIZE, BYTE_EOS_ID = 259, 1
_BYTE_OFFSET = 3  # pad 0, EOS 1, unk 2 come first


class ByteVocabulary:
    """seqio.ByteVocabulary's ids and text without seqio, and so without TensorFlow: byte b is id
    b + 3. decode reads up to the first EOS, drops every id that is not a byte's, and drops what
    is not UTF-8, as seqio does."""
    vocab_size, pad_id, eos_id, unk_id, bos_id = BYTE_VOCAB_SIZE, 0, BYTE_EOS_ID, 2, None

    def encode(self, text: str) -> list[int]:
        return [b + _BYTE_OFFSET for b in text.encode('utf-8')]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return bytes(i - _BYTE_OFFSET for i in ids if _BYTE_OFFSET <= i < BYTE_VOCAB_SIZE).decode('utf-8', 'ignore')


def make_vocabulary(spm_path=None, tokenizer_path=None):
    """ByteVocabulary(), the SentencePiece model at `spm_path` or the Hugging Face tokenizer
    at `tokenizer_path` (a directory with tokenizer.json, or that file). Cached: one object per
    model, so tasks registered with it compare equal. Loads the model now, so that a missing or
    broken one is a BamJaxError here rather than an error inside tf.data."""
    return _load(vocabulary_key(spm_path, tokenizer_path))


@functools.cache
def _load(key):
    kind, path = key[0], key[-1]
    if kind == 'bytes':
        return ByteVocabulary()
    if kind == 'hf':
        return _hf_vocabulary(path)
    from google.protobuf import message

    from bam_jax.data.tf_setup import seqio  # on demand: only a SentencePiece model needs it

    if not os.path.isfile(path):
        raise BamJaxError(f'SentencePiece model not found: {path}')
    vocab = seqio.SentencePieceVocabulary(path)
    try:
        _ = vocab.vocab_size  # loads the model now, not inside tf.data
    except (message.Error, RuntimeError, OSError) as e:
        raise BamJaxError(f'cannot load SentencePiece model {path}: {e}') from None
    return vocab


def vocab_size(config) -> int:
    """The number of ids of a DataConfig's vocabulary (the byte vocabulary's without loading it)."""
    if config.spm_path is None and config.tokenizer_path is None:
        return BYTE_VOCAB_SIZE
    return vocabulary(config).vocab_size


def config_start_id(config) -> int:
    """start_id of a DataConfig's vocabulary: 0 for bytes and SentencePiece without loading them."""
    return 0 if config.tokenizer_path is None else start_id(vocabulary(config))


def vocabulary(config):
    """The vocabulary of a DataConfig: bytes, its SentencePiece model or its Hugging Face tokenizer."""
    return make_vocabulary(config.spm_path, config.tokenizer_path)


def _hf_vocabulary(path: str):
    """The tokenizers library reads local files only: a tokenizer on remote storage is read from a
    temporary copy (it is wholly in memory afterwards), and keeps its remote name."""
    from bam_jax.data.hf_tokenizer import HFTokenizerVocabulary

    if not storage.is_uri(path):
        return HFTokenizerVocabulary(path)
    remote = storage.path(path)
    directory, name = (remote, None) if remote.is_dir() else (remote.parent, remote.name)
    if not (directory / (name or 'tokenizer.json')).exists():
        raise BamJaxError(f'Hugging Face tokenizer not found: {path}')
    with storage.local_copy(directory, [*TOKENIZER_FILES, 'generation_config.json', 'config.json']) as local:
        vocabulary = HFTokenizerVocabulary(local / name if name else local)
    vocabulary.directory, vocabulary.path = str(directory), str(directory / (name or 'tokenizer.json'))
    return vocabulary


def start_id(vocabulary):
    """The id in front of every document (and chunk) a model reads: 0 for the byte and
    SentencePiece vocabularies; for a Hugging Face tokenizer its BOS, or its EOS when it has none."""
    return getattr(vocabulary, 'start_id', 0)  # HFTokenizerVocabulary.start_id
