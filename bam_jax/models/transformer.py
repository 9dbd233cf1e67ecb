"""Decoder-only LM: embeddings, a stack of blocks, final norm, logits.

A block is either the parallel form used by BAM and PaLM, y = x + attn(norm(x)) + ffn(norm(x)),
or the sequential pre-norm form, y = x + attn(norm1(x)); y = y + ffn(norm2(y)).
Its attention is dense or attention experts (ModelConfig.moa), its FFN dense, routed experts
(ModelConfig.moe) or Lory's segment-merged experts (ModelConfig.lory): dense = both dense,
BTX = dense attention + MoE, BAM = MoA + MoE.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bam_jax.models.config import ModelConfig
from bam_jax.models.layers import Attention, Embed, RMSNorm, SwiGLU, Unembed, attention_mask
from bam_jax.models.lory import LoryFeedForward
from bam_jax.models.moa import MoAttention
from bam_jax.models.moe import MoEFeedForward
from bam_jax.models.params import split_params


def _fold(rng, i: int):
    """An independent key per layer and sub-layer (None stays None: deterministic routing)."""
    return None if rng is None else jax.random.fold_in(rng, i)


class Block(nnx.Module):
    """One transformer layer. Parameters: attn/*, ffn/*, and norm (parallel) or attn_norm + ffn_norm."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.parallel = config.parallel_block
        if self.parallel:
            self.norm = RMSNorm(config.d_model, config, rngs=rngs)
        else:
            self.attn_norm = RMSNorm(config.d_model, config, rngs=rngs)
            self.ffn_norm = RMSNorm(config.d_model, config, rngs=rngs)
        self.attn = MoAttention(config, rngs=rngs) if config.moa else Attention(config, rngs=rngs)
        if config.lory:
            self.ffn = LoryFeedForward(config, rngs=rngs)
        elif config.moe:
            self.ffn = MoEFeedForward(config, rngs=rngs)
        else:
            self.ffn = SwiGLU(config, rngs=rngs)

    def __call__(self, x, positions, mask, segment_ids, *, train: bool = False, rng=None, prompt_len=None):
        """x: [B, T, D] -> [B, T, D]. train and rng reach the routers (capacity, sampling);
        segment_ids ([B, T], 0 = padding) and prompt_len reach a Lory FFN only."""
        attn = dict(train=train, rng=_fold(rng, 0))
        ffn = dict(train=train, rng=_fold(rng, 1))
        if isinstance(self.ffn, LoryFeedForward):
            ffn = dict(ffn, segment_ids=segment_ids, prompt_len=prompt_len)
        if self.parallel:
            h = self.norm(x)
            return x + self.attn(h, positions, mask, **attn) + self.ffn(h, **ffn)
        x = x + self.attn(self.attn_norm(x), positions, mask, **attn)
        return x + self.ffn(self.ffn_norm(x), **ffn)


class DecoderLM(nnx.Module):
    """The dense language model. Parameters: embed, layers/{i}, final_norm, unembed (if untied)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config, rngs=rngs)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, config, rngs=rngs)
        if not config.tie_embeddings:
            self.unembed = Unembed(config, rngs=rngs)

    def __call__(self, tokens, segment_ids=None, positions=None, *, train: bool = False, rng=None,
                 prompt_len=None):
        """tokens: [B, T] int -> float32 logits [B, T, V].

        segment_ids ([B, T], packed documents; default one document) keep documents from
        attending to each other; positions ([B, T]; default 0..T-1) feed RoPE. train selects
        the routers' training behaviour; rng (a key) drives sampled routing. prompt_len (int
        or [B]): Lory layers merge their experts once per row from the first prompt_len tokens
        (inference) instead of per segment; other layers ignore it.
        Routed layers report their losses and metrics to bam_jax.models.routing.call_with_aux.
        """
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        mask = attention_mask(segment_ids)
        x = self.embed(tokens)
        for i, block in enumerate(self.layers):
            x = block(x, positions, mask, segment_ids, train=train, rng=_fold(rng, i), prompt_len=prompt_len)
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            return self.embed.attend(x)
        return self.unembed(x)


def build_model(config: ModelConfig, seed: int = 0) -> DecoderLM:
    return DecoderLM(config, rngs=nnx.Rngs(params=seed))


def init_params(config: ModelConfig, seed: int, shardings=None):
    """Fresh random weights as a parameter dict, created directly in place on the mesh."""
    return jax.jit(lambda: split_params(build_model(config, seed))[1], out_shardings=shardings)()


def abstract_model(config: ModelConfig) -> DecoderLM:
    """The model with ShapeDtypeStructs instead of arrays: builds any size without memory."""
    return nnx.eval_shape(lambda: build_model(config))


def count_params(model: nnx.Module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
