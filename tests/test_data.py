"""Data package: corpora, the training and validation batches of prepared domains, mixtures.

Each test checks against a reference computed here, independently of the
package (plain Python reads, arithmetic, substring search).
"""

import ast
import collections
import fractions
import glob
import hashlib
import json
import operator
import os
import re

import numpy as np
import pytest

from bam_jax import data
from bam_jax.data import corpora, math_problems, prepare
from bam_jax.errors import BamJaxError

from references import builtin_split, split_documents

KEYS = {'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32,
        'positions': np.int32, 'loss_weights': np.float32}
EOS = 1


def _norm(text):
    return re.sub(r'\s+', ' ', text).strip().lower()


def _segments(batch):
    """Token lists of every packed segment in a batch."""
    out = []
    for row, seg in zip(batch['targets'], batch['segment_ids']):
        for s in np.unique(seg[seg > 0]):
            out.append(row[seg == s].tolist())
    return out


def _as_bytes(tokens):
    """Byte-vocabulary tokens -> bytes; EOS becomes NUL (never in texts)."""
    assert all(t == EOS or 3 <= t < 259 for t in tokens), tokens
    return bytes(0 if t == EOS else t - 3 for t in tokens)


def _haystack(documents):
    return b'\0'.join(d.text.encode() for d in documents) + b'\0'


def _check_batch(batch, batch_size, seq_len):
    assert set(batch) == set(KEYS)
    for key, dtype in KEYS.items():
        assert batch[key].shape == (batch_size, seq_len), key
        assert batch[key].dtype == dtype, key


def test_tensorflow_sees_no_accelerator():
    from bam_jax.data.tf_setup import tf  # (loaded for the SentencePiece and Hugging Face vocabularies)
    assert not tf.config.get_visible_devices('GPU')


@pytest.mark.parametrize('domain', ['general', 'code', 'law', 'math'])
def test_domain_task_yields_text_of_its_domain(domain):
    config = data.DataConfig(source=domain)
    batch = next(data.train_batches(config, batch_size=4, seq_len=96, seed=0))
    _check_batch(batch, 4, 96)
    hay = _haystack(builtin_split(domain).train)
    segments = _segments(batch)
    assert segments
    for tokens in segments:
        chunk = _as_bytes(tokens)
        assert len(chunk) > 0 and chunk in hay
    assert data.source_rates(config) == {domain: 1.0}


def test_math_task_text_is_the_generator_output():
    config = data.DataConfig(source='math', math_documents=50)
    batch = next(data.train_batches(config, batch_size=2, seq_len=512,
                                    seed=3))
    # Documents are worksheets of consecutive problems, regenerated here.
    hay = b'\0'.join(
        '\n\n'.join(math_problems.problem(6 * d + i)
                     for i in range(6)).encode()
        for d in range(50)) + b'\0'
    for tokens in _segments(batch):
        assert _as_bytes(tokens) in hay


@pytest.mark.parametrize('domain', ['general', 'code', 'law', 'math'])
def test_validation_is_disjoint_from_training(domain):
    config = data.DataConfig()
    train = {_norm(t) for t in prepare.split_texts(config, domain, 'train')}
    validation = {_norm(t) for t in prepare.split_texts(config, domain, 'validation')}
    assert len(validation) >= 4
    assert len(validation) < 0.1 * len(train)
    assert not train & validation
    # The split is sha256 of the normalised text: recompute it.
    for text in train:
        digest = hashlib.sha256(text.encode()).hexdigest()
        assert int(digest[:16], 16) >= 0.05 * 2 ** 64


def test_eval_batches_come_from_validation():
    config = data.DataConfig(eval_batches=3)
    batches = data.eval_batches(config, 'code', batch_size=4, seq_len=64)
    assert 1 <= len(batches) <= 3
    hay = _haystack(builtin_split('code').validation)
    for batch in batches:
        _check_batch(batch, 4, 64)
        for tokens in _segments(batch):
            assert _as_bytes(tokens) in hay


def test_law_is_deduplicated():
    paths = glob.glob('/usr/share/common-licenses/*')
    paths += glob.glob('/usr/share/doc/*/copyright')
    texts = {}
    for path in paths:
        real = os.path.realpath(path)
        if os.path.isfile(real) and os.path.getsize(real) <= 200_000:
            with open(real, 'rb') as f:
                raw = f.read()
            try:
                texts[real] = raw.decode('utf-8')
            except UnicodeDecodeError:
                pass
    distinct = {_norm(t) for t in texts.values() if t.strip()}
    config = data.DataConfig()
    kept = [_norm(t) for split in ('train', 'validation') for t in prepare.split_texts(config, 'law', split)]
    assert len(kept) == len(set(kept))
    assert set(kept) == distinct
    manifest = prepare.ensure_prepared(config, 'law')
    assert manifest['documents_read'] == len([t for t in texts.values() if t.strip()])
    assert manifest['duplicates'] == manifest['documents_read'] - len(distinct)


