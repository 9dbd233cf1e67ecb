"""Flax NNX models. Weights carry logical axis names; the mesh placement is done by the trainer."""

from flax import nnx

# Weights are created unplaced and placed by jit's out_shardings (bam_jax/parallel), so the
# same model code builds on one CPU, an emulated mesh, or a pod.
nnx.use_eager_sharding(False)

from bam_jax.models.config import ModelConfig  # noqa: E402
from bam_jax.models.params import flatten, merge_params, param_logical_names, param_shardings, split_params  # noqa: E402
from bam_jax.models.transformer import Block, DecoderLM, abstract_model, build_model, count_params, init_params  # noqa: E402
