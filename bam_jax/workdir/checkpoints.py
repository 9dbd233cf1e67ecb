"""Orbax checkpoints of a run: layout, resolution of user-given paths, the model check, save and
restore.

A run's workdir holds `checkpoints/<step>/` with the items
  params      plain nested dict of float32 arrays (docs/checkpoint_format.md)
  opt_state   the optimizer state (absent from upcycled checkpoints)
  train_state JSON: step, data position (batches consumed), seed
  model       JSON: the ModelConfig fields
The data position is all a resume needs of the data (bam_jax.data.token_stream): a `data` item of
older checkpoints (a TensorFlow iterator state) is left unread.

params and opt_state are written without compression. Orbax's default, zstd, saved under a tenth
of the bytes of float32 weights and Adam moments (`python -m bam_jax.benchmarks --tables checkpoints`) for CPU time
on every save and every read. Checkpoints written compressed, as older versions did, restore as
before: each array's codec is in its own metadata.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from bam_jax import storage
from bam_jax.errors import BamJaxError
from bam_jax.models import ModelConfig, abstract_model, flatten, split_params
from bam_jax.models.config import first_difference, setting_changes
from bam_jax.workdir.files import CHECKPOINTS


def _is_step_dir(path: storage.Path) -> bool:
    return (path / 'params').is_dir() and (path / 'model').is_dir()


def latest_step_dir(directory: storage.Path) -> storage.Path | None:
    """The newest finished step directory under `directory`, or None."""
    if not directory.is_dir():
        return None
    steps = [p for p in directory.iterdir() if p.name.isdigit() and _is_step_dir(p)]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def resolve_checkpoint(path: str | storage.Path, what: str = 'checkpoint') -> storage.Path:
    """The step directory for a run's workdir, its checkpoints/ dir, or a step dir itself.

    A workdir or checkpoints dir gives its latest finished step. Raises BamJaxError otherwise.
    """
    path = storage.path(path)
    if not path.exists():
        raise BamJaxError(f'{what} {path} does not exist')
    if not path.is_dir():
        raise BamJaxError(f'{what} {path} is not a directory')
    if _is_step_dir(path):
        return path
    for directory in (path / CHECKPOINTS, path):
        try:
            found = latest_step_dir(directory)
        except PermissionError:
            raise BamJaxError(f'{what} {directory} is not readable') from None
        if found is not None:
            return found
    raise BamJaxError(f'{what} {path} is not a bam_jax checkpoint: no <step>/params and <step>/model '
                      f'under it or under {path / CHECKPOINTS}')


def read_model_config(step_dir: storage.Path) -> ModelConfig:
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
            values = checkpointer.restore(step_dir / 'model')
    except Exception as e:  # noqa: BLE001 - any read failure means the same to the user
        raise BamJaxError(f'cannot read the model config of {step_dir}: {e}') from None
    return ModelConfig.from_dict(values)


@contextlib.contextmanager
def _absl_errors_only():
    logger = logging.getLogger('absl')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_param_metadata(step_dir: storage.Path):
    """Orbax's metadata of the stored parameters: .tree (one ArrayMetadata per leaf: name,
    directory, shape, dtype) and .use_zarr3."""
    try:
        # Orbax warns that a lone item has no step-level metadata file; that is expected here.
        with _absl_errors_only(), ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(step_dir / 'params').item_metadata
    except Exception as e:  # noqa: BLE001
        raise BamJaxError(f'cannot read the parameters of {step_dir}: {e}') from None
    if metadata is None:
        raise BamJaxError(f'cannot read the parameters of {step_dir}: their metadata is missing or damaged')
    return metadata


def read_param_shapes(step_dir: storage.Path) -> dict[str, Any]:
    """{path: (shape, dtype)} of the stored parameters, read from metadata only."""
    return {k: (tuple(m.shape), m.dtype) for k, m in flatten(read_param_metadata(step_dir).tree).items()}


def _check_same_params(expected: dict[str, Any], found: dict[str, Any], source: str) -> None:
    """Raises naming the first parameter path whose presence or shape differs."""
    for path in sorted(set(expected) | set(found)):
        if path not in found:
            raise BamJaxError(f'{source} has no parameter {path}')
        if path not in expected:
            raise BamJaxError(f'{source} has a parameter {path} this model does not have')
        if tuple(expected[path][0]) != tuple(found[path][0]):
            raise BamJaxError(f'{source}: parameter {path} has shape {found[path][0]}, '
                              f'this model needs {expected[path][0]}')


def check_model(model: ModelConfig, step_dir: storage.Path, what: str) -> dict[str, list]:
    """The one check wherever a checkpoint meets a model (resume, INIT_CHECKPOINT, eval).

    Refuses, in one line, a checkpoint of another architecture or parameter tree. Settings
    (routing, capacity, loss weights, compute dtype) may differ: returns them as
    {setting: [checkpoint's value, model's value]}.
    """
    stored = read_model_config(step_dir)
    difference = first_difference(stored.architecture(), model.architecture())
    if difference:
        name, there, here = difference
        raise BamJaxError(f'{what} holds a run of a different model: {name} is {there!r} there, {here!r} here')
    _, abstract_params = split_params(abstract_model(model))
    expected = {k: (v.shape, v.dtype) for k, v in flatten(abstract_params).items()}
    _check_same_params(expected, read_param_shapes(step_dir), what)
    return setting_changes(stored, model)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_params(step_dir: storage.Path, abstract_params, shardings):
    """Parameters only, placed on the mesh by `shardings`."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(step_dir / 'params', _abstract(abstract_params, shardings))
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint, whatever orbax calls it
        raise BamJaxError(f'cannot read the parameters of {step_dir}: {str(e).splitlines()[0]}') from None


