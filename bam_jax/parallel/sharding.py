"""Logical axis names -> mesh axes, in one place.

Every weight carries logical axis names (e.g. ('embed', 'mlp')). The rules below map each
logical name to mesh axes; a mapping is dropped for a dimension it does not divide, so a tiny
test model still runs on a mesh that is too wide for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# logical name -> mesh axes (None: replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('length', None),
    ('vocab', ('tensor',)),
    ('embed', ('fsdp',)),
    ('mlp', ('tensor',)),
    ('q_heads', ('tensor',)),
    ('kv_heads', ('tensor',)),
    ('head_dim', None),
    ('norm', None),
    ('experts', ('expert',)),
    ('route', None),             # a router's expert dimension: small, replicated
)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES) -> P:
    """Maps logical axis names to a PartitionSpec.

    With `shape` and `mesh`, mesh axes that do not divide their dimension (or that an earlier
    dimension already uses) are left out, so the spec is always valid.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        kept = []
        for axis in axes or ():
            if axis in used:
                continue
            if mesh is not None and shape is not None:
                size = mesh.shape[axis] * int(np.prod([mesh.shape[a] for a in kept]))
                if shape[i] % size:
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*spec)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a weight was created with (empty for scalars)."""
    names = variable.get_metadata().get('out_sharding') or ()
    return tuple(names)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an nnx.State (or pure tree of Variables), from logical names."""
    def one(v):
        return NamedSharding(mesh, logical_to_spec(logical_names(v), v.get_value().shape, mesh))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches shard their leading axis over every data-parallel mesh axis."""
    return NamedSharding(mesh, logical_to_spec(('batch',) + ('length',) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
