"""Parameters as plain nested dicts: the on-disk and in-trainer form of a model.

Keys are strings everywhere (`layers/0/attn/wq`), so a checkpoint reads the same without
the model code, and the upcycler is a pure function over dicts. NNX's own state keys list
items by int; these helpers translate.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from bam_jax.parallel.sharding import logical_names, state_shardings

Params = dict[str, Any]


def _map_keys(tree, fn):
    if isinstance(tree, dict):
        return {fn(k): _map_keys(v, fn) for k, v in tree.items()}
    return tree


def _str_keys(tree):
    return _map_keys(tree, str)


def _nnx_keys(tree):
    return _map_keys(tree, lambda k: int(k) if isinstance(k, str) and k.isdigit() else k)


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
    """(graphdef, params): the model's structure and its weights as a string-keyed dict."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, _str_keys(nnx.to_pure_dict(state))


def merge_params(graphdef: nnx.GraphDef, params: Params) -> nnx.Module:
    """Rebuilds the model from its structure and weights (works under jit and grad)."""
    return nnx.merge(graphdef, _nnx_keys(params))


def param_logical_names(model: nnx.Module) -> Params:
    """For each weight, the tuple of logical axis names it was created with."""
    state = nnx.state(model, nnx.Param)
    names = jax.tree.map(lambda v: nnx.Param(logical_names(v)), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return _str_keys(nnx.to_pure_dict(names))


def param_shardings(model: nnx.Module, mesh: Mesh) -> Params:
    """NamedShardings for every weight, from its logical names (model may be abstract)."""
    shardings = state_shardings(nnx.state(model, nnx.Param), mesh)
    return _str_keys(nnx.to_pure_dict(shardings))


def flatten(tree: Params, prefix: str = '') -> dict[str, Any]:
    """{'layers/0/attn/wq': array, ...}: the checkpoint contract's path names."""
    flat = {}
    for key, value in tree.items():
        path = f'{prefix}{key}'
        if isinstance(value, dict):
            flat.update(flatten(value, path + '/'))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict[str, Any]) -> Params:
    """The inverse of flatten: {'a/b': x, 'a/c': y} -> {'a': {'b': x, 'c': y}}."""
    tree: Params = {}
    for path, value in flat.items():
        *parents, leaf = path.split('/')
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree
