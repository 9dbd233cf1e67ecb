"""Hugging Face tokenizers as vocabularies, each against an independent reference: the
`tokenizers` library itself (encode, decode), the tokenizer's own ids cut into chunks (the packed
batches), seqio.ByteVocabulary (the byte tokenizer, read back by transformers)."""

import collections
import json
import random
import re
import shutil

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tokenizers
from tokenizers import decoders, pre_tokenizers, trainers

from bam_jax import data
from bam_jax.data import corpora
from bam_jax.data.hf_tokenizer import HFTokenizerVocabulary
from bam_jax.errors import BamJaxError

from references import builtin_split

SPECIALS = ['<pad>', '<s>', '</s>', '<unk>']  # ids 0..3 of the trained tokenizer
PAD, BOS, EOS, UNK = range(4)


def _samples(domain, split='validation', count=4, chars=3000):
    """The first `count` documents of a built-in domain's split, cut at `chars` characters."""
    documents = getattr(builtin_split(domain), split)
    return [d.text[:chars] for d in documents[:count]]


def _write_json(path, value):
    path.write_text(json.dumps(value))


@pytest.fixture(scope='module')
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (512 ids) trained on a few training documents of every built-in
    domain, saved as a model directory whose tokenizer_config.json names BOS <s> and EOS </s>."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [t for d in corpora.BUILTIN_DOMAINS for t in _samples(d, 'train', count=8, chars=4000)]
    tokenizer.train_from_iterator(texts, trainer)
    directory = tmp_path_factory.mktemp('bpe')
    tokenizer.save(str(directory / 'tokenizer.json'))
    _write_json(directory / 'tokenizer_config.json', {
        'bos_token': '<s>', 'eos_token': {'content': '</s>', 'special': True}, 'pad_token': '<pad>',
        'unk_token': '<unk>'})
    return directory


def _reference(directory):
    return tokenizers.Tokenizer.from_file(str(directory / 'tokenizer.json'))


def _variant(bpe_dir, tmp_path, **files):
    """A copy of the trained tokenizer.json with other configuration files next to it."""
    shutil.copy(bpe_dir / 'tokenizer.json', tmp_path / 'tokenizer.json')
    for name, value in files.items():
        _write_json(tmp_path / f'{name}.json', value)
    return tmp_path


def test_encode_and_decode_equal_the_tokenizers_library_on_every_corpus(bpe_dir):
    reference = _reference(bpe_dir)
    vocab = HFTokenizerVocabulary(bpe_dir)
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id) == (BOS, EOS, PAD, UNK)
    assert vocab.vocab_size == reference.get_vocab_size() == 512
    assert data.start_id(vocab) == BOS
    # The path of tokenizer.json names the same vocabulary.
    assert HFTokenizerVocabulary(bpe_dir / 'tokenizer.json') == vocab
    texts = [t for d in corpora.BUILTIN_DOMAINS for t in _samples(d)]
    assert len(texts) == 4 * len(corpora.BUILTIN_DOMAINS)
    texts += ['', 'naïve café — ✓ 日本語 𝄞', 'a <s> b </s> c']
    tf_ids = list(tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf).as_numpy_iterator())
    for text, from_tf in zip(texts, tf_ids):
        ids = reference.encode(text, add_special_tokens=False).ids
        assert vocab.encode(text) == ids
        assert from_tf.dtype == np.int32 and from_tf.tolist() == ids
        assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
        # seqio's rule: decode through the first EOS (here: the text '</s>')
        assert vocab.decode(ids) == reference.decode(ids[:ids.index(EOS)] if EOS in ids else ids)
    merged = texts[0]  # a real tokenizer: fewer tokens than bytes
    assert len(vocab.encode(merged)) < len(merged.encode())
    # decode_tf, on a padded batch of rows ending in EOS: each row as decode reads it.
    rows = [vocab.encode(t[:200]) + [EOS] for t in texts[:5]]
    batch = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for row, ids in zip(batch, rows):
        row[:len(ids)] = ids
    decoded = vocab.decode_tf(tf.constant(batch)).numpy()
    assert [t.decode() for t in decoded] == [reference.decode(ids[:-1]) for ids in rows]


def _segments(batches):
    """(inputs, targets) of every packed segment, as lists."""
    out = []
    for batch in batches:
        for inputs, targets, segments in zip(batch['inputs'], batch['targets'], batch['segment_ids']):
            for s in np.unique(segments[segments > 0]):
                out.append((inputs[segments == s].tolist(), targets[segments == s].tolist()))
    return out


