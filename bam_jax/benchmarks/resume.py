"""The resume table: the data work of a run resumed at a large position (default batch 1,000,000
of 8 x 1,024 tokens, the seed mixture) next to a fresh start, from building the stream to its
first batch. A stream's position is the step alone (bam_jax/data/token_stream.py): nothing is
replayed and no state is saved, so both take the same time.
"""

from __future__ import annotations

import time

POSITION, BATCH, SEQ_LEN = 1_000_000, 8, 1024


def _first_batch(start_batch: int = 0) -> float:
    from bam_jax import data
    start = time.perf_counter()
    next(data.train_batches(data.DataConfig(source='seed'), BATCH, SEQ_LEN, seed=0, start_batch=start_batch))
    return time.perf_counter() - start


def run(position: int = POSITION) -> dict:
    _first_batch()  # prepares the built-in domains where they are not yet, for every row alike
    return {'position': position, 'batch': BATCH, 'seq_len': SEQ_LEN, 'fresh_s': _first_batch(),
            'resume_s': _first_batch(position)}


def print_table(result: dict) -> None:
    print(f'\nresume at batch {result["position"]:,} ({result["batch"]} x {result["seq_len"]} tokens, seed mixture): '
          'seconds from building the stream to its first batch')
    print(f'{"start":<28}{"seconds":>10}')
    print(f'{"fresh (batch 0)":<28}{result["fresh_s"]:>10.3f}')
    print(f'{"at the position":<28}{result["resume_s"]:>10.3f}')
