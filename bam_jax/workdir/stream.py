"""Checkpoints built or read one tensor at a time, and output directories that appear whole.

The upcycler, `import-hf` and `export-hf` move whole models between formats. They read single
tensors (Orbax partial restore: TensorStore reads that array only), write them in groups no
larger than the largest tensor (Orbax partial saving), and build everything under a hidden
temporary directory next to the output that is renamed into place at the end, so host memory
stays near a few tensors and an interrupted run leaves no output behind.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
from collections.abc import Iterable

import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental.v1 import partial as partial_save
from tqdm import tqdm

from bam_jax.errors import BamJaxError
from bam_jax.models.config import ModelConfig
from bam_jax.models.params import unflatten
from bam_jax.workdir import files


def _nest(path: str, value) -> dict:
    tree = value
    for key in reversed(path.split('/')):
        tree = {key: tree}
    return tree


class CheckpointReader:
    """Reads single parameter tensors of one checkpoint step as numpy arrays."""

    def __init__(self, step_dir: pathlib.Path):
        self.step_dir = step_dir
        self.bytes_read = 0
        self._checkpointer = ocp.PyTreeCheckpointer()

    def read(self, path: str) -> np.ndarray:
        target = _nest(path, ocp.RestoreArgs(restore_type=np.ndarray))
        try:
            tree = self._checkpointer.restore(self.step_dir / 'params', args=ocp.args.PyTreeRestore(
                item=_nest(path, 0), restore_args=target, partial_restore=True))
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint, whatever orbax calls it
            raise BamJaxError(f'cannot read {path} from {self.step_dir}: {str(e).splitlines()[0]}') from None
        for key in path.split('/'):
            tree = tree[key]
        self.bytes_read += tree.nbytes
        return tree


def progress_bar(items, desc: str, unit: str, enabled: bool, total: int | None = None):
    """tqdm on stderr; redrawn at most every 30 s when stderr is a log file, not a terminal."""
    return tqdm(items, desc=desc, unit=unit, total=total, disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 30)


def write_params(tmp: pathlib.Path, tensors: Iterable[tuple[str, np.ndarray]], *, budget: int,
                 step: int = 0) -> tuple[int, int]:
    """Writes (path, tensor) pairs, as they come, as tmp/checkpoints/<step>/params; returns
    (bytes written, largest tensor's bytes).

    Tensors are saved in groups of at most `budget` bytes (the largest input tensor): each
    partial save has a fixed cost, and the group never outgrows the memory bound.
    """
    staging = tmp / 'params'
    written, largest, group, group_bytes = 0, 0, {}, 0
    for path, tensor in tensors:
        if group and group_bytes + tensor.nbytes > budget:
            partial_save.save(staging, unflatten(group))
            group, group_bytes = {}, 0
        group[path] = tensor
        group_bytes += tensor.nbytes
        written, largest = written + tensor.nbytes, max(largest, tensor.nbytes)
    if group:
        partial_save.save(staging, unflatten(group))
    partial_save.finalize(staging)
    step_dir = tmp / files.CHECKPOINTS / str(step)
    step_dir.mkdir(parents=True)
    (staging / 'state').rename(step_dir / 'params')
    shutil.rmtree(staging)
    return written, largest


def write_model_config(tmp: pathlib.Path, config: ModelConfig, step: int = 0) -> None:
    """The step's `model` item: the ModelConfig every reader of the checkpoint checks against."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        checkpointer.save(tmp / files.CHECKPOINTS / str(step) / 'model', args=ocp.args.JsonSave(config.to_dict()))


def staging_dir(out: pathlib.Path, kind: str) -> pathlib.Path:
    """The hidden temporary directory an output is built in (one left by a killed run is cleared)."""
    tmp = out.parent / f'.{out.name}.{kind}-tmp'
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def publish(tmp: pathlib.Path, out: pathlib.Path, kind: str) -> None:
    """Renames tmp to out; an existing out is moved aside first and deleted only afterwards."""
    old = out.parent / f'.{out.name}.{kind}-old'
    remove(old)
    if out.exists() or out.is_symlink():
        out.rename(old)
    tmp.rename(out)
    remove(old)


def remove(path: pathlib.Path) -> None:
    """Deletes a directory tree, or a file or link (an output path may have been one)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_output(out: pathlib.Path, overwrite: bool) -> None:
    """Refuses an existing output unless it may be replaced."""
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise BamJaxError(f'{out} exists; pass --overwrite to replace it')
