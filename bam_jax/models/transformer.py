"""Decoder-only LM: embeddings, a stack of blocks, final norm, logits.

A block is either the parallel form used by BAM and PaLM, y = x + attn(norm(x)) + ffn(norm(x)),
or the sequential pre-norm form, y = x + attn(norm1(x)); y = y + ffn(norm2(y)).
Its attention is dense or attention experts (ModelConfig.moa), its FFN dense, routed experts
(ModelConfig.moe) or Lory's segment-merged experts (ModelConfig.lory): dense = both dense,
BTX = dense attention + MoE, BAM = MoA + MoE. Every sublayer is called alike
(bam_jax/models/sublayer.py), so a block never asks which kind it holds.
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
from bam_jax.models.sublayer import Context, Sublayer


def sublayers(config: ModelConfig) -> dict[str, type[Sublayer]]:
    """The class of a block's attention and of its FFN."""
    return {'attn': MoAttention if config.moa else Attention,
            'ffn': LoryFeedForward if config.lory else MoEFeedForward if config.moe else SwiGLU}


class Block(nnx.Module):
    """One transformer layer. Parameters: attn/*, ffn/*, and norm (parallel) or attn_norm + ffn_norm."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.parallel = config.parallel_block
        if self.parallel:
            self.norm = RMSNorm(config.d_model, config, rngs=rngs)
        else:
            self.attn_norm = RMSNorm(config.d_model, config, rngs=rngs)
            self.ffn_norm = RMSNorm(config.d_model, config, rngs=rngs)
        layers = sublayers(config)
        self.attn = layers['attn'](config, rngs=rngs)
        self.ffn = layers['ffn'](config, rngs=rngs)

    @staticmethod
    def cache_spec(config: ModelConfig, batch: int, max_len: int) -> dict:
        """A layer's decoding cache, by sublayer: {'attn': its KV cache[, 'ffn': Lory's merged FFN]}."""
        specs = {name: layer.cache_spec(config, batch, max_len) for name, layer in sublayers(config).items()}
        return {name: spec for name, spec in specs.items() if spec is not None}

    @staticmethod
    def cache_axes(config: ModelConfig) -> dict:
        """cache_spec's logical axes, by sublayer and entry."""
        return {name: layer.CACHE_AXES for name, layer in sublayers(config).items() if layer.CACHE_AXES}

    @staticmethod
    def whole_prompt_prefill(config: ModelConfig) -> bool:
        """Whether a sublayer needs each prompt prefilled in one call (Sublayer.WHOLE_PROMPT_PREFILL)."""
        return any(layer.WHOLE_PROMPT_PREFILL for layer in sublayers(config).values())

    def __call__(self, x, context: Context, cache: dict | None = None):
        """x: [B, T, D] -> (y [B, T, D], cache). context: what the sublayers read (each gets its
        own key); cache: this layer's decoding cache (cache_spec's) or None, returned updated."""
        cache = cache or {}
        attn, ffn = context.fold(0), context.fold(1)
        if self.parallel:
            h = self.norm(x)
            record_input(self, 'attn_input', h)
            record_input(self, 'ffn_input', h)
            a, attn_cache = self.attn(h, attn, cache.get('attn'))
            f, ffn_cache = self.ffn(h, ffn, cache.get('ffn'))
            y = x + a + f
        else:
            h = self.attn_norm(x)
            record_input(self, 'attn_input', h)
            a, attn_cache = self.attn(h, attn, cache.get('attn'))
            x = x + a
            h = self.ffn_norm(x)
            record_input(self, 'ffn_input', h)
            f, ffn_cache = self.ffn(h, ffn, cache.get('ffn'))
            y = x + f
        new = {name: c for name, c in (('attn', attn_cache), ('ffn', ffn_cache)) if c is not None}
        return y, new or None


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
        context = Context(positions, mask, segment_ids, train=train, rng=rng, prompt_len=prompt_len)
        x = self.embed(tokens)
        new_cache = []
        for i, block in enumerate(self.layers):
            x, layer_cache = block(x, context.fold(i), None if cache is None else cache[i])
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
