"""Similarity-based batching: TF-IDF, neighbour search, chaining, and the
seqio training split under DataConfig.similarity_batching.

References are computed here: brute-force cosine in numpy, TF-IDF by hand,
chaining in plain Python, corpus texts from the reference split (references.py).
"""

import dataclasses
import math
import string

import numpy as np
import pytest
from scipy import sparse

from bam_jax import data
from bam_jax.data import prepare, similarity
from bam_jax.errors import BamJaxError

from references import builtin_split

EOS = 1


def _words(rng, count, length=7):
    return [''.join(rng.choice(list(string.ascii_lowercase), length)) for _ in range(count)]


def _texts(rng, count, vocabulary, words=40):
    return [' '.join(rng.choice(vocabulary, words)) for _ in range(count)]


def _reference_neighbours(vectors, k):
    """Brute force: every pair's dot product, sorted by (-similarity, index)."""
    sims = np.asarray(vectors @ vectors.T, np.float64)
    n = len(sims)
    indices = [sorted((j for j in range(n) if j != i), key=lambda j: (-sims[i, j], j))[:k] for i in range(n)]
    return np.array(indices, np.int64).reshape(n, min(k, n - 1)), sims


def _reference_chain(neighbours):
    order, used = [], set()
    for start in range(len(neighbours)):
        current = start
        while current is not None and current not in used:
            used.add(current)
            order.append(current)
            current = next((j for j in neighbours[current] if j >= 0 and j not in used), None)
    return order


# ---- TF-IDF -------------------------------------------------------------

def test_tfidf_matches_a_hand_computation():
    texts = ['The cat sat.', 'the CAT, cat', 'a dog', '']
    matrix = similarity.TfidfEmbedder().embed(texts)
    assert sparse.issparse(matrix) and matrix.shape == (4, 2 ** 18)
    # n = 4; df: the 2, cat 2, sat 1, a 1, dog 1; idf = ln((1 + n) / (1 + df)) + 1.
    common, rare = math.log(5 / 3) + 1, math.log(5 / 2) + 1
    raw = [{'the': common, 'cat': common, 'sat': rare},
           {'the': common, 'cat': (1 + math.log(2)) * common},
           {'a': rare, 'dog': rare},
           {}]
    expected = []
    for weights in raw:
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        expected.append({word: w / norm for word, w in weights.items()})
    dense = matrix.toarray()
    for row, weights in zip(dense, expected):
        np.testing.assert_allclose(sorted(row[row != 0]), sorted(weights.values()), rtol=1e-12)
    gram = dense @ dense.T
    for i in range(4):
        for j in range(4):
            dot = sum(w * expected[j].get(word, 0.0) for word, w in expected[i].items())
            assert gram[i, j] == pytest.approx(dot, abs=1e-12)
    assert gram[0, 1] == pytest.approx(
        (common * common + common * (1 + math.log(2)) * common)
        / math.sqrt(2 * common ** 2 + rare ** 2) / (common * math.sqrt(1 + (1 + math.log(2)) ** 2)))


def test_tfidf_hashes_into_a_fixed_width_and_is_stable():
    texts = ['alpha beta gamma ' * 3, 'beta delta', 'epsilon']
    small = similarity.TfidfEmbedder(dims=16).embed(texts)
    assert small.shape == (3, 16)
    np.testing.assert_allclose(np.sqrt(small.multiply(small).sum(axis=1)), 1.0)
    again = similarity.TfidfEmbedder(dims=16).embed(texts)
    np.testing.assert_array_equal(small.toarray(), again.toarray())


# ---- nearest neighbours ---------------------------------------------------

@pytest.mark.parametrize('block', [1, 3, 7, 20, 100])
@pytest.mark.parametrize('k', [1, 5, 19, 40])
def test_nearest_neighbours_match_brute_force(block, k):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    expected, sims = _reference_neighbours(vectors, k)
    for given in (vectors, sparse.csr_matrix(vectors)):
        indices, values = similarity.nearest_neighbours(given, k, block=block)
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_allclose(values, np.take_along_axis(sims, expected, axis=1), atol=1e-12)


@pytest.mark.parametrize('block', [1, 4, 30])
def test_nearest_neighbours_break_ties_by_index(block):
    # Small integer vectors: many exactly equal products, including zero rows.
    rng = np.random.default_rng(1)
    vectors = rng.integers(0, 3, size=(30, 4)).astype(np.float64)
    vectors[[5, 17]] = 0
    for k in (1, 3, 10):
        expected, _ = _reference_neighbours(vectors, k)
        for given in (vectors, sparse.csr_matrix(vectors)):
            indices, _ = similarity.nearest_neighbours(given, k, block=block)
            np.testing.assert_array_equal(indices, expected)


