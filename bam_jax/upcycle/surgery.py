"""Expert surgery on a mixed model, as pure functions over flat parameter dicts: remove an expert,
or put a dense run's weights in as an expert (a new one, or in place of one), by the upcycler's
own rules (core.py):

  FFN experts      layers/L/ffn/experts/W [E*C, ...]: a dense run gives its FFN W cut into C
                   chunks along the hidden axis (expert_split C); Lory's merged experts alike
  attention        layers/L/attn/experts/W [E, ...] (BAM): the run's projections of the same
                   names (shared-KV BAM stacks wq, wo and their extras only; K/V stay shared)
  routers          layers/L/{ffn,attn}/router/kernel [D, E(*C)]: the expert's columns
  everything else  unchanged: the averages of the upcycle, trained since, are not recomputed

An expert is named by ModelConfig.expert_names (the run it came from; a model without names calls
them 0, 1, ...). Shapes: D d_model, E experts, C expert_split.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from bam_jax.errors import BamJaxError
from bam_jax.models.config import ModelConfig

_STACKED = re.compile(r'^(layers/\d+/(ffn|attn))/experts/(\w+)$')
_ROUTER = re.compile(r'^(layers/\d+/(ffn|attn))/router/kernel$')
_FFN_HIDDEN_AXIS = {'wi_gate': 1, 'wi_up': 1, 'wo': 0}  # of each dense FFN weight: wi_* [D, F], wo [F, D]


def names(config: ModelConfig) -> list[str]:
    """The experts' names, in router order (one per input model: an FFN's C chunks share one)."""
    layer = config.moe or config.lory or config.moa
    if layer is None:
        raise BamJaxError('the model has no experts: expert surgery needs a mixed model (BTX, BAM, Lory)')
    return list(config.expert_names) or [str(e) for e in range(layer.num_experts)]


def index_of(config: ModelConfig, name: str) -> int:
    known = names(config)
    if name not in known:
        raise BamJaxError(f"no expert named {name!r}; the model's experts are {', '.join(known)}")
    return known.index(name)


def _split(config: ModelConfig, kind: str) -> int:
    """Columns (and stacked rows) per expert in a layer of `kind`: expert_split for MoE FFNs."""
    return config.moe.expert_split if kind == 'ffn' and config.moe else 1


def _resized(config: ModelConfig, names_after: list[str]) -> ModelConfig:
    """config with len(names_after) experts in every expert layer; a top_k above what is left
    comes down to it."""
    layers = {}
    for field in ('moe', 'moa', 'lory'):
        layer = getattr(config, field)
        if layer is not None:
            changes = {'num_experts': len(names_after)}
            if hasattr(layer, 'top_k'):
                changes['top_k'] = min(layer.top_k, len(names_after) * getattr(layer, 'expert_split', 1))
            layers[field] = dataclasses.replace(layer, **changes)
    return dataclasses.replace(config, **layers, expert_names=tuple(names_after))


def remove_expert(params: dict, config: ModelConfig, name: str) -> tuple[dict, ModelConfig]:
    """(params, config) without expert `name`: its FFN (and attention expert) and its router
    columns gone from every layer. A top_k above the experts left comes down to their number."""
    index, known = index_of(config, name), names(config)
    if len(known) == 1:
        raise BamJaxError(f'{name!r} is the only expert left; a mixed model needs one at least')
    out = {}
    for path, value in params.items():
        stacked, router = _STACKED.match(path), _ROUTER.match(path)
        if stacked or router:
            c = _split(config, (stacked or router).group(2))
            axis = 0 if stacked else 1
            value = np.delete(value, np.arange(index * c, (index + 1) * c), axis=axis)
        out[path] = value
    return out, _resized(config, known[:index] + known[index + 1:])


def expert_slices(params: dict, config: ModelConfig, dense: dict) -> dict[str, np.ndarray]:
    """{stacked path: the dense run's rows for it [C or 1, ...]}: its FFN cut into C chunks, its
    attention projections (BAM). Raises on a run of another shape."""
    slices = {}
    for path in params:
        match = _STACKED.match(path)
        if not match:
            continue
        site, kind, weight = match.groups()
        source = f'{site}/{weight}'
        if source not in dense:
            raise BamJaxError(f'the run has no {source}: it is not a dense model of the mixed model\'s shape')
        c = _split(config, kind)
        chunks = np.split(dense[source], c, axis=_FFN_HIDDEN_AXIS[weight]) if kind == 'ffn' else [dense[source]]
        rows = np.stack(chunks).astype(params[path].dtype)
        if rows.shape[1:] != params[path].shape[1:]:
            raise BamJaxError(f'{source} has shape {tuple(dense[source].shape)}, which does not fit '
                              f'{path} {tuple(params[path].shape)}: the run is of another shape')
        slices[path] = rows
    return slices


def insert_expert(params: dict, config: ModelConfig, dense: dict, name: str, position: int,
                  columns: dict[str, np.ndarray]) -> tuple[dict, ModelConfig]:
    """(params, config) with the dense run's weights as expert `name` at `position` (0..E).
    columns: {router kernel path: its router column for the expert [D]} (every router)."""
    known = names(config)
    if name in known:
        raise BamJaxError(f"the model has an expert named {name!r} already; its experts are {', '.join(known)}")
    slices, out = expert_slices(params, config, dense), {}
    for path, value in params.items():
        router = _ROUTER.match(path)
        if path in slices:
            c = len(slices[path])
            value = np.concatenate([value[:position * c], slices[path], value[position * c:]])
        elif router:
            if path not in columns:
                raise BamJaxError(f'no router column given for {path}')
            c = _split(config, router.group(2))
            block = np.repeat(np.asarray(columns[path], value.dtype)[:, None], c, axis=1)
            value = np.concatenate([value[:, :position * c], block, value[:, position * c:]], axis=1)
        out[path] = value
    return out, _resized(config, known[:position] + [name] + known[position:])


def replace_expert(params: dict, config: ModelConfig, name: str, dense: dict, new_name: str,
                   columns: dict[str, np.ndarray]) -> tuple[dict, ModelConfig]:
    """Expert `name` swapped for the dense run's weights, named new_name, in the same place.
    columns: {router kernel path: the expert's new router column [D]} (every router)."""
    index, known = index_of(config, name), names(config)
    if new_name != name and new_name in known:
        raise BamJaxError(f"the model has an expert named {new_name!r} already; its experts are {', '.join(known)}")
    slices, out = expert_slices(params, config, dense), {}
    for path, value in params.items():
        router = _ROUTER.match(path)
        if path in slices or router:
            c = len(slices[path]) if path in slices else _split(config, router.group(2))
            value = np.array(value)
            if path in slices:
                value[index * c:(index + 1) * c] = slices[path]
            else:
                value[:, index * c:(index + 1) * c] = np.asarray(columns[path], value.dtype)[:, None]
        out[path] = value
    return out, dataclasses.replace(config, expert_names=tuple(known[:index] + [new_name] + known[index + 1:]))
