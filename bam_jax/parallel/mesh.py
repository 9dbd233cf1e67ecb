"""Device mesh: axes ('data', 'fsdp', 'expert', 'tensor') on one CPU, an emulated CPU mesh or a TPU pod."""

from __future__ import annotations

import dataclasses
import os

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from bam_jax.errors import BamJaxError

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. One axis may be -1: it takes the remaining devices.

    The default puts every device on `data` (plain data parallelism).
    """
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.expert, self.tensor]
        if any(s == 0 or s < -1 for s in sizes):
            raise BamJaxError(f'mesh axis sizes must be positive (or one -1), got {dict(zip(MESH_AXES, sizes))}')
        if sizes.count(-1) > 1:
            raise BamJaxError(f'at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise BamJaxError(f'{num_devices} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}')
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise BamJaxError(
                f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, {num_devices} are available')
        return tuple(sizes)


def create_mesh(config: MeshConfig | None = None, devices=None) -> Mesh:
    """Builds the 4-axis mesh over `devices` (default: all devices of all processes)."""
    config = config or MeshConfig()
    devices = jax.devices() if devices is None else list(devices)
    shape = config.shape(len(devices))
    try:
        # Topology-aware placement on TPU/GPU; falls back to plain order elsewhere.
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - CPU and odd shapes have no topology to respect
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def maybe_initialize_distributed(force: bool = False) -> None:
    """Joins a multi-host run (TPU pod, multi-node GPU, or bam_jax.local_job) before any
    other JAX call.

    On a TPU pod `jax.distributed.initialize()` finds the coordinator by itself; elsewhere it
    reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. A process that stops
    answering is noticed within BAM_JAX_HEARTBEAT_TIMEOUT seconds (default: JAX's 100), and the
    others then stop with an error instead of waiting for it.
    """
    multi_host_env = ('JAX_COORDINATOR_ADDRESS' in os.environ
                      or len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1)
    if not (force or multi_host_env):
        return
    kwargs = {}
    for key, env in (('num_processes', 'JAX_NUM_PROCESSES'), ('process_id', 'JAX_PROCESS_ID'),
                     ('heartbeat_timeout_seconds', 'BAM_JAX_HEARTBEAT_TIMEOUT')):
        if os.environ.get(env):
            kwargs[key] = int(os.environ[env])
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise BamJaxError(f'cannot join the multi-process job: {str(e).strip().splitlines()[0]}') from None


def emulate_cpu_devices(count: int) -> None:
    """Makes the CPU look like `count` devices. Must run before JAX initialises its backends."""
    flag = f'--xla_force_host_platform_device_count={count}'
    flags = os.environ.get('XLA_FLAGS', '')
    if 'xla_force_host_platform_device_count' not in flags:
        os.environ['XLA_FLAGS'] = f'{flags} {flag}'.strip()
