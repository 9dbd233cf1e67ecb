"""Hugging Face weight files: safetensors, one file or shards with an index, without torch.

Reading opens each file once (memory-mapped by the safetensors library) and hands out one
tensor at a time. Writing streams: a file's header needs every tensor's name, dtype and shape,
which are known before any tensor is built, so each tensor is written as soon as it is made and
then dropped; memory stays near the largest tensor, whatever the shard size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open

from bam_jax.errors import BamJaxError

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
DEFAULT_SHARD_BYTES = 5 * 2**30
# Object-store writers take bytes, not buffers: a tensor goes out in slices of this size.
_WRITE_CHUNK = 64 << 20

_DTYPE_NAMES = {np.dtype(np.float32): 'F32', np.dtype(ml_dtypes.bfloat16): 'BF16', np.dtype(np.float16): 'F16'}


def _weight_map(index: epath.Path) -> dict:
    try:
        weight_map = json.loads(index.read_text())['weight_map']
    except (ValueError, KeyError, TypeError) as e:
        raise BamJaxError(f'cannot read {index}: {e}') from None
    if not isinstance(weight_map, dict):
        raise BamJaxError(f'cannot read {index}: weight_map is not a JSON object')
    return weight_map


def weight_files(directory: epath.Path) -> list[str]:
    """The files SafetensorsReader(directory) opens: the index and the shards it names, or the
    single file (what a remote model directory must download)."""
    index = directory / INDEX_FILE
    if not index.is_file():
        return [SINGLE_FILE]
    names = sorted({str(name) for name in _weight_map(index).values()})
    for name in names:  # a download must stay inside its directory
        if os.path.isabs(name) or '..' in name.replace('\\', '/').split('/'):
            raise BamJaxError(f'{index} names a weights file outside its directory: {name!r}')
    return [INDEX_FILE, *names]


class SafetensorsReader:
    """The tensors of a Hugging Face model directory: model.safetensors, or the shards its
    model.safetensors.index.json names. read(name) returns one tensor as numpy.

    directory: local (the files are memory-mapped); source: where they came from, named in
    messages (default: directory)."""

    def __init__(self, directory: epath.Path, source: epath.Path | None = None):
        self.local = directory
        self.directory = directory if source is None else source
        self._files: dict[str, object] = {}
        self.bytes_read = 0
        index, single = directory / INDEX_FILE, directory / SINGLE_FILE
        if index.is_file():
            weight_map = _weight_map(index)
        elif single.is_file():
            weight_map = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        else:
            raise BamJaxError(f'no weights in {self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} '
                              '(only safetensors are read; convert .bin weights first)')
        self.file_of = dict(weight_map)

    def _open(self, file: str):
        if file not in self._files:
            path, shown = self.local / file, self.directory / file
            if not path.is_file():
                raise BamJaxError(f'weights file {shown} (named by {INDEX_FILE}) is missing')
            try:
                self._files[file] = safe_open(os.fspath(path), framework='numpy')
            except (SafetensorError, OSError) as e:
                raise BamJaxError(f'cannot read {shown}: {e}') from None
        return self._files[file]

    def names(self) -> list[str]:
        return list(self.file_of)

    def read(self, name: str) -> np.ndarray:
        if name not in self.file_of:
            raise BamJaxError(f'missing weights: {name} is not in {self.directory}')
        try:
            tensor = self._open(self.file_of[name]).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise BamJaxError(f'cannot read {name} from {self.directory}: {e}') from None
        self.bytes_read += tensor.nbytes
        return tensor


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name, shape, dtype, and the function that builds it (called
    once, when its turn comes)."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    build: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for spec in specs:
        if current and size + spec.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    return shards + [current] if current else shards


def _write_file(path: epath.Path, specs: list[TensorSpec], metadata: dict[str, str],
                done: Callable[[TensorSpec], None]) -> None:
    """One safetensors file: the JSON header (8-byte little-endian length, padded to 8 bytes),
    then every tensor's bytes in header order, built and written one at a time."""
    header: dict = {'__metadata__': metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {'dtype': _DTYPE_NAMES[np.dtype(spec.dtype)], 'shape': list(spec.shape),
                             'data_offsets': [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    with path.open('wb') as f:
        f.write(struct.pack('<Q', len(text)))
        f.write(text)
        for spec in specs:
            tensor = np.ascontiguousarray(spec.build(), dtype=spec.dtype)  # no copy when already so
            if tensor.shape != tuple(spec.shape):
                raise BamJaxError(f'{spec.name}: built shape {tensor.shape}, expected {tuple(spec.shape)}')
            flat = tensor.reshape(-1).view(np.uint8)
            for start in range(0, flat.size, _WRITE_CHUNK):  # one slice's copy at a time, not the tensor's
                f.write(flat[start:start + _WRITE_CHUNK].tobytes())
            done(spec)


def write_safetensors(out_dir: epath.Path, specs: Iterable[TensorSpec], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      done: Callable[[TensorSpec], None] = lambda spec: None) -> dict:
    """Writes the tensors as model.safetensors, or as model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json when they exceed max_shard_bytes. Returns the index
    ({'metadata': {'total_size': bytes}, 'weight_map': {name: file}}). done(spec) follows each tensor."""
    specs = list(specs)
    for spec in specs:
        if np.dtype(spec.dtype) not in _DTYPE_NAMES:
            raise BamJaxError(f'{spec.name}: cannot write dtype {spec.dtype}')
    shards = _shards(specs, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_file(out_dir / name, shard, {'format': 'pt'}, done)
        weight_map.update({spec.name: name for spec in shard})
    index = {'metadata': {'total_size': sum(s.nbytes for s in specs)}, 'weight_map': weight_map}
    if len(shards) > 1:
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + '\n')
    return index
