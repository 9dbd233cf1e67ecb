"""Trainer: optimizer, jit-compiled step, Orbax checkpoints, metrics and the loop."""

from bam_jax.train.config import TrainConfig
from bam_jax.train.trainer import train