def _short_domain(tmp_path):
    """A user domain of 40 short texts of varied length: they must pack."""
    lines = [f'Short note {i}: ' + 'tide and wind ' * (i % 9)
             for i in range(40)]
    _write(tmp_path / 'short.jsonl',
           '\n'.join(json.dumps({'text': t}) for t in lines))
    return data.text_domain('short', [str(tmp_path / 'short.jsonl')])


@pytest.mark.parametrize('source', ['mix', 'short'])
def test_packing_is_consistent(source, tmp_path):
    config = data.DataConfig(source=source,
                             user_domains=(_short_domain(tmp_path),))
    batches = data.train_batches(config, batch_size=8, seq_len=512, seed=5)
    segment_counts = []
    for _ in range(3):
        batch = next(batches)
        _check_batch(batch, 8, 512)
        for row in range(8):
            seg, pos = batch['segment_ids'][row], batch['positions'][row]
            tgt, inp = batch['targets'][row], batch['inputs'][row]
            real = seg > 0
            np.testing.assert_array_equal(batch['loss_weights'][row], real)
            assert np.all(tgt[~real] == 0) and np.all(pos[~real] == 0)
            # Documents are numbered 1, 2, ... and padding comes last.
            ids = seg[real]
            assert ids[0] == 1 and np.all(np.diff(ids) >= 0)
            assert np.all(np.diff(ids) <= 1) and real.sum() == len(ids)
            assert not np.any(real[int(real.sum()):])
            segment_counts.append(ids.max())
            for t in range(int(real.sum())):
                start = t == 0 or seg[t] != seg[t - 1]
                assert pos[t] == (0 if start else pos[t - 1] + 1)
                assert inp[t] == (0 if start else tgt[t - 1])
    if source == 'short':
        assert min(segment_counts) > 1  # short texts were actually packed


def _assert_same(got, expected):
    for key in KEYS:
        np.testing.assert_array_equal(got[key], expected[key])


def test_a_stream_started_at_a_batch_equals_the_one_that_read_up_to_it():
    config = data.DataConfig(source='seed')
    fresh = data.train_batches(config, batch_size=4, seq_len=64, seed=11)
    first = [next(fresh) for _ in range(7)]
    resumed = data.train_batches(config, batch_size=4, seq_len=64, seed=11, start_batch=4)
    for expected in first[4:]:
        _assert_same(next(resumed), expected)
    other = next(data.train_batches(config, batch_size=4, seq_len=64, seed=12))
    assert not np.array_equal(other['targets'], first[0]['targets'])


def test_processes_read_disjoint_rows_that_make_up_one_batch():
    """Two processes' rows of each step are the one-process batch, and no window is read by both."""
    config = data.DataConfig(source='code')
    single = data.train_batches(config, 4, 64, seed=0)
    procs = [data.train_batches(config, 4, 64, seed=0, process_index=i, process_count=2) for i in range(2)]
    seen = [set(), set()]
    for _ in range(4):
        parts = [next(p) for p in procs]
        _assert_same({k: np.concatenate([p[k] for p in parts]) for k in KEYS}, next(single))
        for i, part in enumerate(parts):
            seen[i] |= {tuple(row) for row in part['targets'].tolist()}
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    with pytest.raises(BamJaxError, match='not divisible by the 2 processes'):
        data.train_batches(config, 5, 64, 0, process_index=0, process_count=2)


def test_mix_takes_a_quarter_from_each_domain():
    """Every batch's rows go general, code, law, math, general, ...: each row's text is its
    domain's training text."""
    hay = {d: _haystack(builtin_split(d).train) for d in data.BUILTIN_DOMAINS}
    batches = data.train_batches(data.DataConfig(source='mix'), batch_size=8, seq_len=256, seed=2)
    for _ in range(5):
        batch = next(batches)
        for row in range(8):
            domain = ('general', 'code', 'law', 'math')[row % 4]
            for tokens in _segments({k: v[row:row + 1] for k, v in batch.items()}):
                assert _as_bytes(tokens) in hay[domain]


def _write(path, text):
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)


