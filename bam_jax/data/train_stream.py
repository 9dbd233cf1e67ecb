"""The training batches of one process, and their position as a small saved state.

A global batch of `batch_size` rows is the concatenation of `num_shards` shard batches: shard k
reads the k-th disjoint part of the training documents (seqio.ShardInfo) and yields batch_size /
num_shards rows per step. Process p of P owns shards [p·S/P, (p+1)·S/P), so no document is read
by two processes, and the global batch depends on the number of shards, not of processes: a run
with DataConfig.data_shards fixed gives the same batches on one process as on eight.

Resuming restores each shard's tf.data iterator (shuffle buffers, packing, prefetch) from the
state saved with the checkpoint, in time that does not grow with the position. Without a saved
state (a checkpoint from before, or from another shard count) the stream replays its batches.
The state holds the shuffle buffers' documents: its size grows with DataConfig.shuffle_buffer
and the documents' length, not with the position.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np

from bam_jax.data.tf_setup import seqio, tf
from bam_jax.errors import BamJaxError


def shard_count(config, process_count: int) -> int:
    """DataConfig.data_shards, or one shard per process when it is 0."""
    shards = config.data_shards or process_count
    if shards % process_count:
        raise BamJaxError(f'DataConfig.data_shards={shards} cannot be split over {process_count} processes: '
                          'use a multiple of the process count')
    return shards


def state_name(shard: int, num_shards: int) -> str:
    return f'shard_{shard}_of_{num_shards}'


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
    per_process = num_shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


def stream_state_prefixes(config, process_index: int, process_count: int) -> tuple[str, ...]:
    """The names under which the shards of process `process_index` save their state."""
    num_shards = shard_count(config, process_count)
    return tuple(state_name(k, num_shards) + '.' for k in process_shards(num_shards, process_index, process_count))


class TrainStream:
    """This process's rows of every global training batch: `next(stream)` is a dict of numpy
    arrays [batch_size / process_count, seq_len] (see bam_jax.data.pipeline)."""

    def __init__(self, datasets: dict[int, tf.data.Dataset], num_shards: int, source: str, replayed: int = 0):
        self.num_shards, self.source, self.replayed = num_shards, source, replayed
        self._iterators = {k: iter(ds) for k, ds in datasets.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = []
        for shard, iterator in self._iterators.items():
            try:
                parts.append(next(iterator))
            except StopIteration:  # only an empty training split (or shard) ends an endless dataset
                raise BamJaxError(f'data source {self.source!r} has no training documents for shard '
                                  f'{shard} of {self.num_shards}') from None
        return {key: np.concatenate([part[key].numpy() for part in parts]) for key in parts[0]}

    def save(self) -> dict[str, bytes]:
        """The iterator state of each shard this process reads, as {file name: bytes}: the files
        of one TensorFlow checkpoint per shard, named after the shard."""
        with tempfile.TemporaryDirectory() as tmp:
            for shard, iterator in self._iterators.items():
                tf.train.Checkpoint(iterator=iterator).write(os.path.join(tmp, state_name(shard, self.num_shards)))
            return {path.name: path.read_bytes() for path in pathlib.Path(tmp).iterdir()}

    def restore(self, files: dict[str, bytes]) -> None:
        """Restores every shard of this process from saved files (has_state must hold)."""
        prefixes = {shard: state_name(shard, self.num_shards) for shard in self._iterators}
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                if name.startswith(tuple(f'{prefix}.' for prefix in prefixes.values())):
                    pathlib.Path(tmp, name).write_bytes(content)
            for shard, iterator in self._iterators.items():
                tf.train.Checkpoint(iterator=iterator).read(os.path.join(tmp, prefixes[shard])).assert_consumed()


def has_state(files: dict[str, bytes], shards, num_shards: int) -> bool:
    """Whether saved files hold the state of each of `shards` (not, e.g., when they were saved
    with another shard count)."""
    return all(f'{state_name(shard, num_shards)}.index' in files for shard in shards)


def shard_info(shard: int, num_shards: int) -> seqio.ShardInfo | None:
    return seqio.ShardInfo(shard, num_shards) if num_shards > 1 else None
