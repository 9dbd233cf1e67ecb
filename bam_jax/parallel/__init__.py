"""Mesh, logical axis rules and sharding helpers."""

from bam_jax.parallel.mesh import MESH_AXES, MeshConfig, create_mesh, emulate_cpu_devices, maybe_initialize_distributed
from bam_jax.parallel.sharding import (
                                   LOGICAL_AXIS_RULES,
                                   batch_sharding,
                                   logical_names,
                                   logical_to_spec,
                                   replicated,
                                   state_shardings,
)
