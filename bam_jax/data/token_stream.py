"""Training batches from prepared token files: bounded memory, any step reachable at once.

A domain's training split (token_files.Split) is cut into windows of `seq_len` consecutive tokens,
its instances: window k holds tokens [k * seq_len, (k + 1) * seq_len), the last one padded. A
document that crosses a window's end goes on in the next window, as a segment of its own there
(the packing of Megatron and OLMo: no padding between documents). In every row:

    targets       int32    the window's tokens (0 after the split's end)
    inputs        int32    targets shifted right within each document segment, the vocabulary's
                           start id at each segment's start
    segment_ids   int32    1, 2, ... per document segment of the row; 0 on padding
    positions     int32    position within the segment
    loss_weights  float32  1 on tokens, 0 on padding

The global stream's row j (batch j // batch_size) reads the domain that the mixture's Schedule
gives it, and that domain's next instance in a shuffled order: occurrence k of the domain reads
instance permute(k mod n, n, key of (seed, domain, epoch k // n)). Each epoch is thus a global
shuffle of the domain's instances, and nothing about row j depends on any row before it: a
stream starts at any step in the same time, its position is the step alone, and process p of P
reads its own rows [p * B/P, (p + 1) * B/P) of every global batch of B rows, disjoint from the
other processes' and the same whatever P is.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import hashlib
import math

import numpy as np

from bam_jax.data.token_files import Split
from bam_jax.errors import BamJaxError

FIELDS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_weights')
_ROUNDS = 4
_MAX_PERIOD = 1000  # rows over which a mixture's rates are exact


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of x ^ key: uint64 -> well-spread uint64 (wrapping arithmetic)."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(index, n: int, key: int) -> np.ndarray:
    """A pseudo-random permutation of [0, n), evaluated at `index` (an int array), in O(1) memory:
    a Feistel network over the smallest even number of bits that holds n - 1, walked again until
    it lands in [0, n) (each step is a bijection, so the walk is one too)."""
    index = np.asarray(index, np.uint64)
    if n < 1 or np.any(index >= n):
        raise ValueError(f'indices outside [0, {n})')
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _mix(np.arange(_ROUNDS, dtype=np.uint64), np.uint64(key & (1 << 64) - 1))

    def feistel(x):
        left, right = x >> np.uint64(half), x & mask
        for round_key in keys:
            left, right = right, left ^ (_mix(right, round_key) & mask)
        return (left << np.uint64(half)) | right

    out = index.copy()
    todo = np.ones(out.shape, bool)
    while todo.any():
        out[todo] = feistel(out[todo])
        todo = out >= n
    return out.astype(np.int64)


def stream_key(seed: int, domain: str, epoch: int) -> int:
    """The permutation key of one domain's epoch: stable across runs, machines and mixtures."""
    return int.from_bytes(hashlib.sha256(f'{seed}/{domain}/{epoch}'.encode()).digest()[:8], 'little')


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which domain each row of the global stream reads: over every `period` rows, domain d gets
    exactly counts[d], spread evenly (smooth weighted round robin), so every global batch holds
    the mixture's rates as closely as its rows allow.

    rows(j) -> (domain index, occurrence): row j reads its domain's occurrence-th instance."""
    domains: tuple[str, ...]
    counts: tuple[int, ...]

    @classmethod
    def from_rates(cls, rates: dict[str, float]) -> Schedule:
        """Rates as exact fractions of the smallest common period (4 for four equal rates), or
        apportioned over _MAX_PERIOD rows (largest remainder) when no period that short is exact."""
        if not rates or any(r < 0 for r in rates.values()) or sum(rates.values()) <= 0:
            raise BamJaxError(f'mixture rates must be >= 0 and not all 0, got {rates}')
        total = sum(rates.values())
        shares = [fractions.Fraction(r / total).limit_denominator(_MAX_PERIOD) for r in rates.values()]
        period = math.lcm(*(s.denominator for s in shares))
        if period <= _MAX_PERIOD and sum(shares) == 1:
            counts = [int(s * period) for s in shares]
        else:
            period, exact = _MAX_PERIOD, [r / total * _MAX_PERIOD for r in rates.values()]
            counts = [int(x) for x in exact]
            for d in sorted(range(len(exact)), key=lambda d: counts[d] - exact[d])[:period - sum(counts)]:
                counts[d] += 1
        return cls(tuple(rates), tuple(counts))

    @property
    def period(self) -> int:
        return sum(self.counts)

    @functools.cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        """(the domain of each row of a period [period], each domain's count before it [period, D])."""
        current, order = [0] * len(self.counts), []
        for _ in range(self.period):
            current = [c + w for c, w in zip(current, self.counts)]
            d = max(range(len(current)), key=lambda i: (current[i], -i))
            current[d] -= self.period
            order.append(d)
        order = np.asarray(order, np.int64)
        before = np.cumsum(np.eye(len(self.counts), dtype=np.int64)[order], axis=0) - np.eye(
            len(self.counts), dtype=np.int64)[order]
        return order, before

    def rows(self, j) -> tuple[np.ndarray, np.ndarray]:
        order, before = self._table
        j = np.asarray(j, np.int64)
        cycle, r = np.divmod(j, self.period)
        domain = order[r]
        return domain, cycle * np.asarray(self.counts, np.int64)[domain] + before[r, domain]


