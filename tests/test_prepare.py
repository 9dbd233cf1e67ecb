"""`bam-jax prepare-data`: raw files of every format to prepared token files. Checked against the
inputs themselves (every distinct document decodes back exactly), references.split_documents
(the same split), the tokenizers library (the same ids), and the files left behind by bad inputs and
by a run killed mid-way (none that look prepared)."""

import dataclasses
import gzip
import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bam_jax.data import DataConfig, corpora, prepare, similarity, text_domain
from bam_jax.data.prepare import MANIFEST, SeenHashes, document_hash, ensure_prepared, open_split, prepare_domain
from bam_jax.errors import BamJaxError

from helpers import REPO, assert_one_line_error, cli_env, run_cli
from references import split_documents

EOS = 1


def decoded(split):
    """The documents of a prepared byte-vocabulary split, as texts."""
    ids, starts = split.window(0, split.tokens)
    bounds = list(starts) + [len(ids)]
    texts = []
    for a, b in zip(bounds, bounds[1:]):
        doc = ids[a:b].tolist()
        assert doc[-1] == EOS and EOS not in doc[:-1]
        texts.append(bytes(t - 3 for t in doc[:-1]).decode('utf-8'))
    return texts


def write_inputs(directory, documents):
    """The documents spread over every input format; returns the paths pattern."""
    directory.mkdir()
    chunks = [documents[i::5] for i in range(5)]
    (directory / 'a.jsonl').write_text(''.join(json.dumps({'text': t, 'id': i}) + '\n'
                                               for i, t in enumerate(chunks[0])))
    with gzip.open(directory / 'b.jsonl.gz', 'wt') as f:
        f.writelines(json.dumps({'text': t}) + '\n' for t in chunks[1])
    (directory / 'c.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(
        ''.join(json.dumps({'text': t}) + '\n' for t in chunks[2]).encode()))
    pq.write_table(pa.table({'text': chunks[3], 'n': list(range(len(chunks[3])))}), directory / 'd.parquet')
    for i, text in enumerate(chunks[4]):
        (directory / f'e{i}.txt').write_text(text)
    return [str(directory / '*')]


def config_for(tmp_path, paths, **settings):
    return DataConfig(user_domains=(text_domain('notes', paths),), data_dir=str(tmp_path / 'prepared'), **settings)


def prepared_dir(config, domain='notes'):
    return pathlib.Path(config.data_dir) / prepare.prepared_name(config, domain)


def split_of(config, split, domain='notes'):
    return open_split(config.data_dir, prepare.prepared_name(config, domain), split)


def corpus_texts(seed, count):
    rng = np.random.default_rng(seed)
    words = ['alpha', 'beta', 'gamma', 'delta', 'é', 'λόγος', '数据', 'x = 1;', '\t', '\n']
    return [f'{seed}.{i}: ' + ' '.join(rng.choice(words, rng.integers(1, 30))) for i in range(count)]


def test_every_distinct_document_of_every_format_decodes_back_in_its_split(tmp_path):
    texts = corpus_texts(0, 200)
    texts += [texts[3].upper(), '  ' + texts[7], ' \n\t ']  # duplicates once normalised, a blank one
    config = config_for(tmp_path, write_inputs(tmp_path / 'raw', texts), validation_fraction=0.2)
    record = prepare_domain(config, 'notes', progress=False)
    train, validation = (decoded(split_of(config, s)) for s in ('train', 'validation'))
    reference = split_documents([(str(i), t) for i, t in enumerate(texts) if t.strip()], 0.2)
    assert sorted(map(corpora.normalise, train)) == sorted(corpora.normalise(d.text) for d in reference.train)
    assert sorted(map(corpora.normalise, validation)) == sorted(corpora.normalise(d.text) for d in reference.validation)
    assert set(train + validation) <= set(texts)  # each kept exactly as read
    nonblank = [t for t in texts if t.strip()]  # blank documents are dropped as they are read
    assert record.documents_read == len(nonblank)
    assert record.duplicates == len(nonblank) - len(set(map(corpora.normalise, nonblank)))
    manifest = json.loads((prepared_dir(config) / MANIFEST).read_text())
    assert manifest['vocabulary'] == {'kind': 'bytes', 'vocab_size': 259, 'eos_id': 1}
    assert sorted(i['path'].rsplit('/', 1)[1] for i in manifest['inputs'])[:4] == [
        'a.jsonl', 'b.jsonl.gz', 'c.jsonl.zst', 'd.parquet']


