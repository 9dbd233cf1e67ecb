"""Outputs that appear whole, for the commands that move whole models (the upcycler,
`import-hf`, `export-hf`): each builds everything under a hidden temporary directory next to the
output (bam_jax.workdir.tensors reads and writes the tensors) that is renamed into place at the
end, so an interrupted run leaves no output behind. Also their progress bars and the model item.
"""

from __future__ import annotations

import os
import sys
import tempfile

import orbax.checkpoint as ocp
from tqdm import tqdm

from bam_jax import storage
from bam_jax.errors import BamJaxError
from bam_jax.models.config import ModelConfig
from bam_jax.workdir import files

_COMMIT_MARKER = 'commit_success.txt'  # orbax.checkpoint's name for it


def progress_bar(items, desc: str, unit: str, enabled: bool, total: int | None = None):
    """tqdm on stderr; redrawn at most every 30 s when stderr is a log file, not a terminal."""
    return tqdm(items, desc=desc, unit=unit, total=total, disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 30)


def write_model_config(tmp: storage.Path, config: ModelConfig, step: int = 0) -> None:
    """The step's `model` item: the ModelConfig every reader of the checkpoint checks against."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        checkpointer.save(tmp / files.CHECKPOINTS / str(step) / 'model', args=ocp.args.JsonSave(config.to_dict()))


def staging_dir(out: storage.Path, kind: str) -> storage.Path:
    """The hidden temporary directory an output is built in (one left by a killed run is cleared).

    An output on remote storage is built on local disk and uploaded by `publish`: Orbax's partial
    saving adds to a checkpoint in place, which it cannot do on an object store.
    """
    if storage.is_uri(out):
        local = tempfile.mkdtemp(prefix=f'bam_jax-{kind}-')
        os.rmdir(local)  # a fresh name; the writers create the directory
        return storage.path(local)
    tmp = _hidden(out, kind, 'tmp')
    storage.remove(tmp)
    return tmp


def _hidden(out: storage.Path, kind: str, role: str) -> storage.Path:
    return out.parent / f'.{out.name}.{kind}-{role}'


def publish(tmp: storage.Path, out: storage.Path, kind: str) -> None:
    """Renames tmp to out; an existing out is moved aside first and deleted only afterwards.
    A local tmp for a remote out is first uploaded next to it."""
    if storage.is_uri(out) and not storage.is_uri(tmp):
        remote = _hidden(out, kind, 'tmp')
        storage.remove(remote)
        storage.copy_tree(tmp, remote)
        _mark_committed(remote, out)
        storage.remove(tmp)
        tmp = remote
    old = _hidden(out, kind, 'old')
    storage.remove(old)
    if storage.occupied(out):
        out.rename(old)
    tmp.rename(out)
    storage.remove(old)


def _mark_committed(tmp: storage.Path, out: storage.Path) -> None:
    """On object stores, Orbax reads a checkpoint directory only once it holds the marker that its
    own saves write last there; an uploaded checkpoint gets the same marker in each directory."""
    for step_dir in (tmp / files.CHECKPOINTS).iterdir() if (tmp / files.CHECKPOINTS).is_dir() else ():
        for directory in [step_dir, *(d for d in step_dir.iterdir() if d.is_dir())]:
            final = out / directory.relative_to(tmp)
            (directory / _COMMIT_MARKER).write_text(f'Checkpoint commit was successful to {final}')


def check_output(out: storage.Path, overwrite: bool) -> None:
    """Refuses an existing output unless it may be replaced."""
    if storage.occupied(out) and not overwrite:
        raise BamJaxError(f'{out} exists; pass --overwrite to replace it')