def test_user_text_and_jsonl_domains(tmp_path):
    notes = [f'Note {i}: the heron stood on one leg by pond {i * 7}.'
             for i in range(12)]
    for i, text in enumerate(notes):
        _write(tmp_path / f'note{i:02d}.txt', text)
    records = [{'body': f'Record {i}: the otter swam {i * 3} laps.', 'id': i}
               for i in range(10)]
    _write(tmp_path / 'records.jsonl',
           '\n'.join(json.dumps(r) for r in records) + '\n')
    config = data.DataConfig(
        source='notes,records', eval_batches=100,
        user_domains=(data.text_domain('notes', [str(tmp_path / '*.txt')]),
                      data.text_domain('records', [str(tmp_path / '*.jsonl')],
                                       text_key='body')))
    expected = {'notes': notes, 'records': [r['body'] for r in records]}
    batch = next(data.train_batches(config, batch_size=4, seq_len=128,
                                    seed=0))
    allowed = b'\0'.join(t.encode() for ts in expected.values() for t in ts) + b'\0'
    assert all(_as_bytes(s) in allowed for s in _segments(batch))
    for name, texts in expected.items():
        stream = b''.join(_as_bytes(row[w > 0].tolist())
                          for batch in data.eval_batches(config, name, batch_size=2, seq_len=128)
                          for row, w in zip(batch['targets'], batch['loss_weights']))
        train = {d.text for d in split_documents(list(enumerate(texts)), config.validation_fraction).train}
        # All validation documents appear, and only they (a small domain's are its smallest hashes).
        assert stream and sorted(stream.split(b'\0')[:-1]) == sorted(t.encode() for t in texts if t not in train)


def test_missing_or_empty_user_domain_is_reported(tmp_path):
    pattern = str(tmp_path / 'absent' / '*.txt')
    config = data.DataConfig(source='ghost', user_domains=(
        data.text_domain('ghost', [pattern]),))
    with pytest.raises(BamJaxError, match='ghost') as error:
        data.train_batches(config, batch_size=2, seq_len=32, seed=0)
    assert pattern in str(error.value)
    _write(tmp_path / 'blank.txt', '  \n\n ')
    empty = data.DataConfig(source='blank', user_domains=(
        data.text_domain('blank', [str(tmp_path / 'blank.txt')]),))
    with pytest.raises(BamJaxError, match="'blank': no training documents.*blank.txt"):
        data.train_batches(empty, batch_size=2, seq_len=32, seed=0)
    with pytest.raises(BamJaxError, match='reserved'):
        data.text_domain('law', ['x'])


def test_missing_builtin_domain_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, 'LICENSE_ROOT', str(tmp_path / 'licenses'))
    monkeypatch.setattr(corpora, 'DOC_ROOT', str(tmp_path / 'doc'))
    corpora.clear_cache()
    try:
        with pytest.raises(BamJaxError, match="'law'.*licenses"):
            corpora.read_documents('law')
    finally:
        monkeypatch.undo()
        corpora.clear_cache()


def test_sentencepiece_vocabulary(tmp_path):
    import sentencepiece as spm  # seqio's dependency
    text = tmp_path / 'math.txt'
    _write(text, '\n'.join(math_problems.problems(400)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / 'm'), vocab_size=200,
        model_type='bpe', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2)
    config = data.DataConfig(source='math', spm_path=str(tmp_path / 'm.model'))
    vocab = data.vocabulary(config)
    batch = next(data.train_batches(config, batch_size=2, seq_len=64, seed=0))
    assert batch['targets'].max() < vocab.vocab_size
    # SentencePiece normalises whitespace, so compare normalised text.
    decoded = _norm(vocab.decode(_segments(batch)[0]))
    assert decoded and decoded in _norm('\n'.join(
        d.text for d in builtin_split('math').train))
    # Back to bytes in the same process.
    batch = next(data.train_batches(data.DataConfig(source='math'), 2, 64, 0))
    assert data.vocabulary(data.DataConfig()).vocab_size == 259
    _as_bytes(_segments(batch)[0])
    with pytest.raises(BamJaxError, match='not found'):
        data.vocabulary(data.DataConfig(spm_path=str(tmp_path / 'no.model')))


