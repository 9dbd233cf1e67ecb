"""A bam_jax model as Hugging Face remote code: modeling_bam_jax.py, a PyTorch model computing what
bam_jax computes at inference (every architecture: dense, BTX, BAM with expert or shared K/V,
Lory), and configuration_bam_jax.py, its config class.

An export ships both files next to model.safetensors and config.json, and is read with
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`. The model's parameter names
are the bam_jax checkpoint paths with '/' replaced by '.', shapes unchanged.

This module imports neither torch nor transformers (the two files it copies do; they never import
bam_jax).
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from etils import epath

if TYPE_CHECKING:
    from bam_jax.models.config import ModelConfig

FILES = ('configuration_bam_jax.py', 'cache_bam_jax.py', 'modeling_bam_jax.py')
ARCHITECTURE = 'BamJaxForCausalLM'
AUTO_MAP = {'AutoConfig': 'configuration_bam_jax.BamJaxConfig',
            'AutoModelForCausalLM': 'modeling_bam_jax.BamJaxForCausalLM'}


def copy_code(out_dir) -> list[epath.Path]:
    """Copies FILES into out_dir (created if missing; a local path or a URI). Returns the copies' paths."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    here = pathlib.Path(__file__).parent
    for name in FILES:
        (out / name).write_bytes((here / name).read_bytes())
    return [out / name for name in FILES]


def config_dict(model_config: ModelConfig, **token_ids: Any) -> dict[str, Any]:
    """config.json of an export of a model of `model_config`.

    token_ids: bos_token_id, eos_token_id, pad_token_id, and any other standard key given
    (max_position_embeddings, ...), written as they are. The model is built from the `bam_jax`
    entry (ModelConfig.to_dict()); the standard keys repeat it for the tools that read them.
    """
    return {
        'model_type': 'bam_jax',
        'architectures': [ARCHITECTURE],
        'auto_map': dict(AUTO_MAP),
        'bam_jax': model_config.to_dict(),
        'vocab_size': model_config.vocab_size,
        'hidden_size': model_config.d_model,
        'num_hidden_layers': model_config.num_layers,
        'num_attention_heads': model_config.num_heads,
        'num_key_value_heads': model_config.num_kv_heads,
        'head_dim': model_config.resolved_head_dim,
        'intermediate_size': model_config.d_ff,
        'rms_norm_eps': model_config.norm_eps,
        'tie_word_embeddings': model_config.tie_embeddings,
        'max_position_embeddings': 2048,
        **token_ids,
    }
