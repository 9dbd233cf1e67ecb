"""Hugging Face tokenizers: read one as a seqio vocabulary, write one for the byte vocabulary.

HFTokenizerVocabulary reads the `tokenizer.json` of a Hugging Face model directory with the
`tokenizers` library (no torch, no transformers). Its BOS and EOS come from the files next to it:
`tokenizer_config.json`, then `special_tokens_map.json` (`bos_token` / `eos_token`: a string, or a
dict with "content"), then `generation_config.json`, then `config.json` (`bos_token_id` /
`eos_token_id`: an int, or a list whose first entry counts).

write_byte_tokenizer writes the tokenizer files of seqio.ByteVocabulary, bam_jax's default, so that
`transformers.AutoTokenizer` reads the models bam_jax trains on bytes.
"""

import json
import os

import numpy as np
import seqio
import tensorflow as tf
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

from bam_jax import storage
from bam_jax.errors import BamJaxError

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'vocab.json', 'merges.txt', 'added_tokens.json')
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


# ---- the byte vocabulary as a Hugging Face tokenizer ---------------------------------------------

_BYTE_SPECIALS = ('<pad>', '</s>', '<unk>')  # ids 0, 1, 2, as in seqio.ByteVocabulary; 0 is the BOS
_BYTES_OFFSET = len(_BYTE_SPECIALS)  # byte b is id b + 3
_EOS_MARK = '\0'  # stands for EOS inside the decoder: never one of the byte characters


def _byte_chars():
    """The character that stands for each byte in a byte-level tokenizer's vocabulary: printable
    Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order (GPT-2's
    convention, which the `tokenizers` ByteLevel pre-tokenizer and decoder use)."""
    printable = set(range(ord('!'), ord('~') + 1)) | set(range(ord('¡'), ord('¬') + 1)) | \
        set(range(ord('®'), ord('ÿ') + 1))
    chars, others = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + others))
            others += 1
    if set(chars) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError('the tokenizers library uses another byte-level alphabet')
    return chars


def _invalid_utf8_pattern(chars):
    """A regex over byte characters that matches each byte outside every well-formed UTF-8 sequence
    (Unicode table 3-7). Those are the bytes Python's decode(errors='ignore') drops, as seqio's
    ByteVocabulary does: UTF-8 synchronises, so a byte inside some well-formed sequence is inside
    the one a left-to-right decoder reads."""
    def span(lo, hi):
        return '[' + ''.join('\\' + chars[b] if chars[b] in '\\^-[]' else chars[b]
                             for b in range(lo, hi + 1)) + ']'

    tail = span(0x80, 0xBF)
    # (lead, second byte): the leads of 2-, 3- and 4-byte sequences and what may follow them.
    two = [(span(0xC2, 0xDF), tail)]
    three = [(span(0xE0, 0xE0), span(0xA0, 0xBF)), (span(0xE1, 0xEC), tail),
             (span(0xED, 0xED), span(0x80, 0x9F)), (span(0xEE, 0xEF), tail)]
    four = [(span(0xF0, 0xF0), span(0x90, 0xBF)), (span(0xF1, 0xF3), tail),
            (span(0xF4, 0xF4), span(0x80, 0x8F))]
    starts_here = [span(0x00, 0x7F)] + [lead + second + tail * (n - 2)
                                        for n, group in ((2, two), (3, three), (4, four))
                                        for lead, second in group]
    # the byte is the k-th (k = 2, 3, 4) of a sequence whose lead is k - 1 bytes back
    inside = [f'(?<={lead}){second}' + tail * (n - 2)
              for n, group in ((2, two), (3, three), (4, four)) for lead, second in group]
    inside += [f'(?<={lead}{second}){tail}' + tail * (n - 3) for n, group in ((3, three), (4, four))
               for lead, second in group]
    inside += [f'(?<={lead}{second}{tail}){tail}' for lead, second in four]
    return f'(?!{"|".join(starts_here + inside)}){span(0x00, 0xFF)}'


def byte_tokenizer():
    """seqio.ByteVocabulary as a `tokenizers.Tokenizer`: ids 0 '<pad>' (also the BOS), 1 '</s>',
    2 '<unk>', byte b -> b + 3.

    Encoding: every byte of the UTF-8 text is one token (a byte-level pre-tokenizer, a BPE model
    without merges); the post-processor puts 0 in front, the start token bam_jax's models read
    first. Decoding drops the special tokens, stops at the first EOS and drops the bytes of invalid
    UTF-8, as ByteVocabulary.decode does.
    """
    chars = _byte_chars()
    vocab = {token: i for i, token in enumerate(_BYTE_SPECIALS)}
    vocab.update({chars[b]: b + _BYTES_OFFSET for b in range(256)})
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                  for t in _BYTE_SPECIALS])
    pad, eos, unk = (Regex('^' + t + '$') for t in _BYTE_SPECIALS)
    # The special tokens reach the decoder when skip_special_tokens is False (transformers'
    # default): pad and unk decode to nothing, EOS cuts the text there. The replacements before
    # Fuse see one token at a time, so the text '</s>' (five byte tokens) is left alone.
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(pad, ''), decoders.Replace(unk, ''), decoders.Replace(eos, _EOS_MARK),
        decoders.Fuse(),
        decoders.Replace(Regex(_EOS_MARK + '[\\s\\S]*'), ''),
        decoders.Replace(Regex(_invalid_utf8_pattern(chars)), ''),
        decoders.ByteLevel(),
    ])
    # A pair reads as one text, as LanguageModel.loglikelihood reads a context and continuation.
    tokenizer.post_processor = processors.TemplateProcessing(
        single='<pad> $A', pair='<pad> $A $B:1', special_tokens=[('<pad>', 0)])
    return tokenizer


def write_byte_tokenizer(out_dir):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json of seqio's
    ByteVocabulary into `out_dir`; returns the file names.

    With them, `transformers.AutoTokenizer.from_pretrained(out_dir)` encodes a text to
    `[0] + ByteVocabulary().encode(text)` (the text of special tokens too: split_special_tokens)
    and decodes ids as ByteVocabulary().decode does. The one difference: with
    skip_special_tokens=True the EOS is removed before the decoder sees it, so ids after an EOS are
    decoded too, where ByteVocabulary stops at the EOS. out_dir may be a URI (gs://...).
    """
    out = storage.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # to_str, as Tokenizer.save writes it, but through epath: save() only writes local files.
    (out / 'tokenizer.json').write_text(byte_tokenizer().to_str(pretty=True), encoding='utf-8')
    special = {'bos_token': '<pad>', 'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '<pad>'}
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', **special, 'split_special_tokens': True,
              'clean_up_tokenization_spaces': False}
    for name, value in (('tokenizer_config.json', config), ('special_tokens_map.json', special)):
        (out / name).write_text(json.dumps(value, indent=2) + '\n', encoding='utf-8')
    return ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json']


def copy_tokenizer_files(src_dir, out_dir):
    """Copy the tokenizer files of a Hugging Face model directory (those of TOKENIZER_FILES that
    exist) into `out_dir`; returns their names. Either directory may be a URI (gs://...)."""
    src, out = storage.path(src_dir), storage.path(out_dir)
    if not src.is_dir():
        raise BamJaxError(f'not a directory: {src_dir}')
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        out.mkdir(parents=True, exist_ok=True)
    for name in names:
        storage.copy_file(src / name, out / name)
    return names
