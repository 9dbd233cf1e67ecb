"""Model FLOPs per token (the MFU convention: matmuls only, no rematerialisation)."""

from __future__ import annotations

from bam_jax.models.config import ModelConfig


def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a matmul per token (the embedding lookup does not; the unembedding does)."""
    d, h, k, dh, f = (config.d_model, config.num_heads, config.num_kv_heads,
                      config.resolved_head_dim, config.d_ff)
    attention = d * h * dh * 2 + d * k * dh * 2   # wq, wo; wk, wv
    ffn = 3 * d * f                               # wi_gate, wi_up, wo
    return config.num_layers * (attention + ffn) + d * config.vocab_size


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """2 FLOPs per multiply-add of every matmul, plus attention scores and values over the
    whole sequence (PaLM's convention: the causal half is not subtracted)."""
    attention_scores = 2 * 2 * seq_len * config.num_heads * config.resolved_head_dim
    return 2 * matmul_params(config) + config.num_layers * attention_scores


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward plus backward (twice the forward)."""
    return 3 * forward_flops_per_token(config, seq_len)
