"""Similarity-based document order for training, as in Lory.

Training sequences are built from chains of similar documents: embed the
documents, find each one's nearest neighbours, start from a document and
greedily append its most similar unused neighbour, restarting from the next
unused document when none is left. Sequences cut from such chains hold
related text, which helps experts specialise.

Work is done in shards of `shard_size` documents (embed, search and chain
within a shard; the shards' orders are concatenated), so peak memory depends
on the shard size, not on the corpus size.
"""

import collections
import re
import sys
import zlib

import numpy as np
from scipy import sparse

DEFAULT_SHARD_SIZE = 8192
DEFAULT_NEIGHBOURS = 32
DEFAULT_BLOCK = 256

_TOKEN = re.compile(r'\w+')


class TfidfEmbedder:
    """Word TF-IDF with feature hashing into `dims` columns.

    Tokens are lowercased `\\w+` runs. Hashing (crc32, stable across
    processes) keeps memory independent of the vocabulary; colliding words
    share a column. Weights: tf = 1 + ln(count) (sublinear) or the count;
    idf = ln((1 + n) / (1 + df)) + 1, with document frequencies counted over
    the texts being embedded. Rows are L2-normalised; an empty text gives a
    zero row.
    """

    def __init__(self, dims=2 ** 18, sublinear_tf=True):
        if dims < 1:
            raise ValueError(f'dims must be >= 1, got {dims}')
        self.dims = int(dims)
        self.sublinear_tf = sublinear_tf

    def embed(self, texts):
        """CSR matrix [len(texts), dims] of float64 TF-IDF rows."""
        columns, rows, counts = {}, [], []
        for text in texts:
            counter = collections.Counter(_TOKEN.findall(text.lower()))
            row = []
            for word in counter:
                column = columns.get(word)
                if column is None:
                    column = columns[word] = zlib.crc32(word.encode('utf-8')) % self.dims
                row.append(column)
            rows.append(np.asarray(row, np.int64))
            counts.append(np.fromiter(counter.values(), np.float64, len(counter)))
        n = len(texts)
        lengths = np.array([len(r) for r in rows], np.int64)
        # coo -> csr sums the counts of words that collide within a text.
        matrix = sparse.coo_matrix(
            (np.concatenate(counts) if n else np.zeros(0),
             (np.repeat(np.arange(n), lengths), np.concatenate(rows) if n else np.zeros(0, np.int64))),
            shape=(n, self.dims)).tocsr()
        matrix.sum_duplicates()
        if self.sublinear_tf:
            matrix.data = 1.0 + np.log(matrix.data)
        df = np.bincount(matrix.indices, minlength=self.dims)
        idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        matrix.data *= idf[matrix.indices]
        return normalise_rows(matrix)


def normalise_rows(matrix):
    """CSR matrix with every non-zero row scaled to unit L2 norm."""
    matrix = sparse.csr_matrix(matrix, dtype=np.float64, copy=True)
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    matrix.data /= np.repeat(norms, np.diff(matrix.indptr))
    return matrix


def nearest_neighbours(vectors, k, block=DEFAULT_BLOCK):
    """Top-k neighbours of every row by dot product (cosine for normalised
    rows), itself excluded.

    vectors: numpy array or scipy.sparse matrix [n, d]. Returns (indices,
    similarities), both [n, min(k, n - 1)], most similar first, ties broken
    by the lower index. Rows are compared `block` at a time against all rows,
    so memory is O(block * n).
    """
    if k < 0 or block < 1:
        raise ValueError(f'need k >= 0 and block >= 1, got {k} and {block}')
    n = vectors.shape[0]
    k = max(0, min(int(k), n - 1))
    indices = np.zeros((n, k), np.int64)
    similarities = np.zeros((n, k), np.float64)
    if k == 0:
        return indices, similarities
    if sparse.issparse(vectors):
        vectors = sparse.csr_matrix(vectors)
        # A column set in one row only adds nothing to any pair: dropping it
        # is exact and makes the products much cheaper (rare words, numbers).
        shared = np.bincount(vectors.indices, minlength=vectors.shape[1]) >= 2
        vectors = vectors[:, np.flatnonzero(shared)]
        right = vectors.T.tocsr()  # CSR @ CSR: no conversion per block
    else:
        vectors = np.asarray(vectors, np.float64)
        right = vectors.T
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sims = vectors[lo:hi] @ right
        sims = sims.toarray() if sparse.issparse(sims) else np.array(sims, np.float64)
        sims[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
        # Everything above the k-th largest value, then the lowest-numbered
        # documents equal to it: the first k of a full stable sort, in O(block * n).
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1:k]
        above = sims > kth
        equal = sims == kth
        wanted = k - above.sum(axis=1, keepdims=True)
        keep = above | (equal & (np.cumsum(equal, axis=1) <= wanted))
        top = np.nonzero(keep)[1].reshape(hi - lo, k)
        values = np.take_along_axis(sims, top, axis=1)
        order = np.lexsort((top, -values), axis=1)
        indices[lo:hi] = np.take_along_axis(top, order, axis=1)
        similarities[lo:hi] = np.take_along_axis(values, order, axis=1)
    return indices, similarities


def chain(neighbours):
    """Greedy chaining: a permutation of range(n).

    neighbours: int array [n, k], each row most similar first; -1 marks no
    neighbour. Starts from document 0 and repeatedly appends the first unused
    neighbour of the current document; when none is left, restarts from the
    lowest-numbered unused document.
    """
    neighbours = np.asarray(neighbours, np.int64)
    n = len(neighbours)
    lists = neighbours.tolist()
    used = [False] * n
    order, start = [], 0
    while len(order) < n:
        while used[start]:
            start += 1
        current = start
        while current is not None:
            used[current] = True
            order.append(current)
            current = next((j for j in lists[current] if j >= 0 and not used[j]), None)
    return order


def similarity_order(texts, shard_size=DEFAULT_SHARD_SIZE, k=DEFAULT_NEIGHBOURS,
                     block=DEFAULT_BLOCK, progress=False):
    """Order of `texts` (a permutation of their indices) that chains similar
    texts (TF-IDF cosine similarity), shard by shard. Neighbours with
    similarity <= 0 are never followed: the chain restarts instead.
    `progress` prints a line per shard to stderr.
    """
    if shard_size < 1:
        raise ValueError(f'shard_size must be >= 1, got {shard_size}')
    embedder = TfidfEmbedder()
    texts = list(texts)
    order = []
    shards = range(0, len(texts), shard_size)
    for number, lo in enumerate(shards):
        part = texts[lo:lo + shard_size]
        indices, sims = nearest_neighbours(embedder.embed(part), k, block)
        indices[sims <= 0] = -1
        order.extend(lo + i for i in chain(indices))
        if progress:
            print(f'similarity order: shard {number + 1}/{len(shards)} '
                  f'({len(order)}/{len(texts)} documents)', file=sys.stderr, flush=True)
    return order
