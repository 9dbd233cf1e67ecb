"""Model FLOPs per token (the MFU convention: matmuls only, no rematerialisation).

Expert layers count what runs for a token: a routed FFN its k chosen experts (all E for soft
routing) plus the router; attention experts all N experts, since the wide attention computes
every expert's heads and top-k only zeroes gates. Dispatch (gathers, all_to_all) and the slots
a capacity leaves empty are overhead, not model FLOPs; so are dropless training's padded buffers,
which therefore counts what the capacity path does. A Lory FFN runs one merged FFN per token;
its router (on one mean per segment) and the merge of the E experts' weights (once per segment)
are counted per token as their per-segment cost divided by the segment length T, as if the
sequence were a whole number of segments.
"""

from __future__ import annotations

from bam_jax.models.config import ModelConfig


def attention_matmul_params(config: ModelConfig) -> int:
    """Per layer: wq, wo for every query head; wk, wv for every K/V head; the router."""
    d, h, k, dh = config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim
    if config.moa is None:
        return 2 * d * h * dh + 2 * d * k * dh
    n = config.moa.num_experts
    kv_sets = 1 if config.moa.shared_kv else n
    return n * 2 * d * h * dh + kv_sets * 2 * d * k * dh + d * n


def ffn_matmul_params(config: ModelConfig) -> float:
    """Per layer: wi_gate, wi_up, wo of every expert a token goes to; the router.

    Lory: one merged FFN, plus (router d*E + merge E*3*d*f multiply-adds) / T.
    """
    d, f = config.d_model, config.d_ff
    if config.lory is not None:
        lory = config.lory
        return 3 * d * f + (d * lory.num_experts + lory.num_experts * 3 * d * f) / lory.segment_len
    if config.moe is None:
        return 3 * d * f
    moe = config.moe
    return moe.experts_per_token * 3 * d * (f // moe.expert_split) + d * moe.num_routed_experts


def lory_merge_overhead(config: ModelConfig) -> float:
    """The Lory merge's FLOPs over the merged FFN's (0 without Lory): E*3*d*f per segment of T
    tokens against 3*d*f per token, E / T. The router adds d*E/T, 1 / (3F) of the merge."""
    if config.lory is None:
        return 0.0
    return config.lory.num_experts / config.lory.segment_len


def matmul_params(config: ModelConfig) -> float:
    """Weights that take part in a matmul per token (the embedding lookup does not; the unembedding does)."""
    per_layer = attention_matmul_params(config) + ffn_matmul_params(config)
    return config.num_layers * per_layer + config.d_model * config.vocab_size


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """2 FLOPs per multiply-add of every matmul, plus attention scores and values over the
    whole sequence for every query head (PaLM's convention: the causal half is not subtracted)."""
    query_heads = config.num_heads * (config.moa.num_experts if config.moa else 1)
    attention_scores = 2 * 2 * seq_len * query_heads * config.resolved_head_dim
    return 2 * matmul_params(config) + config.num_layers * attention_scores


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward plus backward (twice the forward)."""
    return 3 * forward_flops_per_token(config, seq_len)