# ---- math generator: determinism and correct worked answers -------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def _evaluate(expression, names=None):
    """Exact value of + - * / arithmetic (names allowed) as a Fraction."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return fractions.Fraction(node.value)
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f'not arithmetic: {expression}')
    return value(ast.parse(expression, mode='eval').body)


def _algebra(expression, names):
    """'-5x + 3y - 2' evaluated at names."""
    return _evaluate(re.sub(r'(\d)([a-z])', r'\1*\2', expression), names)


def _assignments(answer):
    return {k: fractions.Fraction(int(v)) for k, v in
            re.findall(r'([a-z]) = (-?\d+)', answer)}


def _check_answer(question, answer):
    """Solve `question` independently; compare with `answer`. Returns the
    kind of problem recognised."""
    F = fractions.Fraction
    if m := re.fullmatch(r'Compute ([\d +*-]+)\.', question):
        assert int(answer) == _evaluate(m[1])
        return 'integer'
    if m := re.fullmatch(r'Divide (\d+) by (\d+)\.', question):
        quotient, remainder = divmod(int(m[1]), int(m[2]))
        assert answer == f'{quotient} remainder {remainder}'
        return 'divide'
    if m := re.fullmatch(r'Compute (.+) in lowest terms\.', question):
        value = _evaluate(m[1])
        assert answer == (str(value.numerator) if value.denominator == 1
                          else f'{value.numerator}/{value.denominator}')
        return 'fraction'
    if m := re.fullmatch(r'What is (\d+)% of (\d+)\?', question):
        assert F(answer) == F(int(m[1]) * int(m[2]), 100)
        return 'percent_of'
    if m := re.fullmatch(r'A price (?:rises|falls) from (\d+) to (\d+)\. '
                         r'What is the percentage (?:increase|decrease)\?',
                         question):
        old, new = int(m[1]), int(m[2])
        assert F(answer.rstrip('%')) == F(abs(new - old) * 100, old)
        return 'percent_change'
    if m := re.fullmatch(r'Solve for ([a-z]): (.+) = (.+)\.', question):
        names = _assignments(answer)
        assert list(names) == [m[1]]
        assert _algebra(m[2], names) == _algebra(m[3], names)
        return 'linear'
    if m := re.fullmatch(r'Solve the system: (.+) = (-?\d+) and (.+) = '
                         r'(-?\d+)\.', question):
        names = _assignments(answer)
        assert set(names) == {'x', 'y'}
        assert _algebra(m[1], names) == int(m[2])
        assert _algebra(m[3], names) == int(m[4])
        return 'system'
    raise AssertionError(f'unrecognised problem: {question}')


def test_math_generator_is_deterministic():
    texts = math_problems.problems(50)
    assert texts == [math_problems.problem(i) for i in range(50)]
    digest = hashlib.sha256('\n\n'.join(texts).encode()).hexdigest()
    # Pinned: the corpus must be identical on every machine.
    assert digest == ('9d4b6745914dfcd36b8f55da85e364dc'
                      'abc3490a78e07acc0e0f06741d9ce6f2')
    assert len(set(math_problems.problems(400))) > 390


def test_math_worked_answers_are_correct():
    claim = re.compile(r'(?:^|: )([-0-9+*/(). ]+) = '
                       r'(-?\d+(?:\.\d+)?(?:/\d+)?)$')
    kinds, claims = collections.Counter(), 0
    for text in math_problems.problems(600):
        lines = text.split('\n')
        assert lines[0].startswith('Problem: ') and lines[1] == 'Solution:'
        assert lines[-1].startswith('Answer: ')
        kinds[_check_answer(lines[0][9:], lines[-1][8:])] += 1
        for line in lines[2:-1]:
            if m := claim.search(line):
                claims += 1
                assert _evaluate(m[1]) == fractions.Fraction(m[2]), line
    assert len(kinds) == 7 and min(kinds.values()) >= 50
    assert claims > 2000


def test_gin_configures_user_domains(tmp_path):
    import gin
    gin.parse_config(f"""
        DataConfig.source = 'notes'
        DataConfig.eval_domains = ['code', 'notes']
        DataConfig.user_domains = [@notes/text_domain()]
        notes/text_domain.name = 'notes'
        notes/text_domain.paths = ['{tmp_path}/*.txt']
    """)
    config = data.DataConfig()
    assert config.user_domains == (data.DomainSpec(
        'notes', (f'{tmp_path}/*.txt',), 'text'),)
    assert data.eval_domain_names(config) == ('code', 'notes')
    hash(config)


def test_the_byte_vocabulary_is_seqios_without_tensorflow():
    """bam_jax's own ByteVocabulary (no seqio, no TensorFlow to load) against seqio's, on text and
    on ids of every kind: specials, EOS mid-way, ids past the vocabulary, broken UTF-8."""
    import seqio

    ours, theirs = data.vocabulary(data.DataConfig()), seqio.ByteVocabulary()
    assert (ours.vocab_size, ours.pad_id, ours.eos_id, ours.unk_id) == (259, 0, 1, 2) == (
        theirs.vocab_size, theirs.pad_id, theirs.eos_id, theirs.unk_id)
    for text in ['héllo wörld 数据', '', 'a\x00b\n\t', 'x = 1;' * 50]:
        assert ours.encode(text) == list(theirs.encode(text))
    rng = np.random.default_rng(0)
    for _ in range(500):
        ids = rng.integers(0, 300, rng.integers(0, 24)).tolist()
        assert ours.decode(ids) == theirs.decode(ids), ids
