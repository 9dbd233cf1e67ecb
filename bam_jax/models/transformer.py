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

from bam_jax.models.attention_kernels import self_attention_mask
from bam_jax.models.config import ModelConfig
from bam_jax.models.layers import Attention, Embed, RMSNorm, SwiGLU, Unembed
from bam_jax.models.lory import LoryFeedForward
from bam_jax.models.moa import MoAttention
from bam_jax.models.moe import MoEFeedForward
from bam_jax.models.params import split_params
from bam_jax.models.routing import record_input


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

    def __call__(self, x, positions, mask, segment_ids, *, train: bool = False, rng=None, prompt_len=None,
                 cache=None):
        """x: [B, T, D] -> [B, T, D]. train and rng reach the routers (capacity, sampling);
        segment_ids ([B, T], 0 = padding) and prompt_len reach a Lory FFN only.
        cache: this layer's decoding cache {'attn': KV cache[, 'ffn': Lory's merged FFN]}
        (bam_jax/generate/cache.py); given one, returns (y, cache)."""
        attn = dict(train=train, rng=_fold(rng, 0))
        ffn = dict(train=train, rng=_fold(rng, 1))
        if isinstance(self.ffn, LoryFeedForward):
            ffn = dict(ffn, segment_ids=segment_ids, prompt_len=prompt_len)
        if cache is not None:
            cache = dict(cache)
            attn['cache'] = cache['attn']
            if 'ffn' in cache:
                ffn['cache'] = cache['ffn']

        def call(layer, name, *args, **kwargs):
            if 'cache' not in kwargs:
                return layer(*args, **kwargs)
            out, cache[name] = layer(*args, **kwargs)
            return out

        if self.parallel:
            h = self.norm(x)
            record_input(self, 'attn_input', h)
            record_input(self, 'ffn_input', h)
            y = x + call(self.attn, 'attn', h, positions, mask, **attn) + call(self.ffn, 'ffn', h, **ffn)
        else:
            h = self.attn_norm(x)
            record_input(self, 'attn_input', h)
            x = x + call(self.attn, 'attn', h, positions, mask, **attn)
            h = self.ffn_norm(x)
            record_input(self, 'ffn_input', h)
            y = x + call(self.ffn, 'ffn', h, **ffn)
        return y if cache is None else (y, cache)


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
                 prompt_len=None, cache=None):
        """tokens: [B, T] int -> float32 logits [B, T, V].

        segment_ids ([B, T], packed documents; default one document) keep documents from
        attending to each other; positions ([B, T]; default 0..T-1) feed RoPE. train selects
        the routers' training behaviour; rng (a key) drives sampled routing. prompt_len (int
        or [B]): Lory layers merge their experts once per row from the first prompt_len tokens
        (inference) instead of per segment; other layers ignore it.
        cache: decoding (bam_jax/generate): one cache per layer; a row's token at position p is
        written to slot p and attends to slots 0..p, so segment_ids only mark padding for Lory.
        Returns (logits, cache) then.
        Routed layers report their losses and metrics to bam_jax.models.routing.call_with_aux.
        """
        out = self.hidden(tokens, segment_ids, positions, train=train, rng=rng, prompt_len=prompt_len, cache=cache)
        if cache is None:
            return self.logits(out)
        return self.logits(out[0]), out[1]

    def hidden(self, tokens, segment_ids=None, positions=None, *, train: bool = False, rng=None,
               prompt_len=None, cache=None):
        """The final normed hidden states [B, T, D] (and the cache, if given): __call__ without
        the output layer, for callers that need the logits of a few positions only."""
        one_document = segment_ids is None  # then a fused kernel needs no document mask
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        mask = self_attention_mask(segment_ids, self.config, one_document) if cache is None else None
        x = self.embed(tokens)
        new_cache = []
        for i, block in enumerate(self.layers):
            kwargs = dict(train=train, rng=_fold(rng, i), prompt_len=prompt_len)
            if cache is None:
                x = block(x, positions, mask, segment_ids, **kwargs)
            else:
                x, layer_cache = block(x, positions, mask, segment_ids, cache=cache[i], **kwargs)
                new_cache.append(layer_cache)
        x = self.final_norm(x)
        return x if cache is None else (x, new_cache)

    def logits(self, x):
        """float32 logits [B, T, V] of final hidden states [B, T, D]."""
        return self.embed.attend(x) if self.config.tie_embeddings else self.unembed(x)


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