ARRAY_ITEMS = ('params', 'opt_state')


def _handler_registry(compression: bool) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The array items' handler, with or without zstd (StandardCheckpointHandler has no such
    option; it wraps the same PyTreeCheckpointHandler, so the files are the same either way)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ARRAY_ITEMS:
        handler = ocp.PyTreeCheckpointHandler(use_compression=compression)
        registry.add(item, ocp.args.PyTreeSave, handler)
        registry.add(item, ocp.args.PyTreeRestore, handler)
    return registry


def _restore_args(abstract_tree) -> ocp.args.PyTreeRestore:
    """What StandardRestore does for a target of ShapeDtypeStructs with shardings."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_tree)
    return ocp.args.PyTreeRestore(abstract_tree, restore_args=restore_args)


class RunCheckpoints:
    """The CheckpointManager of one run: async saves, keeps the newest N.

    compression: write params and opt_state zstd-compressed, as older versions did (the bench and
    the tests write such checkpoints with it); reading takes either.
    """

    def __init__(self, workdir: storage.Path, keep: int, *, compression: bool = False):
        self.directory = storage.path(workdir) / CHECKPOINTS
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                 create=True),
            handler_registry=_handler_registry(compression))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> storage.Path:
        return self.directory / str(step)

    def save(self, step: int, params, opt_state, train_state: dict, model: ModelConfig) -> None:
        items = {'params': ocp.args.PyTreeSave(params), 'opt_state': ocp.args.PyTreeSave(opt_state),
                 'train_state': ocp.args.JsonSave(train_state), 'model': ocp.args.JsonSave(model.to_dict())}
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_params, param_shardings, abstract_opt_state, opt_shardings):
        """(params, opt_state, train_state)."""
        items = {'params': _restore_args(_abstract(abstract_params, param_shardings)),
                 'opt_state': _restore_args(_abstract(abstract_opt_state, opt_shardings)),
                 'train_state': ocp.args.JsonRestore()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored['params'], restored['opt_state'], dict(restored['train_state'])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.wait()
        self.close()
