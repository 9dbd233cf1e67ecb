"""Tests run on an emulated 8-device CPU mesh: the flag must be set before jax is imported.
Every test starts and ends with gin's global bindings empty."""

import os

import gin  # neither gin nor pytest imports jax
import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')


@pytest.fixture(autouse=True)
def no_gin_bindings():
    """gin's bindings are global: a configurable (TrainConfig, ModelConfig, DataConfig, ...) would
    take values that another test parsed."""
    gin.clear_config()
    yield
    gin.clear_config()
