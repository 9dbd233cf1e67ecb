"""Hugging Face models in and out: `bam-jax import-hf` and `bam-jax export-hf`.

  families           the standard families' config.json and tensor names (Llama, Mistral, Qwen2,
                     Qwen3; Mixtral, Qwen2-MoE, Qwen3-MoE)
  safetensors_files  weight files read and written one tensor at a time, without torch
  importer           a Hugging Face dense model -> a bam_jax checkpoint directory
  exporter           a bam_jax run -> a Hugging Face model directory
  remote             this project's own Hugging Face model, for what no standard class computes
"""

from bam_jax.hf.exporter import FORMATS, ExportRecord, export_hf
from bam_jax.hf.importer import ImportRecord, import_hf

__all__ = ['FORMATS', 'ExportRecord', 'ImportRecord', 'export_hf', 'import_hf']