def _documents(batches, eos):
    """The documents of batches that hold a whole split, window after window: their tokens in
    order, cut after every EOS."""
    tokens = [t for batch in batches for row, w in zip(batch['targets'], batch['loss_weights'])
              for t in row[w > 0].tolist()]
    ends = [i + 1 for i, t in enumerate(tokens) if t == eos]
    return collections.Counter(tuple(tokens[a:b]) for a, b in zip([0, *ends], ends))


MATH_DOCUMENTS = 40


def _config(path):
    return data.DataConfig(source='math', tokenizer_path=str(path), math_documents=MATH_DOCUMENTS,
                           eval_batches=0, eval_domains=('math',))


def _check_packed(config, reference, start, eos, seq_len=64, train=True):
    """The validation windows hold every validation document as the tokenizer's ids + EOS, each
    exactly once, and every segment's inputs are `start` + its targets shifted right; with
    `train`, the segments of a training batch start with `start` too."""
    batches = data.eval_batches(config, 'math', batch_size=4, seq_len=seq_len)
    segments = _segments(batches)
    texts = [d.text for d in builtin_split('math', math_documents=MATH_DOCUMENTS).validation]
    assert texts
    assert _documents(batches, eos) == collections.Counter(
        tuple(reference.encode(t, add_special_tokens=False).ids + [eos]) for t in texts)
    for inputs, targets in segments:  # every segment (document or chunk) starts with `start`
        assert inputs == [start] + targets[:-1]
    if not train:
        return
    batch = next(data.train_batches(config, batch_size=2, seq_len=seq_len, seed=0))
    first = (batch['positions'] == 0) & (batch['segment_ids'] > 0)
    assert first.any() and np.all(batch['inputs'][first] == start)
    for inputs, targets in _segments([batch]):
        assert inputs == [start] + targets[:-1]


def test_packed_batches_hold_the_tokenizer_ids_and_start_with_bos(bpe_dir):
    _check_packed(_config(bpe_dir), _reference(bpe_dir), start=BOS, eos=EOS)


def test_a_tokenizer_without_bos_starts_documents_with_eos(bpe_dir, tmp_path):
    # bos_token null (as in Qwen): no BOS, even though config.json has a bos_token_id.
    directory = _variant(bpe_dir, tmp_path, tokenizer_config={'bos_token': None, 'eos_token': '</s>'},
                         config={'bos_token_id': BOS, 'eos_token_id': EOS})
    vocab = HFTokenizerVocabulary(directory)
    assert vocab.bos_id is None and data.start_id(vocab) == EOS and vocab.pad_id == 0
    _check_packed(_config(directory), _reference(directory), start=EOS, eos=EOS, train=False)


def test_ids_from_generation_config_and_config(bpe_dir, tmp_path):
    """No tokens in tokenizer_config.json: generation_config.json, then config.json; a list of EOS
    ids gives its first."""
    directory = _variant(bpe_dir, tmp_path, tokenizer_config={},
                         generation_config={'eos_token_id': [UNK, EOS]},
                         config={'bos_token_id': BOS, 'eos_token_id': PAD})
    vocab = HFTokenizerVocabulary(directory)
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id) == (BOS, UNK, UNK)  # unk: the BPE model's
    assert data.start_id(vocab) == BOS


def test_byte_and_sentencepiece_start_with_zero(tmp_path):
    assert data.start_id(seqio.ByteVocabulary()) == 0
    assert data.start_id(data.vocabulary(data.DataConfig())) == 0
    import sentencepiece as spm  # seqio's dependency
    (tmp_path / 'text.txt').write_text('\n'.join(_samples('math', 'train', count=20)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / 'text.txt'), model_prefix=str(tmp_path / 'm'),
                                   vocab_size=100, pad_id=0, eos_id=1, unk_id=2, bos_id=3, minloglevel=2)
    vocab = data.vocabulary(data.DataConfig(spm_path=str(tmp_path / 'm.model')))
    assert vocab.bos_id == 3 and data.start_id(vocab) == 0  # unchanged: seqio's 0, not the model's BOS


def _byte_cases():
    """Texts (non-ASCII, special-token text, corpus samples) and id lists: random bytes biased to
    the lead and continuation bytes of UTF-8 (invalid sequences included), special ids, ids past
    the vocabulary."""
    texts = ['', 'hello', 'naïve café — ✓ 日本語 𝄞 \ufffd', 'a</s>b<pad>c<unk>', '\x00\n\t  end ']
    texts += [t[:500] for d in corpora.BUILTIN_DOMAINS for t in _samples(d, count=1)]
    rng = random.Random(0)
    utf8 = [0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xDF, 0xE0, 0xE1, 0xED, 0xEE,
            0xEF, 0xF0, 0xF3, 0xF4, 0xF5, 0xFF]
    id_lists = [[rng.choice([b + 3 for b in utf8] + [0, 1, 2, 300]) if rng.random() < 0.8 else
                 rng.randrange(0, 259) for _ in range(rng.randrange(12))] for _ in range(400)]
    id_lists += [[0] + list(seqio.ByteVocabulary().encode(t)) + [1] for t in texts]
    return texts, id_lists