def test_a_small_domain_lends_its_smallest_hashes_to_validation(tmp_path):
    texts = corpus_texts(1, 12)
    config = config_for(tmp_path, write_inputs(tmp_path / 'raw', texts), validation_fraction=0.0)
    prepare_domain(config, 'notes', progress=False)
    validation = decoded(split_of(config, 'validation'))
    smallest = sorted(set(texts), key=document_hash)[:prepare.MIN_VALIDATION_DOCUMENTS]
    assert sorted(validation) == sorted(smallest)


def test_hashes_are_the_corpora_content_hash_and_the_seen_set_is_exact():
    text = 'Some  Text\n'
    assert document_hash(text) == int(corpora.content_hash(text)[:16], 16)
    seen, values = SeenHashes(buffer=7), np.random.default_rng(0).integers(0, 2**63, 100).tolist()
    assert all(seen.add(v) for v in values) and not any(seen.add(v) for v in values) and len(seen) == 100


def test_hugging_face_tokenizer_ids_are_the_tokenizers_own(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    texts = corpus_texts(2, 300)
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=['<unk>', '</s>'],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / 'tok').mkdir()
    tokenizer.save(str(tmp_path / 'tok' / 'tokenizer.json'))
    (tmp_path / 'tok' / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '</s>'}))
    config = config_for(tmp_path, write_inputs(tmp_path / 'raw', texts), tokenizer_path=str(tmp_path / 'tok'))
    prepare_domain(config, 'notes', progress=False)
    split = split_of(config, 'train')
    ids, starts = split.window(0, split.tokens)
    eos = tokenizer.token_to_id('</s>')
    documents = [ids[a:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(ids)])]
    expected = {tuple(tokenizer.encode(t, add_special_tokens=False).ids + [eos]) for t in texts}
    assert {tuple(d) for d in documents} <= expected and len(documents) > 200


