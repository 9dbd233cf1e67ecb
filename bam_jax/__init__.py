"""bam_jax: Branch-Train-Mix mixture-of-experts in JAX/Flax."""

__version__ = "0.1.0"
