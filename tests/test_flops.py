"""FLOPs per token against hand computations for the tiny model's dense, BTX and BAM forms."""

import pytest

from bam_jax.models import ModelConfig
from bam_jax.models.config import MoAConfig, MoEConfig
from bam_jax.models.flops import forward_flops_per_token, train_flops_per_token

# gin/models/tiny.gin: D 128, 4 layers, H 4, K 2, Dh 32, F 512, V 384 (untied).
TINY = ModelConfig(vocab_size=384, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=512)
SEQ = 64
# Per layer, by hand: wq and wo 128*4*32 = 16384 each, wk and wv 128*2*32 = 8192 each,
# one SwiGLU 3*128*512 = 196608; the unembedding 128*384 = 49152; attention scores and values
# 2 matmuls * 2 FLOPs * 64 positions * 4 heads * 32 = 32768 per layer and query-head set.
CASES = {
    # 2 * (4 * (49152 + 196608) + 49152) + 4 * 32768
    'dense': (TINY, 2_195_456),
    # BTX top-2: two experts' SwiGLU plus a 128x4 router per layer.
    # 2 * (4 * (49152 + 2*196608 + 512) + 49152) + 4 * 32768
    'btx_top2': (ModelConfig(**{**TINY.to_dict(), 'moe': MoEConfig(num_experts=4, top_k=2)}), 3_772_416),
    # BAM: 4 attention experts with their own K/V (4 * 49152 + router 512), top-1 FFN
    # (196608 + 512), and 4 * 4 = 16 query heads of scores.
    # 2 * (4 * (196608 + 512 + 196608 + 512) + 49152) + 4 * 131072
    'bam': (ModelConfig(**{**TINY.to_dict(), 'moe': MoEConfig(num_experts=4),
                           'moa': MoAConfig(num_experts=4)}), 3_776_512),
    # BAM shared K/V: wq, wo per expert (4 * 32768), one wk, wv (16384), router 512.
    # 2 * (4 * (147968 + 197120) + 49152) + 4 * 131072
    'bam_shared_kv': (ModelConfig(**{**TINY.to_dict(), 'moe': MoEConfig(num_experts=4),
                                     'moa': MoAConfig(num_experts=4, shared_kv=True)}), 3_383_296),
    # Soft FFN routing runs all 4 experts: 2 * (4 * (49152 + 4*196608 + 512) + 49152) + 4 * 32768
    'soft_ffn': (ModelConfig(**{**TINY.to_dict(), 'moe': MoEConfig(num_experts=4, routing='soft')}), 6_918_144),
}


@pytest.mark.parametrize('name', list(CASES))
def test_flops_per_token_by_hand(name):
    config, forward = CASES[name]
    assert forward_flops_per_token(config, SEQ) == forward
    assert train_flops_per_token(config, SEQ) == 3 * forward


def test_expert_split_keeps_active_flops_when_k_scales():
    # Splitting each expert in 2 halves its width: top-2 of the split experts costs top-1 of the whole.
    whole = ModelConfig(**{**TINY.to_dict(), 'moe': MoEConfig(num_experts=4, top_k=1)})
    split = ModelConfig(**{**TINY.to_dict(), 'moe': MoEConfig(num_experts=4, top_k=2, expert_split=2)})
    router_difference = 2 * TINY.num_layers * TINY.d_model * (8 - 4)  # the router grows to 8 outputs
    assert forward_flops_per_token(split, SEQ) - forward_flops_per_token(whole, SEQ) == router_difference