def test_byte_tokenizer_through_transformers_equals_the_byte_vocabulary(tmp_path):
    import transformers  # the test extra
    names = data.write_byte_tokenizer(tmp_path)
    assert sorted(names) == sorted(p.name for p in tmp_path.iterdir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    reference = seqio.ByteVocabulary()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id,
            len(tokenizer)) == (0, 1, 0, 2, 259)
    texts, id_lists = _byte_cases()
    for text in texts:
        ids = [0] + list(reference.encode(text))
        assert tokenizer(text)['input_ids'] == ids
        assert tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True) == text
    for ids in id_lists:
        expected = reference.decode(ids)
        assert tokenizer.decode(ids) == expected, ids
        # skip_special_tokens removes EOS before decoding: equal up to the first EOS.
        before_eos = ids[:ids.index(1)] if 1 in ids else ids
        assert tokenizer.decode(before_eos, skip_special_tokens=True) == expected, ids


def test_byte_tokenizer_as_a_vocabulary_equals_the_byte_vocabulary(tmp_path):
    data.write_byte_tokenizer(tmp_path)
    vocab = HFTokenizerVocabulary(tmp_path)
    reference = seqio.ByteVocabulary()
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id, vocab.vocab_size) == (0, 1, 0, 2, 259)
    assert data.start_id(vocab) == 0
    texts, id_lists = _byte_cases()
    for text in texts:
        assert vocab.encode(text) == list(reference.encode(text))
    for ids in id_lists:
        assert vocab.decode(ids) == reference.decode(ids), ids


def test_copy_tokenizer_files(bpe_dir, tmp_path):
    (tmp_path / 'src').mkdir()
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(bpe_dir / name, tmp_path / 'src' / name)
    (tmp_path / 'src' / 'merges.txt').write_text('#version: 0.2\n')
    (tmp_path / 'src' / 'model.safetensors').write_text('not a tokenizer file')
    names = data.copy_tokenizer_files(tmp_path / 'src', tmp_path / 'out')
    assert names == ['tokenizer.json', 'tokenizer_config.json', 'merges.txt']
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / 'out' / name).read_bytes() == (tmp_path / 'src' / name).read_bytes()


def _one_line_error(pattern, make):
    """A BamJaxError whose first line (what the CLI prints; gin adds lines below the message of
    an error raised in a configurable) matches `pattern`."""
    with pytest.raises(BamJaxError) as error:
        make()
    message = str(error.value)
    first = message.splitlines()[0]
    assert re.search(pattern, first), message
    assert '\n' not in message or '\n  In call to configurable' in message, message


def test_bad_input_is_one_line_error(bpe_dir, tmp_path):
    _one_line_error('not found', lambda: data.vocabulary(data.DataConfig(tokenizer_path=str(tmp_path / 'no'))))
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'tokenizer.model').write_bytes(b'')
    _one_line_error('no tokenizer.json.*spm_path', lambda: HFTokenizerVocabulary(tmp_path / 'empty'))
    _one_line_error('not both', lambda: data.DataConfig(spm_path='m.model', tokenizer_path=str(bpe_dir)))
    _one_line_error('not both', lambda: data.vocab.make_vocabulary('m.model', str(bpe_dir)))
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'tokenizer.json').write_text('{"model": ')
    _one_line_error('cannot read', lambda: HFTokenizerVocabulary(bad))
    (tmp_path / 'no_eos').mkdir()
    no_eos = _variant(bpe_dir, tmp_path / 'no_eos', tokenizer_config={'bos_token': '<s>'})
    _one_line_error('no EOS', lambda: HFTokenizerVocabulary(no_eos))
    (no_eos / 'config.json').write_text('{not json')
    _one_line_error('cannot read.*config.json', lambda: HFTokenizerVocabulary(no_eos))
    _write_json(no_eos / 'config.json', {'eos_token_id': 10 ** 6})
    _one_line_error('not an id', lambda: HFTokenizerVocabulary(no_eos))
    _write_json(no_eos / 'tokenizer_config.json', {'eos_token': '<never>'})
    _one_line_error('not a token', lambda: HFTokenizerVocabulary(no_eos))

