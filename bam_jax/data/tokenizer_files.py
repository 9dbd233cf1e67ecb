"""Tokenizer files of Hugging Face model directories: the byte vocabulary written as one, and a
model's tokenizer files copied between directories (local or remote). No seqio, no TensorFlow:
the importer, exporter and upcycler use this module.

write_byte_tokenizer writes the tokenizer files of seqio.ByteVocabulary, bam_jax's default, so that
`transformers.AutoTokenizer` reads the models bam_jax trains on bytes.
"""

import json

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

from bam_jax import storage
from bam_jax.errors import BamJaxError

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'vocab.json', 'merges.txt', 'added_tokens.json')
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
