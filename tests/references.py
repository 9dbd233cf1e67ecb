"""Plain numpy references (float64), written from the definitions, not from the model code, and the
assertion the numeric tests compare with. Shared by the test files: `from references import ...`
(tests/ has no __init__.py, so pytest puts tests/ itself on sys.path)."""

import dataclasses
import functools
import hashlib

import numpy as np


def close(a, b, *, rtol, atol):
    """assert_allclose in float64. Every test file states its own default tolerances once, as
    `close = functools.partial(references.close, rtol=..., atol=...)`; a call may override them."""
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


def np_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def np_swiglu(x, wi_gate, wi_up, wo):
    """silu(x @ wi_gate) * (x @ wi_up) @ wo, on rows x [..., D]."""
    g = x @ wi_gate
    return (g / (1 + np.exp(-g)) * (x @ wi_up)) @ wo


def np_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, positions, theta):
    """x: [T, N, Dh]; rotate-half with frequencies theta**(-i/half)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-np.arange(half) / half)
    angles = positions[:, None, None].astype(np.float64) * freqs[None, None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_attention(x, wq, wk, wv, wo, positions, segment_ids, theta):
    """One sequence, one attention. x: [T, D]; wq [D, H, Dh]; wk, wv [D, K, Dh]; wo [H, Dh, D].
    Query head h reads K/V head h // (H / K); causal and within its document."""
    length = x.shape[0]
    q = np_rope(np.einsum('td,dhk->thk', x, wq), positions, theta)
    k = np_rope(np.einsum('td,dhk->thk', x, wk), positions, theta)
    v = np.einsum('td,dhk->thk', x, wv)
    group = wq.shape[1] // wk.shape[1]
    allowed = np.zeros((length, length), bool)
    for i in range(length):
        for j in range(i + 1):
            allowed[i, j] = segment_ids[i] == segment_ids[j]
    heads = []
    for h in range(wq.shape[1]):
        kv = h // group
        scores = q[:, h] @ k[:, kv].T / np.sqrt(q.shape[-1])
        scores = np.where(allowed, scores, -np.inf)
        heads.append(np_softmax(scores) @ v[:, kv])
    return np.einsum('thk,hkd->td', np.stack(heads, axis=1), wo)  # heads stacked: [T, H, Dh]


# The split of a domain's documents, from its definition (DESIGN.md, docs/data_preparation.md):
# de-duplicated by the sha256 of the normalised text, a document goes to validation when the first
# 64 bits of that hash, as a fraction of 2**64, fall below the validation fraction; a split with
# fewer than 4 documents (and at most half the domain) takes the next-smallest hashes.

@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class Split:
    train: tuple  # of Document, in id order
    validation: tuple
    documents_read: int


def split_documents(documents, validation_fraction, min_validation=4):
    """The reference split of (id, text) pairs; the copy of a duplicate kept is the smallest id's."""
    distinct = {}
    for doc_id, text in sorted(documents):
        key = hashlib.sha256(' '.join(text.split()).lower().encode('utf-8')).hexdigest()
        distinct.setdefault(key, Document(doc_id, text))
    by_hash = sorted(distinct.items())
    count = sum(1 for h, _ in by_hash if int(h[:16], 16) < validation_fraction * 2.0 ** 64)
    count = max(count, min(min_validation, len(by_hash) // 2))
    return Split(tuple(sorted((d for _, d in by_hash[count:]), key=lambda d: d.id)),
                 tuple(sorted((d for _, d in by_hash[:count]), key=lambda d: d.id)), len(documents))


@functools.cache
def builtin_split(domain, validation_fraction=0.05, math_documents=None, max_file_bytes=None):
    """The reference split of a built-in corpus (corpora.read_documents: its files as read)."""
    from bam_jax.data import corpora

    documents = corpora.read_documents(domain, max_file_bytes or corpora.MAX_FILE_BYTES,
                                       math_documents or corpora.DEFAULT_MATH_DOCUMENTS)
    return split_documents(documents, validation_fraction)
