"""Outputs that appear whole, for the commands that write whole models (upcycle, experts,
import-hf, export-hf): atomic_output builds everything under a hidden directory next to the
output (bam_jax.workdir.tensors writes the tensors) and renames it into place at the end, so an
interrupted run leaves no output behind; on an object store each checkpoint directory also gets
Orbax's commit marker. Also the model item.
"""

from __future__ import annotations

import orbax.checkpoint as ocp

from bam_jax import storage
from bam_jax.models.config import ModelConfig
from bam_jax.workdir import files

_COMMIT_MARKER = 'commit_success.txt'  # orbax.checkpoint's name for it


def write_model_config(tmp: storage.Path, config: ModelConfig, step: int = 0) -> None:
    """The step's `model` item: the ModelConfig every reader of the checkpoint checks against."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        checkpointer.save(tmp / files.CHECKPOINTS / str(step) / 'model', args=ocp.args.JsonSave(config.to_dict()))


def atomic_output(out: storage.Path, kind: str, overwrite: bool = False):
    """storage.atomic_output (a context manager yielding the directory to build `out` in), with
    Orbax's commit marker in every checkpoint directory uploaded to an object store."""
    return storage.atomic_output(out, kind, overwrite, on_upload=_mark_committed)


def _mark_committed(tmp: storage.Path, out: storage.Path) -> None:
    """On object stores, Orbax reads a checkpoint directory only once it holds the marker that its
    own saves write last there; an uploaded checkpoint gets the same marker in each directory."""
    for step_dir in (tmp / files.CHECKPOINTS).iterdir() if (tmp / files.CHECKPOINTS).is_dir() else ():
        for directory in [step_dir, *(d for d in step_dir.iterdir() if d.is_dir())]:
            final = out / directory.relative_to(tmp)
            (directory / _COMMIT_MARKER).write_text(f'Checkpoint commit was successful to {final}')
