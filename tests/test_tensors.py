"""Tensors in and out of checkpoints (bam_jax/workdir/tensors.py): a written checkpoint reads back
exactly through Orbax and through the TensorStore reader, uncompressed, group by group; reads
ahead stay within their budget and in their announced order."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bam_jax import storage
from bam_jax.errors import BamJaxError
from bam_jax.models import flatten
from bam_jax.workdir import tensors

# Tensors of 800, 400, 400, 96 and 800 bytes: groups of 1,000 bytes hold one to three of them.
SHAPES = {'embed/embedding': (20, 10), 'layers/0/ffn/wi_up': (10, 10), 'layers/0/ffn/wo': (10, 10),
          'layers/0/norm/scale': (24,), 'unembed/kernel': (10, 20)}


def weights():
    rng = np.random.default_rng(0)
    return {path: rng.standard_normal(shape, np.float32) for path, shape in SHAPES.items()}


@pytest.fixture(scope='module')
def written(tmp_path_factory):
    """(step_dir, the weights, the bytes of each Orbax partial save) of a checkpoint written in
    groups of 1,000 bytes."""
    tmp = storage.path(tmp_path_factory.mktemp('tensors') / 'out')
    saves, save_async = [], tensors.partial_save.save_async

    def counted(path, tree):
        saves.append(sum(v.nbytes for v in flatten(tree).values()))
        return save_async(path, tree)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensors.partial_save, 'save_async', counted)
        with tensors.ParamsWriter(tmp, group_bytes=1000) as writer:
            for path, value in weights().items():
                writer.add(path, value)
            written, largest = writer.close()
    assert (written, largest) == (2496, 800)
    return tmp / 'checkpoints' / '0', weights(), saves


def test_groups_never_exceed_the_group_bytes(written):
    # 800 | 400 + 400 + 96 (+ 800 > 1000) | 800, the last saved by close: three Orbax calls
    _, _, saves = written
    assert saves == [800, 896, 800]


def test_written_checkpoint_reads_back_exactly_through_orbax_and_tensorstore(written):
    step_dir, expected, _ = written
    with ocp.StandardCheckpointer() as checkpointer:
        restored = flatten(checkpointer.restore(step_dir / 'params'))
    reader = tensors.CheckpointReader(step_dir)
    assert sorted(restored) == sorted(expected) == sorted(reader.nbytes)
    for path, value in expected.items():
        np.testing.assert_array_equal(restored[path], value)
        np.testing.assert_array_equal(reader.read(path), value)
        assert reader.nbytes[path] == value.nbytes
    assert reader.bytes_read == sum(v.nbytes for v in expected.values())


def test_written_arrays_are_not_compressed(written):
    step_dir, _, _ = written
    reader = tensors.CheckpointReader(step_dir)
    store = reader._stores['embed/embedding'].result()
    codecs = json.dumps(store.spec().to_json()['metadata']['codecs'])
    assert '"bytes"' in codecs and 'zstd' not in codecs


def test_read_ahead_keeps_its_budget_and_order(written):
    step_dir, expected, _ = written
    reader = tensors.CheckpointReader(step_dir)
    order = ['embed/embedding', 'layers/0/ffn/wi_up', 'layers/0/ffn/wo', 'unembed/kernel']
    ahead = tensors.ReadAhead((reader, p) for p in order)
    assert ahead.READ_COST == 2  # a read in flight counts twice its tensor
    ahead.top_up(2600)  # 2 x (800 + 400) fit, + 2 x 400 would not
    assert ahead.ahead == 2400
    np.testing.assert_array_equal(ahead.get(reader, 'embed/embedding'), expected['embed/embedding'])
    assert ahead.ahead == 800
    ahead.top_up(0)  # no room: nothing more starts
    assert ahead.ahead == 800
    np.testing.assert_array_equal(ahead.get(reader, 'layers/0/ffn/wi_up'), expected['layers/0/ffn/wi_up'])
    # nothing started, so get starts the next read itself
    np.testing.assert_array_equal(ahead.get(reader, 'layers/0/ffn/wo'), expected['layers/0/ffn/wo'])
    with pytest.raises(RuntimeError, match='out of the announced order'):
        ahead.get(reader, 'embed/embedding')


def test_reading_a_missing_or_damaged_tensor_is_one_line(written, tmp_path):
    step_dir, _, _ = written
    reader = tensors.CheckpointReader(step_dir)
    with pytest.raises(BamJaxError, match='has no parameter layers/9'):
        reader.read('layers/9/ffn/wo')
    with pytest.raises(BamJaxError, match='cannot read the parameters'):
        tensors.CheckpointReader(storage.path(tmp_path))
