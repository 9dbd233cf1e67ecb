"""Prepared token files and the training stream over them, against plain Python references: the
windows and their documents, the rows built token by token, the permutation, the mixture's
schedule, O(1) seeking, and processes that split every batch into disjoint parts."""

import time

import numpy as np
import pytest

from bam_jax.data.token_files import Changed, Part, PartWriter, Split, token_dtype
from bam_jax.data.token_stream import FIELDS, Schedule, TokenStream, permute
from bam_jax.errors import BamJaxError

EOS, START = 1, 0


def write_split(tmp_path, name, documents, parts=3, vocab_size=300):
    """`documents` (lists of ids, EOS not included) written as `parts` parts of one split."""
    dtype = token_dtype(vocab_size)
    bounds = np.linspace(0, len(documents), parts + 1).astype(int)
    opened = []
    for i in range(parts):
        writer = PartWriter(tmp_path / f'{name}-{i}', dtype)
        for doc in documents[bounds[i]:bounds[i + 1]]:
            writer.add(list(doc) + [EOS])
        writer.close()
        opened.append(Part(tmp_path / f'{name}-{i}', dtype))
    return Split(opened)


def random_documents(seed, count, longest=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 259, rng.integers(1, longest)).tolist() for _ in range(count)]


def reference_rows(documents, seq_len):
    """Every window of the split, row by row, as a plain loop over the documents' tokens."""
    stream = [(token, d, i) for d, doc in enumerate(documents) for i, token in enumerate(doc + [EOS])]
    rows = []
    for start in range(0, len(stream), seq_len):
        window = stream[start:start + seq_len]
        row = {field: [0] * seq_len for field in FIELDS}
        segment, previous_doc, segment_start = 0, None, 0
        for t, (token, doc, _) in enumerate(window):
            if doc != previous_doc:
                segment, previous_doc, segment_start = segment + 1, doc, t
                row['inputs'][t] = START
            else:
                row['inputs'][t] = window[t - 1][0]
            row['targets'][t], row['segment_ids'][t] = token, segment
            row['positions'][t], row['loss_weights'][t] = t - segment_start, 1.0
        rows.append(row)
    return rows


def test_windows_read_the_documents_back_across_parts(tmp_path):
    documents = random_documents(0, 30)
    split = write_split(tmp_path, 'train', documents, parts=4)
    flat = [t for doc in documents for t in doc + [EOS]]
    doc_starts = np.cumsum([0] + [len(doc) + 1 for doc in documents])[:-1]
    assert split.tokens == len(flat) and split.documents == len(documents)
    rng = np.random.default_rng(1)
    for _ in range(200):
        start, stop = sorted(rng.integers(0, len(flat) + 1, 2).tolist())
        ids, starts = split.window(start, stop)
        assert ids.tolist() == flat[start:stop]
        expected = sorted({0} | {int(s) - start for s in doc_starts if start < s < stop}) if stop > start else [0]
        assert starts.tolist() == expected


def test_token_dtype_and_out_of_range_ids(tmp_path):
    assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    writer = PartWriter(tmp_path / 'p', token_dtype(300))
    with pytest.raises(BamJaxError, match='outside'):
        writer.add([70000])


def test_permutation_is_a_bijection_that_depends_on_its_key():
    for n in (1, 2, 3, 7, 64, 100, 1000, 4097):
        values = permute(np.arange(n), n, key=12345)
        assert sorted(values.tolist()) == list(range(n))
        assert permute(np.arange(n)[::-1], n, 12345).tolist() == values[::-1].tolist()  # pointwise
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert (a != b).mean() > 0.9 and abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.1


@pytest.mark.parametrize('rates, counts', [({'a': 1, 'b': 1, 'c': 1, 'd': 1}, (1, 1, 1, 1)),
                                           ({'a': 0.5, 'b': 0.3, 'c': 0.2}, (5, 3, 2)),
                                           ({'a': 1 / 3, 'b': 2 / 3}, (1, 2)),
                                           ({'a': 0.0, 'b': 1.0}, (0, 1))])
def test_schedule_gives_each_domain_its_rate_and_counts_its_reads(rates, counts):
    schedule = Schedule.from_rates(rates)
    assert schedule.counts == counts
    domains, occurrences = schedule.rows(np.arange(10 * schedule.period + 3))
    seen = [0] * len(counts)
    for d, k in zip(domains.tolist(), occurrences.tolist()):  # each domain's reads numbered 0, 1, 2, ...
        assert k == seen[d]
        seen[d] += 1
    for d, c in enumerate(counts):  # exact over every period, and never more than a row off within one
        assert int(np.sum(domains[:10 * schedule.period] == d)) == 10 * c
        for j in range(1, 2 * schedule.period):
            assert abs(int(np.sum(domains[:j] == d)) - j * c / schedule.period) < 1


