"""Parameter tensors in and out of Orbax checkpoints, one at a time, for the tools that move
whole models (the upcycler, `import-hf`, `export-hf`).

Reading opens every array of a checkpoint once, straight through TensorStore with Orbax's own
read specs, and all inputs share one TensorStore context (one cache pool, one set of I/O and
decompression threads). `ReadAhead` keeps the next tensors' reads in flight while the current
one is built, within a byte budget. Writing gathers finished tensors into groups of a few
tensors' worth, each an Orbax partial save run in the background while the next group fills.
The tensors are written without zstd, as a training run's checkpoints are (workdir/checkpoints.py):
float32 weights shrink by under a tenth, and compressing every byte costs more CPU time than all
the rest of the write on a host's few cores. Compressed checkpoints of older versions read as
any other: each array's codec is in its metadata.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import math
from collections.abc import Iterable

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint.experimental import v1 as ocp_v1
from orbax.checkpoint.experimental.v1 import partial as partial_save

from bam_jax import storage
from bam_jax.errors import BamJaxError
from bam_jax.models.params import flatten, unflatten
from bam_jax.workdir import files
from bam_jax.workdir.checkpoints import read_param_metadata

# glibc's malloc serves allocations above its mmap threshold from fresh mappings, returned to the
# system on free. After such a block is freed it raises the threshold to that block's size, so the
# next tensors come from the heap, which keeps what they free: streaming tensors one by one, the
# resident set grew to about twice what was live (measured on the upcycle bench: 1.24-1.41 GB
# peak, against 0.74 GB with the threshold fixed). Fixing it keeps every tensor a mapping.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


@functools.cache
def fix_mmap_threshold() -> bool:
    """Fixes glibc's mmap threshold at MMAP_THRESHOLD for this process (once); False where the C
    library is not glibc."""
    try:
        return bool(ctypes.CDLL('libc.so.6').mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def shared_context() -> ts.Context:
    """One TensorStore context for every checkpoint a command reads (Orbax's defaults)."""
    return ocp.type_handlers.get_ts_context()


class CheckpointReader:
    """The parameter arrays of one checkpoint step, each opened once through TensorStore.

    nbytes: {path: bytes} of every stored tensor. read / read_async give one tensor as numpy.
    """

    def __init__(self, step_dir: storage.Path, context: ts.Context | None = None):
        fix_mmap_threshold()
        self.step_dir = step_dir
        self.bytes_read = 0
        context = context or shared_context()
        directory = step_dir / 'params'
        metadata = read_param_metadata(step_dir)
        use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(directory)
        self.nbytes, self._stores = {}, {}
        for path, leaf in flatten(metadata.tree).items():
            info = ocp.type_handlers.ParamInfo(name=leaf.name, parent_dir=leaf.directory or directory,
                                               use_zarr3=metadata.use_zarr3, ts_context=context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
            self._stores[path] = ts.open(spec, context=context, open=True, read=True)  # a future: all open at once
            self.nbytes[path] = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize

    def read_async(self, path: str) -> ts.Future:
        """Starts reading one tensor; .result() of the returned future is the numpy array."""
        if path not in self._stores:
            raise BamJaxError(f'{self.step_dir} has no parameter {path}')
        try:
            return self._stores[path].result().read()
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint, whatever TensorStore calls it
            raise self._error(path, e) from None

    def wait(self, path: str, future: ts.Future) -> np.ndarray:
        try:
            array = future.result()
        except Exception as e:  # noqa: BLE001
            raise self._error(path, e) from None
        self.bytes_read += array.nbytes
        return array

    def read(self, path: str) -> np.ndarray:
        return self.wait(path, self.read_async(path))

    def _error(self, path: str, e: Exception) -> BamJaxError:
        return BamJaxError(f'cannot read {path} from {self.step_dir}: {str(e).splitlines()[0]}')


class ReadAhead:
    """Hands out tensors in a known order, reading ahead of use within a byte budget.

    order: [(reader, path)] in the order `get` will ask for them. `top_up(room)` starts reads
    while the memory of the reads started but not yet handed out stays within room, each counted
    at READ_COST x its tensor; `get` waits for the next one (starting it if the budget kept it
    back). `ahead` is that count.
    """

    # A read in flight holds its stored bytes and the decoded array (measured on zstd inputs: a lone
    # read of a 131 MB tensor raises the peak resident set by about 3x the tensor, twice it at the least).
    READ_COST = 2

    def __init__(self, order: Iterable[tuple[CheckpointReader, str]]):
        self._waiting = collections.deque(order)
        self._started: collections.deque = collections.deque()
        self.ahead = 0

    def top_up(self, room: int) -> None:
        while self._waiting:
            reader, path = self._waiting[0]
            if self.ahead + self.READ_COST * reader.nbytes[path] > room:
                return
            self._start()

    def _start(self) -> None:
        reader, path = self._waiting.popleft()
        self._started.append((reader, path, reader.read_async(path)))
        self.ahead += self.READ_COST * reader.nbytes[path]

    def get(self, reader: CheckpointReader, path: str) -> np.ndarray:
        if not self._started:
            self._start()
        expected, expected_path, future = self._started.popleft()
        if (expected, expected_path) != (reader, path):
            raise RuntimeError(f'read {path} out of the announced order (expected {expected_path})')
        self.ahead -= self.READ_COST * reader.nbytes[path]
        return reader.wait(path, future)


class ParamsWriter:
    """Writes (path, tensor) pairs, as they come, as tmp/checkpoints/<step>/params.

    Tensors are gathered in groups of at most `group_bytes` (a tensor alone may exceed it): each
    partial save has a fixed cost, and a group must stay within the caller's memory budget. A full
    group is saved in the background while the next one fills; `held` counts the bytes of both. close() finishes
    the checkpoint and returns (bytes written, largest tensor's bytes). A tensor must not change once
    added: it is written from the caller's own array, without a copy.
    """

    def __init__(self, tmp: storage.Path, group_bytes: int, step: int = 0):
        fix_mmap_threshold()
        self.tmp, self.step, self.group_bytes = tmp, step, group_bytes
        self._staging = tmp / 'params'
        self._group: dict[str, np.ndarray] = {}
        self._group_bytes = 0
        self._saving, self._saving_bytes = None, 0
        self.written = self.largest = 0
        self._context = ocp_v1.Context()
        self._context.array.saving.use_compression = False
        # Orbax copies every numpy array it is given before writing it, in case the caller changes
        # it meanwhile; nothing changes a tensor once added, and the copy cost a quarter of the
        # upcycler's time and a group's worth of memory.
        self._context.memory_options.deepcopy_host_arrays = False

    @property
    def held(self) -> int:
        return self._group_bytes + self._saving_bytes

    def add(self, path: str, tensor: np.ndarray) -> None:
        if self._group and self._group_bytes + tensor.nbytes > self.group_bytes:
            self.flush()
        self._group[path] = tensor
        self._group_bytes += tensor.nbytes
        self.written, self.largest = self.written + tensor.nbytes, max(self.largest, tensor.nbytes)

    def flush(self) -> None:
        """Starts saving the current group (after the previous save has finished)."""
        self.wait()
        if self._group:
            with self._context:
                self._saving = partial_save.save_async(self._staging, unflatten(self._group))
            self._saving_bytes, self._group, self._group_bytes = self._group_bytes, {}, 0

    def wait(self) -> None:
        """Waits for the save in the background, if any."""
        if self._saving is not None:
            self._saving.result()
            self._saving, self._saving_bytes = None, 0

    def __enter__(self) -> ParamsWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:  # the caller removes tmp next: let the save in the background end first
            with contextlib.suppress(Exception):
                self.wait()

    def close(self) -> tuple[int, int]:
        self.flush()
        self.wait()
        partial_save.finalize(self._staging)
        step_dir = self.tmp / files.CHECKPOINTS / str(self.step)
        step_dir.mkdir(parents=True)
        (self._staging / 'state').rename(step_dir / 'params')
        storage.remove(self._staging)
        return self.written, self.largest


def write_params(tmp: storage.Path, tensors: Iterable[tuple[str, np.ndarray]], *, budget: int,
                 step: int = 0) -> tuple[int, int]:
    """Writes (path, tensor) pairs, as they come, with a ParamsWriter of groups of `budget` bytes;
    returns (bytes written, largest tensor's bytes)."""
    with ParamsWriter(tmp, budget, step) as writer:
        for path, tensor in tensors:
            writer.add(path, tensor)
        return writer.close()
