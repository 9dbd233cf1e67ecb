"""Vocabularies: bytes by default, a SentencePiece model when configured."""

import functools
import os

import seqio
from google.protobuf import message

from bam_jax.errors import BamJaxError


def _model_path(spm_path):
    return os.path.abspath(os.path.expanduser(str(spm_path)))


@functools.cache
def make_vocabulary(spm_path=None):
    """seqio.ByteVocabulary() (259 ids: pad 0, eos 1, unk 2, bytes 3..258),
    or the SentencePiece model at `spm_path`. Cached: one object per model,
    so tasks registered with it compare equal."""
    if spm_path is None:
        return seqio.ByteVocabulary()
    path = _model_path(spm_path)
    if not os.path.isfile(path):
        raise BamJaxError(f'SentencePiece model not found: {spm_path}')
    vocab = seqio.SentencePieceVocabulary(path)
    try:
        _ = vocab.vocab_size  # loads the model now, not inside tf.data
    except (message.Error, RuntimeError, OSError) as e:
        raise BamJaxError(f'cannot load SentencePiece model {spm_path}: '
                          f'{e}') from None
    return vocab


def vocabulary_key(spm_path=None):
    """A hashable identity of the vocabulary, for task registration."""
    return ('bytes',) if spm_path is None else ('spm', _model_path(spm_path))