def test_schedule_refuses_rates_that_mean_nothing():
    for rates in ({}, {'a': -1, 'b': 2}, {'a': 0}):
        with pytest.raises(BamJaxError, match='rates'):
            Schedule.from_rates(rates)


def test_one_epoch_of_rows_is_every_window_once_in_a_shuffled_order(tmp_path):
    documents = random_documents(2, 60)
    seq_len = 16
    split = write_split(tmp_path, 'train', documents)
    expected = reference_rows(documents, seq_len)
    stream = TokenStream([split], Schedule.from_rates({'code': 1}), batch_size=len(expected), seq_len=seq_len,
                         seed=7, start_id=START)
    batch = next(stream)
    got = [{field: batch[field][i].tolist() for field in FIELDS} for i in range(len(expected))]
    order = stream.instances_of(0, np.arange(len(expected))).tolist()
    assert sorted(order) == list(range(len(expected))) and order != list(range(len(expected)))
    assert got == [expected[k] for k in order]
    second = next(stream)  # the next epoch: the same windows in another order
    assert sorted(map(tuple, second['targets'].tolist())) == sorted(map(tuple, batch['targets'].tolist()))
    assert second['targets'].tolist() != batch['targets'].tolist()


def test_a_stream_started_at_a_step_equals_one_that_read_up_to_it(tmp_path):
    splits = [write_split(tmp_path, name, random_documents(seed, 25)) for seed, name in enumerate('ab')]
    schedule = Schedule.from_rates({'a': 0.75, 'b': 0.25})
    fresh = TokenStream(splits, schedule, batch_size=4, seq_len=8, seed=3, start_id=START)
    batches = [next(fresh) for _ in range(12)]
    resumed = TokenStream(splits, schedule, batch_size=4, seq_len=8, seed=3, start_id=START, step=9)
    for expected in batches[9:]:
        got = next(resumed)
        assert all(np.array_equal(got[f], expected[f]) for f in FIELDS)
    start = time.perf_counter()
    far = TokenStream(splits, schedule, batch_size=4, seq_len=8, seed=3, start_id=START, step=1_000_000)
    next(far)
    assert time.perf_counter() - start < 1.0  # no replay: the position is the step


def test_processes_read_disjoint_rows_that_make_up_the_one_process_batch(tmp_path):
    splits = [write_split(tmp_path, name, random_documents(seed + 10, 40)) for seed, name in enumerate('abc')]
    schedule = Schedule.from_rates({'a': 0.5, 'b': 0.25, 'c': 0.25})
    whole = TokenStream(splits, schedule, batch_size=8, seq_len=12, seed=0, start_id=START, step=5)
    parts = [TokenStream(splits, schedule, batch_size=8, seq_len=12, seed=0, start_id=START, step=5,
                         process_index=p, process_count=4) for p in range(4)]
    for _ in range(3):
        expected, got = next(whole), [next(part) for part in parts]
        for field in FIELDS:
            assert np.array_equal(np.concatenate([g[field] for g in got]), expected[field])
    with pytest.raises(BamJaxError, match='not divisible'):
        TokenStream(splits, schedule, batch_size=6, seq_len=12, seed=0, start_id=START, process_count=4)


def test_an_empty_domain_is_refused(tmp_path):
    empty = Split([])
    with pytest.raises(BamJaxError, match='no training tokens in law'):
        TokenStream([empty], Schedule.from_rates({'law': 1}), batch_size=2, seq_len=8, seed=0, start_id=START)


def test_an_open_part_reads_what_it_opened_when_the_domain_is_prepared_again(tmp_path):
    documents = random_documents(20, 30)
    split = write_split(tmp_path, 'old', documents, parts=1)
    before = split.window(0, split.tokens)[0].tolist()
    replacement = write_split(tmp_path, 'new', random_documents(21, 10), parts=1)
    for suffix in ('.bin', '.ends.npy'):  # published over it, as prepare.py publishes: a rename
        (tmp_path / f'new-0{suffix}').rename(tmp_path / f'old-0{suffix}')
    assert split.window(0, split.tokens)[0].tolist() == before
    assert Part(tmp_path / 'old-0', np.uint16).tokens == replacement.tokens
    with pytest.raises(Changed, match='does not match'):
        Part(tmp_path / 'old-0', np.uint16, tokens=split.tokens)
