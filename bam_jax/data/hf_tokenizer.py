"""A Hugging Face tokenizer as a seqio vocabulary (for the data pipeline; loaded on demand).

HFTokenizerVocabulary reads the `tokenizer.json` of a Hugging Face model directory with the
`tokenizers` library (no torch, no transformers). Its BOS and EOS come from the files next to it:
`tokenizer_config.json`, then `special_tokens_map.json` (`bos_token` / `eos_token`: a string, or a
dict with "content"), then `generation_config.json`, then `config.json` (`bos_token_id` /
`eos_token_id`: an int, or a list whose first entry counts).
"""

import json
import os

import numpy as np
import tokenizers

from bam_jax.data.tf_setup import seqio, tf
from bam_jax.errors import BamJaxError

_TOKEN_FILES = ('tokenizer_config.json', 'special_tokens_map.json')  # name tokens: 'bos_token': '<s>'
_ID_FILES = ('generation_config.json', 'config.json')  # give ids: 'bos_token_id': 1


def _one_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _read_json(path):
    """The dict in a JSON file; None when there is no such file."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BamJaxError(f'cannot read {path}: {_one_line(e)}') from None
    if not isinstance(value, dict):
        raise BamJaxError(f'cannot read {path}: not a JSON object')
    return value


def _content(token):
    """A special token as tokenizer_config.json writes it: '<s>' or {'content': '<s>', ...}."""
    return token.get('content') if isinstance(token, dict) else token


class HFTokenizerVocabulary(seqio.Vocabulary):
    """The Hugging Face tokenizer in a directory (or at the path of its tokenizer.json) as a seqio
    vocabulary.

    encode(text) -> ids with no special tokens added (add_special_tokens=False), as
    `tokenizers.Tokenizer.encode`; seqio appends EOS to each document, and the packed batches start
    each one with `start_id` (vocab.py). decode(ids) -> text through the first EOS (seqio's rule),
    special tokens skipped (`tokenizers.Tokenizer.decode`'s default). encode_tf / decode_tf run the
    same code in tf.data through tf.numpy_function.

    bos_id: the tokenizer's BOS, or None when it has none: a bos_token of null in
    tokenizer_config.json (Qwen) says so, and then config.json's bos_token_id is not consulted.
    eos_id: required. pad_id: the tokenizer's pad token, else 0 (the batches' padding is masked out
    by the loss weights anyway). unk_id: its unknown token, or None.
    `split_special_tokens: true` in tokenizer_config.json encodes the text of special tokens as
    plain text, as transformers does.
    """

    def __init__(self, path):
        path = os.path.abspath(os.path.expanduser(str(path)))
        if os.path.isdir(path):
            self.directory, self.path = path, os.path.join(path, 'tokenizer.json')
        elif os.path.isfile(path):
            self.directory, self.path = os.path.dirname(path), path
        else:
            raise BamJaxError(f'Hugging Face tokenizer not found: {path}')
        if not os.path.isfile(self.path):
            hint = (' (tokenizer.model alone is a SentencePiece model: set DataConfig.spm_path)'
                    if os.path.isfile(os.path.join(self.directory, 'tokenizer.model')) else '')
            raise BamJaxError(f'no tokenizer.json in {self.directory}{hint}')
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise BamJaxError(f'cannot read Hugging Face tokenizer {self.path}: {_one_line(e)}') from None
        configs = {name: _read_json(os.path.join(self.directory, name)) for name in _TOKEN_FILES + _ID_FILES}
        if (configs['tokenizer_config.json'] or {}).get('split_special_tokens'):
            self.tokenizer.encode_special_tokens = True
        self._size = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._eos_id = self._special_id('eos', configs)
        if self._eos_id is None:
            raise BamJaxError(f'the tokenizer in {self.directory} has no EOS token: none of '
                              f'{", ".join(_TOKEN_FILES + _ID_FILES)} names one')
        self._bos_id = self._special_id('bos', configs)
        self._pad_id = self._special_id('pad', {name: configs[name] for name in _TOKEN_FILES})
        if self._pad_id is None:
            self._pad_id = (self.tokenizer.padding or {}).get('pad_id', 0)
        self._unk_id = self._special_id('unk', {name: configs[name] for name in _TOKEN_FILES})
        if self._unk_id is None:
            unk = getattr(self.tokenizer.model, 'unk_token', None)
            self._unk_id = self.tokenizer.token_to_id(unk) if unk else None
        super().__init__(extra_ids=0)

    def _special_id(self, name, configs):
        """The id of the `name` ('bos', 'eos', ...) token, from the first file that mentions it.

        A file that sets `<name>_token` to null says there is none, except for EOS, which is
        required and so is looked for further."""
        for file in _TOKEN_FILES:
            config = configs.get(file)
            if not config or f'{name}_token' not in config:
                continue
            token = _content(config[f'{name}_token'])
            if token is None:
                if name == 'eos':
                    continue
                return None
            token_id = self.tokenizer.token_to_id(str(token))
            if token_id is None:
                raise BamJaxError(f'{name}_token {token!r} of {os.path.join(self.directory, file)} is not '
                                  f'a token of {self.path}')
            return token_id
        for file in _ID_FILES:
            token_id = (configs.get(file) or {}).get(f'{name}_token_id')
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
            if token_id is None:
                continue
            if not isinstance(token_id, int) or not 0 <= token_id < self._size:
                raise BamJaxError(f'{name}_token_id {token_id!r} of {os.path.join(self.directory, file)} is '
                                  f'not an id of {self.path} (0..{self._size - 1})')
            return token_id
        return None

    @property
    def bos_id(self):
        return self._bos_id

    @property
    def eos_id(self):
        return self._eos_id

    @property
    def start_id(self):
        """The id in front of every document: the BOS, or the EOS when there is none (Qwen)."""
        return self._bos_id if self._bos_id is not None else self._eos_id

    @property
    def pad_id(self):
        return self._pad_id

    @property
    def unk_id(self):
        return self._unk_id

    @property
    def _base_vocab_size(self):
        """One more than the largest id of the model's vocabulary and the added tokens."""
        return self._size

    def _encode(self, s):
        if isinstance(s, bytes):
            s = s.decode('utf-8')
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s):
        """A scalar string tensor -> int32 [n]."""
        if s.shape.rank not in (None, 0):
            raise ValueError(f'HFTokenizerVocabulary.encode_tf takes a scalar string, got shape {s.shape}')

        def encode(text):  # a 0-d object array holding bytes
            return np.asarray(self._encode(np.asarray(text).item()), np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids):
        """int [..., n] -> string [...]: each row decoded through its first EOS.

        seqio's decode_tf has put pad_id after the first EOS; decoding through that EOS drops
        them, which matters when the pad id is an ordinary token (no pad token: id 0)."""
        def decode(array):
            rows = np.reshape(array, (int(np.prod(array.shape[:-1])), array.shape[-1]))
            texts = [self.decode(row.tolist()).encode('utf-8') for row in rows]
            return np.array(texts, dtype=object).reshape(array.shape[:-1])

        texts = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        texts.set_shape(ids.shape[:-1])
        return texts

    def __eq__(self, other):
        return isinstance(other, HFTokenizerVocabulary) and self.path == other.path

    def __hash__(self):
        return hash(('HFTokenizerVocabulary', self.path))

    def __repr__(self):
        return f'HFTokenizerVocabulary({self.directory!r})'
