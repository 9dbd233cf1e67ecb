"""The resume table: the data work of a run resumed at a large position (default batch 100,000 of
8 × 1,024 tokens, the seed mixture), by replay (the fallback for a checkpoint without data
state, and how every resume worked before the state was saved) against a restore of the saved
stream state, next to a fresh start. Both resumes must give the same next batch.
"""

from __future__ import annotations

import time

import numpy as np

POSITION, BATCH, SEQ_LEN = 100_000, 8, 1024


def _first_batch(**kwargs) -> tuple[dict, float, object]:
    from bam_jax import data
    start = time.perf_counter()
    stream = data.train_batches(data.DataConfig(source='seed'), BATCH, SEQ_LEN, seed=0, **kwargs)
    batch = next(stream)
    return batch, time.perf_counter() - start, stream


def run(position: int = POSITION) -> dict:
    _first_batch()  # registers the tasks and warms TensorFlow, for every row alike
    _, fresh, _ = _first_batch()
    _, replay, stream = _first_batch(start_batch=position)
    state = stream.save()
    expected = next(stream)
    got, restore, _ = _first_batch(start_batch=position + 1, saved_state=state)
    same = all(np.array_equal(got[k], expected[k]) for k in expected)
    return {'position': position, 'batch': BATCH, 'seq_len': SEQ_LEN, 'fresh_s': fresh, 'replay_s': replay,
            'restore_s': restore, 'state_bytes': sum(len(v) for v in state.values()), 'same_batch': same}


def print_table(result: dict) -> None:
    print(f'\nresume at batch {result["position"]:,} ({result["batch"]} x {result["seq_len"]} tokens, seed mixture): '
          'seconds from building the stream to its first batch')
    print(f'{"start":<28}{"seconds":>10}')
    print(f'{"fresh (batch 0)":<28}{result["fresh_s"]:>10.2f}')
    print(f'{"replay to the position":<28}{result["replay_s"]:>10.2f}')
    print(f'{"restore the saved state":<28}{result["restore_s"]:>10.2f}')
    print(f'saved state: {result["state_bytes"] / 2**20:.1f} MiB; restored batch equals the replayed stream\'s: '
          f'{result["same_batch"]}')
