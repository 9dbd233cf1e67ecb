"""A model's architecture as gin bindings, so `bam-jax train --gin_file=OUT/model.gin ...` rebuilds
it. Routing and the other settings are left to the run's gin files (gin/routing/*.gin)."""

from __future__ import annotations

import dataclasses

from bam_jax import storage
from bam_jax.models.config import ModelConfig

# Sub-configs of ModelConfig: each is bound as @Kind() or None, so the file says which layers it has.
_EXPERT_LAYERS = {'moe': 'MoEConfig', 'moa': 'MoAConfig', 'lory': 'LoryConfig'}


def _bindings(name: str, config, fields) -> list[str]:
    return [f'{name}.{field} = {getattr(config, field)!r}' for field in fields]


def model_gin(config: ModelConfig, checkpoint: storage.Path, written_by: str,
              tokenizer: storage.Path | None = None, routing: bool = False) -> str:
    """ModelConfig's fields and the expert layers' architecture (MoEConfig, MoAConfig,
    LoryConfig; with `routing`, their routing settings too: a trained model's), INIT_CHECKPOINT,
    and the model's Hugging Face tokenizer (if it has one: the vocabulary its data must be read
    with), as a gin file's text."""
    lines = [f'# Written by `{written_by}`: the model and the checkpoint that initialises it.',
             '# Routing comes from the run file: bam-jax train --gin_file=THIS --gin_file=gin/mix_<method>.gin ...'
             if not routing else '# With the routing it was trained with; a run file may set another.',
             *_bindings('ModelConfig', config, [f.name for f in dataclasses.fields(config)
                                                if f.name not in _EXPERT_LAYERS])]
    for field, kind in _EXPERT_LAYERS.items():
        sub = getattr(config, field)
        lines.append(f'ModelConfig.{field} = {f"@{kind}()" if sub else None}')
        if sub:
            lines += _bindings(kind, sub, [f.name for f in dataclasses.fields(sub)] if routing else sub.ARCHITECTURE)
    lines.append(f'INIT_CHECKPOINT = {str(checkpoint)!r}')
    if tokenizer is not None:
        lines.append(f'DataConfig.tokenizer_path = {str(tokenizer)!r}')
    return '\n'.join(lines) + '\n'
