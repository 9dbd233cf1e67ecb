"""Tests run on an emulated 8-device CPU mesh: the flag must be set before jax is imported.
Every test starts and ends with gin's global bindings empty."""

import os

import gin  # neither gin nor pytest imports jax
import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Many tests (and the CLI subprocesses they start, which inherit this environment) compile the
# same programs: JAX's persistent compilation cache compiles each once per suite run.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), '.pytest_cache', 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')


@pytest.fixture(autouse=True)
def no_gin_bindings():
    """gin's bindings are global: a configurable (TrainConfig, ModelConfig, DataConfig, ...) would
    take values that another test parsed."""
    gin.clear_config()
    yield
    gin.clear_config()
