"""Training checkpoints' params and opt_state are written without compression, and checkpoints
written the old way (Orbax's default, zstd) still restore bit for bit."""

import json

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from bam_jax import storage
from bam_jax.models import ModelConfig, abstract_model, split_params
from bam_jax.workdir import RunCheckpoints

# A wide vocabulary, so that the all-zero embedding (256 KiB) outweighs the few KiB by which Orbax's
# own files differ from one save to another.
MODEL = ModelConfig(vocab_size=4096, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=32,
                    dtype='float32', tie_embeddings=True)
TRAIN_STATE = {'step': 7, 'data_position': 7, 'seed': 3}


def training_state():
    """(params, opt_state): random weights and AdamW moments after one step of random gradients,
    with one all-zero tensor (very compressible) among the weights."""
    _, shapes = split_params(abstract_model(MODEL))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jax.numpy.asarray(rng.standard_normal(s.shape, np.float32)), shapes)
    params['final_norm']['scale'] = jax.numpy.zeros_like(params['final_norm']['scale'])
    params['embed']['embedding'] = jax.numpy.zeros_like(params['embed']['embedding'])
    optimizer = optax.adamw(1e-3)
    grads = jax.tree.map(lambda p: jax.numpy.asarray(rng.standard_normal(p.shape, np.float32)), params)
    _, opt_state = optimizer.update(grads, optimizer.init(params), params)
    return params, opt_state


def save_the_old_way(workdir, params, opt_state):
    """What RunCheckpoints.save did before: Orbax's StandardSave, which compresses with zstd."""
    manager = ocp.CheckpointManager(storage.path(workdir) / 'checkpoints', options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=True, create=True))
    manager.save(7, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        train_state=ocp.args.JsonSave(TRAIN_STATE), model=ocp.args.JsonSave(MODEL.to_dict())), force=True)
    manager.wait_until_finished()
    manager.close()


def array_codecs(item_dir) -> list[str]:
    """The stored TensorStore metadata (codecs, compressor) of every array of an Orbax item, as JSON."""
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(item_dir).item_metadata
    context, found = ocp.type_handlers.get_ts_context(), []
    for leaf in jax.tree.leaves(metadata.tree):
        info = ocp.type_handlers.ParamInfo(name=leaf.name, parent_dir=leaf.directory or item_dir,
                                           use_zarr3=metadata.use_zarr3, ts_context=context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocp.type_handlers.is_ocdbt_checkpoint(item_dir))
        stored = ts.open(spec, context=context, open=True, read=True).result().spec().to_json()['metadata']
        found.append(json.dumps({k: v for k, v in stored.items() if k in ('codecs', 'compressor')}))
    return found


def file_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.rglob('*') if p.is_file())


def restore(workdir, params, opt_state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = lambda tree: jax.tree.map(lambda _: device, tree)  # noqa: E731
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    with RunCheckpoints(workdir, keep=1) as checkpoints:
        return checkpoints.restore(checkpoints.latest_step(), abstract(params), shardings(params),
                                   abstract(opt_state), shardings(opt_state))


def assert_bitwise_equal(expected, restored):
    assert jax.tree.structure(expected) == jax.tree.structure(restored)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """{'old': workdir saved the old way, 'new': workdir saved by RunCheckpoints} of one state."""
    params, opt_state = training_state()
    root = tmp_path_factory.mktemp('compression')
    save_the_old_way(root / 'old', params, opt_state)
    with RunCheckpoints(storage.path(root / 'new'), keep=1) as run:
        run.save(7, params, opt_state, TRAIN_STATE, MODEL)
    return {'old': root / 'old', 'new': root / 'new'}


@pytest.mark.parametrize('which', ['old', 'new'])
def test_checkpoints_restore_bit_for_bit(checkpoints, which):
    params, opt_state = training_state()
    restored_params, restored_opt_state, train_state = restore(storage.path(checkpoints[which]), params, opt_state)
    assert_bitwise_equal(params, restored_params)
    assert_bitwise_equal(opt_state, restored_opt_state)
    assert train_state == TRAIN_STATE


@pytest.mark.parametrize('item', ['params', 'opt_state'])
def test_old_checkpoints_are_compressed_and_new_ones_are_not(checkpoints, item):
    old = checkpoints['old'] / 'checkpoints' / '7' / item
    new = checkpoints['new'] / 'checkpoints' / '7' / item
    old_codecs, new_codecs = array_codecs(storage.path(old)), array_codecs(storage.path(new))
    assert len(old_codecs) == len(new_codecs) > 1
    assert all('zstd' in c for c in old_codecs)
    assert not any('zstd' in c for c in new_codecs)


def test_new_checkpoints_take_every_byte_of_their_arrays(checkpoints):
    # The zero embedding compresses to almost nothing; stored as written, it takes its full size.
    # (Orbax's own files, the same either way, come on top of both.)
    params, _ = training_state()
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    zeros = np.asarray(params['embed']['embedding']).nbytes
    old = file_bytes(checkpoints['old'] / 'checkpoints' / '7' / 'params')
    new = file_bytes(checkpoints['new'] / 'checkpoints' / '7' / 'params')
    assert new >= nbytes
    assert new - old > zeros / 2