def pack_windows(windows: list[tuple[np.ndarray, np.ndarray]], seq_len: int, start_id: int) -> dict[str, np.ndarray]:
    """Rows [len(windows), seq_len] from windows' ids and their documents' starts (Split.window)."""
    rows = len(windows)
    first = np.zeros((rows, seq_len), bool)
    targets = np.zeros((rows, seq_len), np.int32)
    lengths = np.zeros((rows, 1), np.int64)
    for r, (ids, starts) in enumerate(windows):
        targets[r, :len(ids)], first[r, starts], lengths[r] = ids, True, len(ids)
    column = np.arange(seq_len)
    tokens = column < lengths
    segment = np.where(tokens, np.cumsum(first, axis=1), 0).astype(np.int32)
    inputs = np.where(first, start_id, np.roll(targets, 1, axis=1))
    segment_start = np.maximum.accumulate(np.where(first, column, 0), axis=1)
    return {'inputs': np.where(tokens, inputs, 0).astype(np.int32), 'targets': targets, 'segment_ids': segment,
            'positions': np.where(tokens, column - segment_start, 0).astype(np.int32),
            'loss_weights': tokens.astype(np.float32)}


class TokenStream:
    """This process's rows of every global training batch, from any step on.

    splits: each domain's training split, in the schedule's order. `next(stream)` is a dict of
    FIELDS, each [batch_size / process_count, seq_len]; `stream.step` is the position (the number
    of global batches read), all a checkpoint needs to resume it exactly.
    """

    def __init__(self, splits: list[Split], schedule: Schedule, batch_size: int, seq_len: int, seed: int,
                 start_id: int, process_index: int = 0, process_count: int = 1, step: int = 0):
        if batch_size % process_count:
            raise BamJaxError(f'batch size {batch_size} is not divisible by the {process_count} processes')
        if not 0 <= process_index < process_count:
            raise BamJaxError(f'process_index {process_index} is not in [0, {process_count})')
        empty = [name for name, split in zip(schedule.domains, splits) if not split.tokens]
        if empty:
            raise BamJaxError(f'no training tokens in {", ".join(empty)}')
        self.splits, self.schedule, self.seq_len, self.seed, self.start_id = splits, schedule, seq_len, seed, start_id
        self.batch_size, self.step = batch_size, step
        rows = batch_size // process_count
        self._rows = np.arange(process_index * rows, (process_index + 1) * rows)
        self.instances = [math.ceil(split.tokens / seq_len) for split in splits]

    def instances_of(self, domain: int, occurrences: np.ndarray) -> np.ndarray:
        """Which windows of `domain` its occurrences (its reads, numbered from 0) take."""
        n = self.instances[domain]
        epochs, k = np.divmod(occurrences, n)
        out = np.empty_like(k)
        for epoch in np.unique(epochs).tolist():
            here = epochs == epoch
            out[here] = permute(k[here], n, stream_key(self.seed, self.schedule.domains[domain], epoch))
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        domains, occurrences = self.schedule.rows(step * self.batch_size + self._rows)
        windows = np.empty_like(occurrences)
        for d in np.unique(domains).tolist():
            windows[domains == d] = self.instances_of(d, occurrences[domains == d])
        reads = []
        for d, k in zip(domains.tolist(), windows.tolist()):
            split, start = self.splits[d], k * self.seq_len
            reads.append(split.window(start, min(start + self.seq_len, split.tokens)))
        return pack_windows(reads, self.seq_len, self.start_id)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.step)
        self.step += 1
        return batch
