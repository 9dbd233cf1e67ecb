"""A model config as gin bindings, so `bam-jax train --gin_file=OUT/model.gin ...` rebuilds it."""

from __future__ import annotations

import dataclasses
import pathlib

from bam_jax.models.config import ModelConfig

# Sub-configs of ModelConfig: each is bound as @Kind() or None, so the file says which layers it has.
_EXPERT_LAYERS = {'moe': 'MoEConfig', 'moa': 'MoAConfig', 'lory': 'LoryConfig'}


def _bindings(name: str, config, skip=()) -> list[str]:
    return [f'{name}.{f.name} = {getattr(config, f.name)!r}' for f in dataclasses.fields(config)
            if f.name not in skip]


def model_gin(config: ModelConfig, checkpoint: pathlib.Path, written_by: str) -> str:
    """ModelConfig (with its MoEConfig/MoAConfig/LoryConfig) and INIT_CHECKPOINT, as a gin file's text."""
    lines = [f'# Written by `{written_by}`: the model and the checkpoint that initialises it.',
             '# Use with a run file: bam-jax train --gin_file=THIS --gin_file=gin/mix_<method>.gin --workdir=...',
             *_bindings('ModelConfig', config, skip=_EXPERT_LAYERS)]
    for field, kind in _EXPERT_LAYERS.items():
        sub = getattr(config, field)
        lines.append(f'ModelConfig.{field} = {f"@{kind}()" if sub else None}')
        if sub:
            lines += _bindings(kind, sub)
    lines.append(f'INIT_CHECKPOINT = {str(checkpoint)!r}')
    return '\n'.join(lines) + '\n'
