"""Prepared token files: one split of a domain as parts, each a flat file of token ids and an index.

  PART.bin        every document's token ids followed by its EOS, one document after another:
                  little-endian uint16 when the vocabulary has at most 65,536 ids, else uint32
  PART.ends.npy   int64 [documents]: where each document ends in PART.bin (exclusive, EOS included)

A training row is a window of consecutive tokens of the split (token_stream.py), so reading one
is one positioned read of a few kB, whatever the corpus size: no file is mapped or held in memory
but the index, which holds 8 bytes per document. The format is the one of Megatron's and OLMo's
indexed datasets and nanoGPT's token files, chosen over ArrayRecord records read through Grain on
this machine's measurement (`python -m bam_jax.benchmarks --tables data` repeats it): on 100M uint16 tokens in
100,000 documents, reading documents in a random order ran at about 4e8 tokens/s here against
9e7 for ArrayRecord's batched random reads, and writing was about 3x faster; and it needs no
library beyond numpy, so every machine that trains can read it.
"""

from __future__ import annotations

import os

import numpy as np

from bam_jax import storage
from bam_jax.errors import BamJaxError

TOKENS, ENDS = '.bin', '.ends.npy'


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype('<u2') if vocab_size <= 1 << 16 else np.dtype('<u4')


class PartWriter:
    """Writes one part, a document at a time: `add(ids)` appends ids (EOS included), `close()`
    writes the index and returns {'tokens': n, 'documents': m}. The files appear under `prefix`;
    publishing them whole is the caller's (a staging directory renamed at the end)."""

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix, self.dtype = storage.path(prefix), np.dtype(dtype)
        self._file = storage.path(f'{self.prefix}{TOKENS}').open('wb')
        self._ends: list[int] = []
        self.tokens = 0

    def add(self, ids) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise BamJaxError(f'token ids outside [0, {np.iinfo(self.dtype).max}] for {self.dtype.name}')
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += ids.size
        self._ends.append(self.tokens)

    def close(self) -> dict:
        self._file.close()
        with storage.path(f'{self.prefix}{ENDS}').open('wb') as f:
            np.save(f, np.asarray(self._ends, np.int64))
        return {'tokens': self.tokens, 'documents': len(self._ends)}


class Changed(BamJaxError):
    """A part's files do not agree with each other or with the manifest: the domain was prepared
    again while they were being opened (prepare.open_split opens it again)."""


class Part:
    """One part, read by positioned reads; `ends` is its index.

    A local part keeps its token file open: a domain prepared again (a new directory renamed over
    the old one) does not change what an open part reads."""

    def __init__(self, prefix: str | os.PathLike, dtype, tokens: int | None = None):
        self.prefix, self.dtype = str(prefix), np.dtype(dtype)
        path = f'{self.prefix}{TOKENS}'
        if not storage.path(path).is_file() or not storage.path(f'{self.prefix}{ENDS}').is_file():
            raise BamJaxError(f'prepared token files missing: {path} and {self.prefix}{ENDS}')
        self._fd = None if storage.is_uri(path) else os.open(path, os.O_RDONLY)
        with storage.path(f'{self.prefix}{ENDS}').open('rb') as f:
            self.ends = np.load(f)
        size = os.fstat(self._fd).st_size if self._fd is not None else storage.path(path).stat().length
        if size != self.tokens * self.dtype.itemsize or tokens not in (None, self.tokens):
            self.close()
            raise Changed(f'{path} does not match its index: prepare the domain again')

    @property
    def tokens(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of this part."""
        size = self.dtype.itemsize
        if self._fd is None:
            with storage.path(f'{self.prefix}{TOKENS}').open('rb') as f:
                f.seek(start * size)
                data = f.read((stop - start) * size)
        else:
            data = os.pread(self._fd, (stop - start) * size, start * size)
        if len(data) != (stop - start) * size:
            raise BamJaxError(f'{self.prefix}{TOKENS} is shorter than its index says: prepare the domain again')
        return np.frombuffer(data, self.dtype)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


class Split:
    """The parts of one split read as one sequence of tokens.

    window(start, stop) -> (ids [stop - start] as int32, starts): `starts` are the offsets in the
    window where a document begins (0 always counts as one: a window may open inside a document).
    """

    def __init__(self, parts: list[Part]):
        self.parts = [part for part in parts if part.tokens]
        self._offsets = np.cumsum([0] + [part.tokens for part in self.parts])

    @property
    def tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def documents(self) -> int:
        return sum(len(part.ends) for part in self.parts)

    def window(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= start <= stop <= self.tokens:
            raise ValueError(f'window [{start}, {stop}) outside the split\'s {self.tokens} tokens')
        ids, starts = [], [np.zeros(1, np.int64)]
        first = int(np.searchsorted(self._offsets, start, side='right')) - 1
        for i in range(first, len(self.parts)):
            base = int(self._offsets[i])
            if base >= stop:
                break
            part, lo, hi = self.parts[i], max(start - base, 0), min(stop - base, self.parts[i].tokens)
            ids.append(part.read(lo, hi))
            if base > start:  # every part begins with a document
                starts.append(np.array([base - start]))
            ends = part.ends[np.searchsorted(part.ends, lo, side='right'):np.searchsorted(part.ends, hi)]
            starts.append(ends + base - start)  # a document ends where the next begins
        starts = np.unique(np.concatenate(starts))
        return np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32), starts