@pytest.mark.parametrize('name, content, message', [
    ('bad.jsonl', b'{"text": "fine"}\n{"text": broken\n', r'bad\.jsonl:2: bad JSON'),
    ('bad.jsonl', b'{"text": "fine"}\n{"body": "x"}\n', r"bad\.jsonl:2: no 'text' field"),
    ('bad.jsonl', b'{"text": "fine"}\n{"text": "\xff\xfe"}\n', r'bad\.jsonl:2: not UTF-8'),
    ('bad.txt', b'\xff\xfe\x00 binary', r'bad\.txt: not UTF-8'),
    ('bad.parquet', None, r"bad\.parquet: no 'text' column \(columns: body\)"),
    ('bad.jsonl.gz', b'not gzip at all', r'bad\.jsonl\.gz: cannot read'),
])
def test_a_bad_input_names_its_file_and_line_and_keeps_what_was_prepared(tmp_path, name, content, message):
    raw = tmp_path / 'raw'
    raw.mkdir()
    (raw / 'good.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in corpus_texts(3, 20)))
    good = config_for(tmp_path, [str(raw / 'good.jsonl')])
    prepare_domain(good, 'notes', progress=False)
    manifest = (prepared_dir(good) / MANIFEST).read_text()
    if content is None:
        pq.write_table(pa.table({'body': ['a', 'b']}), raw / name)
    else:
        (raw / name).write_bytes(content)
    everything = config_for(tmp_path, [str(raw / '*')])
    with pytest.raises(BamJaxError, match=message):
        prepare_domain(everything, 'notes', progress=False)
    assert (prepared_dir(good) / MANIFEST).read_text() == manifest
    assert [p.name for p in (tmp_path / 'prepared').iterdir()] == [prepared_dir(good).name]  # no staging left


def test_the_command_prints_its_table_or_one_error_line(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    (raw / 'a.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in corpus_texts(5, 40)))
    gin_file = tmp_path / 'notes.gin'
    gin_file.write_text(f"DataConfig.user_domains = [@notes/text_domain()]\nnotes/text_domain.name = 'notes'\n"
                        f"notes/text_domain.paths = ['{raw}/*']\nDataConfig.data_dir = '{tmp_path}/prepared'\n")
    done = run_cli('prepare-data', f'--gin_file={gin_file}', '--domains=notes,math',
                   '--gin.DataConfig.math_documents=50')
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:3]}
    assert rows['notes'][1] == '40' and rows['math'][1] == '50'
    math = DataConfig(data_dir=str(tmp_path / 'prepared'), math_documents=50)
    assert json.loads((prepared_dir(math, 'math') / MANIFEST).read_text())['settings']['math_documents'] == 50
    assert 'wrote notes-' in done.stdout and prepared_dir(math, 'math').name in done.stdout
    (raw / 'b.jsonl').write_text('{"text": 1}\n')
    assert_one_line_error(run_cli('prepare-data', f'--gin_file={gin_file}', '--domains=notes'),
                          "b.jsonl:1: 'text' is not a string")
    assert_one_line_error(run_cli('prepare-data', f'--gin_file={gin_file}', '--domains=nope'),
                          'unknown domains nope')


def test_a_killed_preparation_publishes_nothing_and_a_rerun_completes(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    rng = np.random.default_rng(6)
    with open(raw / 'big.jsonl', 'w') as f:  # enough to still be running a moment after it starts
        for i in range(60_000):
            f.write(json.dumps({'text': f'{i} ' + 'word ' * int(rng.integers(10, 200))}) + '\n')
    gin_file = tmp_path / 'notes.gin'
    gin_file.write_text(f"DataConfig.user_domains = [@notes/text_domain()]\nnotes/text_domain.name = 'notes'\n"
                        f"notes/text_domain.paths = ['{raw}/*']\nDataConfig.data_dir = '{tmp_path}/prepared'\n")
    args = [sys.executable, '-m', 'bam_jax.cli', 'prepare-data', f'--gin_file={gin_file}', '--domains=notes']
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    config = config_for(tmp_path, [f'{raw}/*'])
    staging = tmp_path / 'prepared' / f'.{prepared_dir(config).name}.prepare-tmp'
    deadline = time.monotonic() + 120
    while not (staging / 'train').exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not prepared_dir(config).exists()  # nothing that looks prepared
    done = subprocess.run(args, cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not staging.exists()
    assert json.loads((prepared_dir(config) / MANIFEST).read_text())['documents_read'] == 60_000


def test_skip_bad_counts_what_it_skipped(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    good = corpus_texts(4, 30)
    (raw / 'a.jsonl').write_bytes(b''.join(json.dumps({'text': t}).encode() + b'\n' for t in good[:15])
                                  + b'{oops\n' + b'{"text": "\xff"}\n')
    (raw / 'b.txt').write_bytes(b'\xff\xfe')
    (raw / 'c.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in good[15:]))
    config = config_for(tmp_path, [str(raw / '*')])
    with pytest.raises(BamJaxError, match=r'a\.jsonl:16: bad JSON'):
        prepare_domain(config, 'notes', progress=False)
    assert not prepared_dir(config).exists()
    record = prepare_domain(config, 'notes', skip_bad=True, progress=False)
    assert len(record.skipped) == 3 and 'a.jsonl:17: not UTF-8' in record.skipped[1]
    kept = decoded(split_of(config, 'train')) + decoded(
        split_of(config, 'validation'))
    assert sorted(kept) == sorted(set(good))


def test_an_empty_domain_or_no_files_are_refused(tmp_path):
    (tmp_path / 'empty.jsonl').write_text('\n\n')
    with pytest.raises(BamJaxError, match='no training documents'):
        prepare_domain(config_for(tmp_path, [str(tmp_path / 'empty.jsonl')]), 'notes', progress=False)
    with pytest.raises(BamJaxError, match="domain 'notes': no files match"):
        prepare_domain(config_for(tmp_path, [str(tmp_path / 'none*.jsonl')]), 'notes', progress=False)


def test_a_builtin_domain_is_prepared_on_first_use_once_for_each_setting(tmp_path):
    config = DataConfig(data_dir=str(tmp_path / 'prepared'), math_documents=40)
    first = ensure_prepared(config, 'math')
    assert first['settings'] == {'validation_fraction': 0.05, 'math_documents': 40}
    assert ensure_prepared(config, 'math') == first  # read, not prepared again
    changed = ensure_prepared(dataclasses.replace(config, math_documents=60), 'math')
    assert changed['documents_read'] == 60 and changed['settings']['math_documents'] == 60
    assert ensure_prepared(config, 'math') == first  # each setting has its own, kept side by side


def test_a_large_or_changed_user_domain_is_refused_with_the_command(tmp_path, monkeypatch):
    raw = tmp_path / 'raw'
    raw.mkdir()
    (raw / 'a.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in corpus_texts(7, 30)))
    config = config_for(tmp_path, [str(raw / '*')])
    assert ensure_prepared(config, 'notes')['documents_read'] == 30  # small and local: prepared on use
    monkeypatch.setattr(prepare, 'PREPARE_ON_USE_BYTES', 10)
    assert ensure_prepared(config, 'notes')['documents_read'] == 30  # current: read as it is
    with open(raw / 'a.jsonl', 'a') as f:
        f.write(json.dumps({'text': 'one more'}) + '\n')
    with pytest.raises(BamJaxError, match="domain 'notes' was prepared from files that have changed since .*"
                                          'run bam-jax prepare-data --gin_file=... --domains=notes'):
        ensure_prepared(config, 'notes')
    with pytest.raises(BamJaxError, match="domain 'notes' is not prepared with these settings"):
        ensure_prepared(dataclasses.replace(config, validation_fraction=0.5), 'notes')
    prepare_domain(config, 'notes', progress=False)
    assert ensure_prepared(config, 'notes')['documents_read'] == 31


def test_processes_that_need_a_domain_at_once_prepare_it_once(tmp_path, monkeypatch):
    config = DataConfig(data_dir=str(tmp_path / 'prepared'), math_documents=300)
    calls = []
    original = prepare.prepare_domain

    def counted(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)  # the others arrive while it works
        return original(*args, **kwargs)

    monkeypatch.setattr(prepare, 'prepare_domain', counted)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_prepared(config, 'math'))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 3 and all(r == results[0] for r in results)


def test_the_similarity_variant_orders_each_group_of_the_training_split(tmp_path):
    paths = write_inputs(tmp_path / 'raw', corpus_texts(8, 90))
    plain = config_for(tmp_path, paths)
    similar = dataclasses.replace(plain, similarity_batching=True, similarity_group_documents=25)
    prepare_domain(plain, 'notes', progress=False)
    record = ensure_prepared(similar, 'notes')
    assert record['settings']['similarity_group_documents'] == 25
    assert prepare.prepared_name(similar, 'notes') != prepare.prepared_name(plain, 'notes')
    plain_train = decoded(split_of(plain, 'train'))
    similar_train = decoded(split_of(similar, 'train'))
    # The validation split is large enough, so the candidates held back for it (the smallest
    # hashes) all train, last, in both; the others are the same groups, each group reordered.
    assert len(split_of(plain, 'validation').parts[0].ends) >= prepare.MIN_VALIDATION_DOCUMENTS
    ordered, held = plain_train[:-prepare.MIN_VALIDATION_DOCUMENTS], plain_train[-prepare.MIN_VALIDATION_DOCUMENTS:]
    expected = []
    for lo in range(0, len(ordered), 25):
        group = ordered[lo:lo + 25]
        expected += [group[i] for i in similarity.similarity_order(group, shard_size=25)]
    assert similar_train == expected + held and similar_train != plain_train
    assert decoded(split_of(similar, 'validation')) == decoded(
        split_of(plain, 'validation'))
    assert ensure_prepared(plain, 'notes')['settings'] == prepare.domain_settings(plain, 'notes')  # both kept


def test_sentencepiece_ids_are_the_models_own(tmp_path):
    import sentencepiece as spm  # seqio's dependency
    texts = corpus_texts(9, 200)
    (tmp_path / 'train.txt').write_text('\n'.join(texts))
    spm.SentencePieceTrainer.train(input=str(tmp_path / 'train.txt'), model_prefix=str(tmp_path / 'm'),
                                   vocab_size=300, model_type='bpe', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    config = config_for(tmp_path, write_inputs(tmp_path / 'raw', texts), spm_path=str(tmp_path / 'm.model'))
    record = prepare_domain(config, 'notes', progress=False)
    assert record.vocabulary['kind'] == 'spm' and record.vocabulary['vocab_size'] == 300
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / 'm.model'))
    expected = {tuple(processor.encode(t) + [1]) for t in texts}
    split = split_of(config, 'train')
    ids, starts = split.window(0, split.tokens)
    documents = {tuple(ids[a:b].tolist()) for a, b in zip(starts, [*starts[1:], len(ids)])}
    assert documents <= expected and len(documents) > 150