def test_nearest_neighbours_of_tiny_inputs():
    indices, values = similarity.nearest_neighbours(np.ones((1, 3)), 5)
    assert indices.shape == values.shape == (1, 0)
    indices, _ = similarity.nearest_neighbours(np.eye(2), 5)
    np.testing.assert_array_equal(indices, [[1], [0]])


# ---- chaining ---------------------------------------------------------------

def test_chain_follows_the_most_similar_unused_neighbour():
    neighbours = [[2, 1], [0, 2], [1, 0], [-1, -1], [3, 0]]
    # 0 -> 2 -> 1, whose neighbours are used: restart at 3 (no neighbours), then 4.
    assert similarity.chain(neighbours) == [0, 2, 1, 3, 4]


@pytest.mark.parametrize('n', [1, 2, 9, 64])
def test_chain_matches_the_reference_on_random_tables(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        table = rng.integers(-1, n, size=(n, 4))
        order = similarity.chain(table)
        assert sorted(order) == list(range(n))
        assert order == _reference_chain(table.tolist())


@pytest.mark.parametrize('n', [1, 2, 17, 60, 203])
@pytest.mark.parametrize('shard_size', [1, 16, 50, 10_000])
def test_similarity_order_is_a_permutation(n, shard_size):
    rng = np.random.default_rng(n)
    texts = _texts(rng, n, _words(rng, 30), words=12)
    texts[0] = ''  # empty texts have no neighbours but still appear
    order = similarity.similarity_order(texts, shard_size=shard_size, k=5)
    assert sorted(order) == list(range(n))
    # Shards are ordered one after another: the order never leaves a shard.
    for position, index in enumerate(order):
        assert index // shard_size == position // shard_size


def test_topics_are_chained_together():
    rng = np.random.default_rng(7)
    common = ['the', 'and', 'of', 'to', 'in']
    topics, texts = [], []
    for topic in range(6):
        vocabulary = _words(rng, 30) + common
        for text in _texts(rng, 10, vocabulary):
            topics.append(topic)
            texts.append(text)
    shuffle = rng.permutation(len(texts))
    topics = [topics[i] for i in shuffle]
    texts = [texts[i] for i in shuffle]

    def same_topic_pairs(order):
        return sum(topics[a] == topics[b] for a, b in zip(order, order[1:])) / (len(order) - 1)

    baseline = same_topic_pairs(list(range(len(texts))))
    order = similarity.similarity_order(texts, k=12)
    assert sorted(order) == list(range(60))
    # 54 of 59 pairs is perfect (six runs of ten); a shuffle gives about 1/6.
    assert baseline < 0.35
    assert same_topic_pairs(order) >= 52 / 59
    runs = [sum(1 for a, b in zip([None] + order, order) if topics[b] == t and (a is None or topics[a] != t))
            for t in range(6)]
    assert max(runs) <= 2


def test_near_duplicates_end_up_adjacent():
    rng = np.random.default_rng(3)
    vocabulary = _words(rng, 400)
    texts = _texts(rng, 40, vocabulary, words=50)
    copy = texts[11].split()
    for position in (4, 20, 33):
        copy[position] = 'changed'
    texts.insert(27, ' '.join(copy))
    for shard_size in (10_000, 30):
        order = similarity.similarity_order(texts, shard_size=shard_size, k=8)
        assert abs(order.index(11) - order.index(27)) == 1


# ---- the training split under DataConfig.similarity_batching ------------------------------
# (the order itself, group by group: tests/test_prepare.py)

def _segments(batch):
    out = []
    for row, seg in zip(batch['targets'], batch['segment_ids']):
        for s in np.unique(seg[seg > 0]):
            out.append(bytes(0 if t == EOS else t - 3 for t in row[seg == s].tolist()))
    return out


def test_similarity_batching_reads_its_own_variant_of_the_training_split(tmp_path):
    plain = data.DataConfig(source='law', eval_batches=1, data_dir=str(tmp_path))
    similar = dataclasses.replace(plain, similarity_batching=True, similarity_group_documents=64)
    first = next(data.train_batches(plain, batch_size=4, seq_len=256, seed=0))
    batch = next(data.train_batches(similar, batch_size=4, seq_len=256, seed=0))
    assert batch['targets'].shape == (4, 256) and not np.array_equal(batch['targets'], first['targets'])
    hay = b'\0'.join(d.text.encode() for d in builtin_split('law').train)
    for segment in _segments(batch):  # a segment is (part of) one training document
        assert segment.rstrip(b'\0') in hay
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith('.')) == sorted(
        prepare.prepared_name(config, 'law') for config in (plain, similar))
    for a, b in zip(data.eval_batches(plain, 'law', 2, 64), data.eval_batches(similar, 'law', 2, 64)):
        np.testing.assert_array_equal(a['targets'], b['targets'])  # validation is unchanged


def test_group_size_must_be_positive():
    with pytest.raises(BamJaxError, match='similarity_group_documents'):
        data.DataConfig(similarity_batching=True, similarity_group_documents=0)
