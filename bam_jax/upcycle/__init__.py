"""The Mix step: dense experts in, an MoE out. core.py is the pure function, io.py streams it
between checkpoints."""

from bam_jax.upcycle.core import METHODS, Recipe, UpcycleSpec, build, model_config, plan, upcycle
from bam_jax.upcycle.io import UpcycleSummary, upcycle_checkpoints

__all__ = ['METHODS', 'Recipe', 'UpcycleSpec', 'UpcycleSummary', 'build', 'model_config', 'plan', 'upcycle',
           'upcycle_checkpoints']
