"""Training and validation batches from prepared domains (bam_jax/data/batches.py), against the
corpora and the input files themselves: the source's domains and rates, rows that hold text of
their own domain, and validation windows cut here from the documents' bytes."""

import dataclasses
import json

import numpy as np
import pytest

from bam_jax.data import DataConfig, corpora, text_domain
from bam_jax.data.batches import eval_batches, source_rates, train_batches
from bam_jax.data.prepare import document_hash
from bam_jax.errors import BamJaxError

from references import builtin_split

EOS = 1


@pytest.mark.parametrize('source, rates', [
    ('seed', dict.fromkeys(corpora.BUILTIN_DOMAINS, 1.0)),
    ('mix', dict.fromkeys(('general', 'code', 'law', 'math'), 1.0)),
    ('code', {'code': 1.0}), ('code, law', {'code': 1.0, 'law': 1.0}), ('code:3,law:1', {'code': 3.0, 'law': 1.0})])
def test_the_source_names_domains_and_rates(source, rates):
    assert source_rates(DataConfig(source=source)) == rates


@pytest.mark.parametrize('source, message', [('', 'not set'), ('code,poetry', 'unknown domains poetry'),
                                             ('code:x', "bad rate 'x' for 'code'")])
def test_a_bad_source_is_one_clear_error(source, message):
    with pytest.raises(BamJaxError, match=message):
        source_rates(DataConfig(source=source))


def _segments(batch):
    """Every row's segments as (row, bytes without EOS)."""
    out = []
    for r, (row, seg) in enumerate(zip(batch['targets'], batch['segment_ids'])):
        for s in np.unique(seg[seg > 0]):
            tokens = [t for t in row[seg == s].tolist() if t != EOS]
            out.append((r, bytes(t - 3 for t in tokens)))
    return out


def test_training_rows_hold_text_of_their_own_domain_in_the_mixture_order(tmp_path):
    config = DataConfig(source='math,law', math_documents=200, data_dir=str(tmp_path / 'prepared'))
    stream = train_batches(config, batch_size=4, seq_len=64, seed=0)
    haystacks = {d: b'\0'.join(doc.text.encode() for doc in builtin_split(d, math_documents=200).train)
                 for d in ('math', 'law')}
    for _ in range(3):
        batch = next(stream)
        assert {k: v.shape for k, v in batch.items()} == dict.fromkeys(batch, (4, 64))
        assert batch['inputs'].dtype == np.int32 and batch['loss_weights'].dtype == np.float32
        for row, text in _segments(batch):  # the schedule alternates: math, law, math, law
            assert text in haystacks['math' if row % 2 == 0 else 'law']


def test_validation_windows_are_the_documents_bytes_cut_in_order_and_strided_under_the_cap(tmp_path):
    texts = [f'validation document {i}: ' + 'abc ' * (i % 17) for i in range(120)]
    (tmp_path / 'notes.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    config = DataConfig(user_domains=(text_domain('notes', [str(tmp_path / 'notes.jsonl')]),),
                        validation_fraction=0.5, data_dir=str(tmp_path / 'prepared'), eval_batches=0)
    kept = [t for t in texts if document_hash(t) < 0.5 * 2.0 ** 64]
    tokens = [b for t in kept for b in [c + 3 for c in t.encode()] + [EOS]]
    windows = [tokens[i:i + 32] for i in range(0, len(tokens), 32)]
    every = eval_batches(config, 'notes', batch_size=4, seq_len=32)
    rows = [row[row_w > 0].tolist() for batch in every for row, row_w in zip(batch['targets'], batch['loss_weights'])]
    assert rows[:len(windows)] == windows and not any(rows[len(windows):])  # then empty padding rows
    capped = eval_batches(dataclasses.replace(config, eval_batches=2), 'notes', 4, 32)
    assert len(capped) == 2
    rows = [row[row_w > 0].tolist() for batch in capped for row, row_w in zip(batch['targets'], batch['loss_weights'])]
    assert rows == windows[::len(windows) // 8][:8]
