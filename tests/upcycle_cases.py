"""What the upcycler's tests share: the dense models (real run checkpoints with random weights),
the upcycled outputs built once per test module, and the references they are checked by."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from bam_jax import workdir as ckpt
from bam_jax.models import ModelConfig, abstract_model, flatten, split_params
from bam_jax.models.params import unflatten
from bam_jax.upcycle import upcycle_checkpoints

MODEL = ModelConfig(vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                    dtype='float32')
D, F = MODEL.d_model, MODEL.d_ff
# name: (model, seed of its random weights). The first four share MODEL's architecture.
DENSE = {
    'seed': (MODEL, 0), 'code': (MODEL, 1), 'law': (MODEL, 2), 'math': (MODEL, 3),
    'wide': (dataclasses.replace(MODEL, d_ff=128), 4),
    'vocab512': (dataclasses.replace(MODEL, vocab_size=512), 5),
    'rope': (dataclasses.replace(MODEL, rope_theta=500.0), 6),
    'sequential': (dataclasses.replace(MODEL, parallel_block=False, tie_embeddings=True), 7),
    # every per-projection extra of the imported families, and the window shorter than a document
    'extras': (dataclasses.replace(MODEL, qkv_bias=True, qk_norm=True, head_dim=16, sliding_window=8,
                                   rope_scaling='llama3', rope_scaling_factor=8.0, rope_original_max_len=64), 8),
}
DENSE['extras2'] = (DENSE['extras'][0], 9)
FFN = ('wi_gate', 'wi_up', 'wo')
ATTN = ('wq', 'wk', 'wv', 'wo', 'bq', 'bk', 'bv', 'q_norm', 'k_norm')


def random_params(config: ModelConfig, seed: int) -> dict:
    """Flat float32 weights of the model's exact tree; norm scales around 1, so averages matter."""
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in flatten(split_params(abstract_model(config))[1]).items()}
    scale = ('/scale', '_norm')
    return {k: (rng.standard_normal(s) * (0.1 if k.endswith(scale) else 0.2)
                + (1.0 if k.endswith(scale) else 0.0)).astype(np.float32) for k, s in shapes.items()}


def read_params(step_dir: pathlib.Path) -> dict:
    """Every stored array of a step's params, as numpy, through the trainer's restore."""
    meta = ckpt.read_param_shapes(step_dir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = unflatten({k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in meta.items()})
    shardings = jax.tree.map(lambda _: device, abstract)
    return {k: np.asarray(v) for k, v in flatten(ckpt.restore_params(step_dir, abstract, shardings)).items()}


def step_dir(out: pathlib.Path) -> pathlib.Path:
    return out / 'checkpoints' / '0'


def tmp_dir(out: pathlib.Path) -> pathlib.Path:
    return out.parent / f'.{out.name}.upcycle-tmp'


def tree_bytes(directory: pathlib.Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob('*')) if p.is_file()}


def mean(arrays) -> np.ndarray:
    """numpy's mean in float64, rounded once to float32."""
    return np.mean(np.stack(arrays).astype(np.float64), axis=0).astype(np.float32)


@pytest.fixture(scope='module')
def dense(tmp_path_factory):
    """Real run checkpoints (params, opt_state, train_state, model) of the DENSE models, saved at
    step 1 of a workdir each; returns {name: (workdir, flat params)}."""
    root = tmp_path_factory.mktemp('dense')
    runs = {}
    for name, (config, seed) in DENSE.items():
        params = random_params(config, seed)
        checkpoints = ckpt.RunCheckpoints(root / name, keep=1)
        checkpoints.save(1, unflatten(params), {'count': np.zeros((), np.int32)},
                         {'step': 1, 'data_position': 1, 'seed': seed}, config)
        checkpoints.wait()
        checkpoints.close()
        runs[name] = (root / name, params)
    return runs


@pytest.fixture(scope='module')
def upcycled(tmp_path_factory, dense):
    """upcycled(method, experts, seed=None, **kwargs) -> (OUT, flat output params), built once."""
    root = tmp_path_factory.mktemp('upcycled')
    cache = {}

    def get(method, experts, seed=None, **kwargs):
        key = (method, tuple(experts), seed, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = root / f'out{len(cache)}'
            upcycle_checkpoints(method, [str(dense[e][0]) for e in experts], out,
                                seed=str(dense[seed][0]) if seed else None, progress=False, **kwargs)
            cache[key] = (out, read_params(step_dir(out)))
        return cache[key]

    return get
