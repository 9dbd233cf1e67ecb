"""A bam_jax language model in PyTorch, computing what bam_jax computes at inference.

Dense, BTX (routed FFN experts), BAM (routed FFN experts and attention experts, with expert or
shared K/V) and Lory (segment-merged FFN experts), in the parallel or the sequential block, as
bam_jax/models builds them from the ModelConfig in `config.bam_jax`. Routed experts run dropless,
as bam_jax's inference does: every token reaches every expert it chose.

Parameters are named by the bam_jax checkpoint paths with '/' replaced by '.', with the same shapes
(nothing transposed): `layers.0.attn.wq` [D, H, Dh] is bam_jax's `layers/0/attn/wq`, so the
exported safetensors load as they are.

Decoding caches, per layer, the keys and values the attention reads (after RoPE), as
[B, heads, S, Dh] in a BamJaxCache (a transformers DynamicCache): K heads for dense, BTX, Lory and
BAM with shared K/V, N*K heads for BAM with expert K/V. A Lory layer also keeps each row's merged
FFN there, chosen from the whole prompt at prefill and used for every later token, as bam_jax's
decode engine does; the cache moves it with the row's keys and values when generate() reorders,
repeats or selects rows (beam search).

This file is copied into the export directory: it imports torch, transformers and the standard
library only. Shapes: B batch, T new tokens, S cached and new tokens, D d_model, H query heads,
K kv heads, G = H / K, Dh head_dim, N attention experts, E FFN experts, F d_ff (of one expert),
V vocab.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_bam_jax import BamJaxCache
from .configuration_bam_jax import BamJaxConfig

NEG_INF = -1e9  # bam_jax's masked score: finite, so a query with no key to read gives no NaN
# The output's cache field: `cache` in transformers 5, `past_key_values` before.
CACHE_FIELD = 'cache' if 'cache' in CausalLMOutputWithPast.__dataclass_fields__ else 'past_key_values'


def weight(*shape):
    """An uninitialised parameter (filled by the checkpoint, or by _init_weights)."""
    return nn.Parameter(torch.empty(*shape))


# ---------------------------------------------------------------------------------------
# Numerics shared by the layers


def rms_norm(x, scale, eps):
    """x / rms(x) * scale over the last axis, in float32; returned in x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * scale.float()).to(x.dtype)


def rope_frequencies(model: dict):
    """RoPE's inverse frequencies [Dh / 2] float32: theta ** (-2i / Dh), then the model's scaling,
    computed in float64.

    'linear' divides them all by the factor; 'llama3' (Llama 3.1) divides those whose wavelength
    exceeds original_max_len / low_freq_factor, keeps those below original_max_len /
    high_freq_factor, and blends linearly (in original_max_len / wavelength) in between.
    """
    half = _head_dim(model) // 2
    inv_freq = model['rope_theta'] ** (-torch.arange(half, dtype=torch.float64) / half)
    kind = model.get('rope_scaling') or 'none'
    factor = model.get('rope_scaling_factor', 1.0)
    if kind == 'linear':
        inv_freq = inv_freq / factor
    elif kind == 'llama3':
        low, high = model['rope_low_freq_factor'], model['rope_high_freq_factor']
        ratio = model['rope_original_max_len'] * inv_freq / (2 * math.pi)  # original length in wavelengths
        smooth = ((ratio - low) / (high - low)).clamp(0.0, 1.0)  # 0: long wavelengths, 1: short
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif kind != 'none':
        raise ValueError(f'rope_scaling={kind!r} is not one of none, linear, llama3')
    return inv_freq.float()


def rope(x, positions, inv_freq):
    """Rotary embedding, rotate-half form. x: [B, T, n, Dh]; positions: [B, T] -> x's shape and dtype."""
    angles = positions.float()[..., None, None] * inv_freq  # [B, T, 1, Dh/2]
    sin, cos = angles.sin(), angles.cos()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attend(q, k, v, mask, gate=None):
    """Grouped-query attention: query head i reads K/V head i // (Hq / Hk).

    q: [B, T, Hq, Dh]; k, v: [B, Hk, S, Dh]; mask: [B, T, S] bool (what each query may read);
    gate: [B, T, Hq] or None, a per-token scale of each head's output. Returns [B, T, Hq, Dh].
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = torch.einsum('btkgd,bksd->bkgts', q.float(), k.float()) / math.sqrt(head_dim)
    scores = scores.masked_fill(~mask[:, None, None], NEG_INF)
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.einsum('bkgts,bksd->btkgd', probs, v).reshape(batch, length, heads, head_dim)
    return out if gate is None else out * gate[..., None].to(out.dtype)


def swiglu(x, wi_gate, wi_up, wo):
    """(silu(x Wg) * (x Wu)) Wo. x: [..., D]; wi_gate, wi_up: [D, F]; wo: [F, D]."""
    return (F.silu(x @ wi_gate) * (x @ wi_up)) @ wo


def route(logits, routed: dict):
    """The experts each token uses and their gates, as bam_jax's inference routes.

    logits: [..., E] float32; routed: the MoEConfig or MoAConfig dict. Returns (index [..., k],
    gate [..., k] float32). top_k keeps the k highest logits, weighted by their softmax over all
    experts ('softmax') or over the k kept logits ('renormalize'); sample_top1 is the arg-max at
    inference; soft uses every expert, weighted by the softmax.
    """
    probs = logits.softmax(dim=-1)
    if routed['routing'] == 'soft':
        return torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape), probs
    kept, index = logits.topk(1 if routed['routing'] == 'sample_top1' else routed['top_k'], dim=-1)
    gate = kept.softmax(dim=-1) if routed['gate'] == 'renormalize' else probs.gather(-1, index)
    return index, gate


def dense_gates(index, gate, num_experts: int):
    """route's gates as [..., E], zero for the experts a token does not use."""
    return torch.zeros(*gate.shape[:-1], num_experts, dtype=gate.dtype, device=gate.device).scatter(-1, index, gate)


def masked_mean(x, mask, dim: int):
    """Mean of x over `dim` where mask [x's leading dims] is set, float32; zero where none is."""
    mask = mask.float().reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return (x.float() * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


@dataclasses.dataclass
class Step:
    """What every layer of one forward pass reads.

    positions: [B, T] RoPE positions of the new tokens; mask: [B, T, S] bool, the keys each new
    token reads; real: [B, T] bool, the new tokens that are not padding (Lory's means skip the
    rest); inv_freq: RoPE's [Dh / 2]; cache: a transformers Cache or None. lory: what a Lory
    layer does: 'segments' (bam_jax's call without prompt_len), 'prefill' (one merge from these
    tokens, the prompt, kept in the cache) or 'decode' (the merge the cache holds).
    """
    positions: torch.Tensor
    mask: torch.Tensor
    real: torch.Tensor
    inv_freq: torch.Tensor
    cache: object = None
    lory: str = 'segments'


def cached(step: Step, layer: int, k, v):
    """The keys and values to attend to, [B, heads, S, Dh]: k, v [B, T, heads, Dh] appended to
    the layer's cache, or alone without one."""
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    return (k, v) if step.cache is None else step.cache.update(k, v, layer)


# ---------------------------------------------------------------------------------------
# Layers


def _head_dim(model: dict) -> int:
    return model.get('head_dim') or model['d_model'] // model['num_heads']


class RMSNorm(nn.Module):
    """scale [D]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = weight(dim)

    def forward(self, x):
        return rms_norm(x, self.scale, self.eps)


class Router(nn.Module):
    """logits = x @ kernel in float32. kernel [D, E]."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.kernel = weight(d_model, num_experts)

    def forward(self, x):
        return x.float() @ self.kernel.float()


def add_projections(module: nn.Module, model: dict, experts: int | None = None, q: bool = True, kv: bool = True):
    """Registers one attention's projections on `module`: wq [(N,) D, H, Dh], wo [(N,) H, Dh, D]
    (q), wk and wv [(N,) D, K, Dh] (kv), with the biases bq [(N,) H, Dh], bk and bv [(N,) K, Dh]
    (qkv_bias) and the norm scales q_norm, k_norm [(N,) Dh] (qk_norm). The leading N is for
    attention experts; with shared K/V the experts hold the query side and the layer the K/V side.
    """
    d, h, k, dh = model['d_model'], model['num_heads'], model['num_kv_heads'], _head_dim(model)
    n = () if experts is None else (experts,)
    bias, norm = model.get('qkv_bias', False), model.get('qk_norm', False)
    shapes = {}
    if q:
        shapes.update(wq=(*n, d, h, dh), wo=(*n, h, dh, d), bq=(*n, h, dh) if bias else None,
                      q_norm=(*n, dh) if norm else None)
    if kv:
        shapes.update(wk=(*n, d, k, dh), wv=(*n, d, k, dh), bk=(*n, k, dh) if bias else None,
                      bv=(*n, k, dh) if bias else None, k_norm=(*n, dh) if norm else None)
    for name, shape in shapes.items():
        if shape is not None:
            module.register_parameter(name, weight(*shape))


def project(module: nn.Module, x, name: str, eps: float):
    """x [B, T, D] through module's w{name}, then b{name} and {name}_norm where they exist
    (add_projections' parameters). Returns [B, T, (N,) heads, Dh]."""
    w = getattr(module, f'w{name}')
    y = torch.einsum('btd,nd...->btn...' if w.dim() == 4 else 'btd,d...->bt...', x, w.to(x.dtype))
    bias = getattr(module, f'b{name}', None)
    if bias is not None:
        y = y + bias.to(y.dtype)
    scale = getattr(module, f'{name}_norm', None)
    if scale is not None:  # RMSNorm of every head over Dh; an expert's scale serves all its heads
        y = rms_norm(y, scale[:, None] if scale.dim() == 2 else scale, eps)
    return y


class Attention(nn.Module):
    """Dense grouped-query attention with RoPE: add_projections' parameters."""

    def __init__(self, model: dict, index: int):
        super().__init__()
        self.index, self.eps = index, model['norm_eps']
        add_projections(self, model)

    def forward(self, x, step: Step):
        q = rope(project(self, x, 'q', self.eps), step.positions, step.inv_freq)
        k = rope(project(self, x, 'k', self.eps), step.positions, step.inv_freq)
        k, v = cached(step, self.index, k, project(self, x, 'v', self.eps))
        out = attend(q, k, v, step.mask)
        return torch.einsum('bthx,hxd->btd', out, self.wo.to(x.dtype))


class AttentionExperts(nn.Module):
    """The experts' stacked projections (add_projections with a leading N)."""

    def __init__(self, model: dict, kv: bool):
        super().__init__()
        add_projections(self, model, model['moa']['num_experts'], kv=kv)


class MoAttention(nn.Module):
    """Attention experts (BAM): N experts of H query heads, gated per token by the router.

    out = sum_j g_j Wo_j(heads_j(x)): one attention with N*H query heads, each head's output
    scaled by its expert's gate. Expert K/V: expert j's heads read its own K heads (N*K K/V heads).
    Shared K/V: all N*H query heads read the layer's K heads, as grouped-query attention.
    Parameters: router.kernel [D, N], experts.*, and with shared K/V the layer's own wk, wv (bk,
    bv, k_norm).
    """

    def __init__(self, model: dict, index: int):
        super().__init__()
        self.moa, self.index, self.eps = model['moa'], index, model['norm_eps']
        self.shared = bool(self.moa['shared_kv'])
        self.router = Router(model['d_model'], self.moa['num_experts'])
        self.experts = AttentionExperts(model, kv=not self.shared)
        if self.shared:
            add_projections(self, model, q=False)

    def forward(self, x, step: Step):
        index, gate = route(self.router(x), self.moa)
        gates = dense_gates(index, gate, self.moa['num_experts'])  # [B, T, N]
        q = project(self.experts, x, 'q', self.eps)  # [B, T, N, H, Dh]
        batch, length, n, heads, head_dim = q.shape
        wo = self.experts.wo.to(x.dtype)
        if not self.shared:
            # Heads ordered (expert, head): query head j*H + h reads K/V head j*K + h // G.
            k = project(self.experts, x, 'k', self.eps).reshape(batch, length, -1, head_dim)
            v = project(self.experts, x, 'v', self.eps).reshape(batch, length, -1, head_dim)
            q = rope(q.reshape(batch, length, n * heads, head_dim), step.positions, step.inv_freq)
            k, v = cached(step, self.index, rope(k, step.positions, step.inv_freq), v)
            out = attend(q, k, v, step.mask, gates.repeat_interleave(heads, dim=-1))
            return torch.einsum('btnhx,nhxd->btd', out.reshape(batch, length, n, heads, head_dim), wo)
        # Heads ordered (K/V head, expert, head of its group): each K/V head's readers are contiguous.
        kv = self.wk.shape[1]
        group = heads // kv
        q = q.reshape(batch, length, n, kv, group, head_dim).transpose(2, 3)  # [B, T, K, N, G, Dh]
        head_gates = gates[:, :, None, :, None].expand(q.shape[:-1]).reshape(batch, length, -1)
        q = rope(q.reshape(batch, length, -1, head_dim), step.positions, step.inv_freq)
        k = rope(project(self, x, 'k', self.eps), step.positions, step.inv_freq)
        k, v = cached(step, self.index, k, project(self, x, 'v', self.eps))
        out = attend(q, k, v, step.mask, head_gates).reshape(batch, length, kv, n, group, head_dim)
        return torch.einsum('btkngx,nkgxd->btd', out, wo.reshape(n, kv, group, head_dim, -1))


class SwiGLU(nn.Module):
    """The dense FFN: wi_gate, wi_up [D, F], wo [F, D]."""

    def __init__(self, model: dict):
        super().__init__()
        d, f = model['d_model'], model['d_ff']
        self.wi_gate, self.wi_up, self.wo = weight(d, f), weight(d, f), weight(f, d)

    def forward(self, x, step: Step):
        return swiglu(x, self.wi_gate.to(x.dtype), self.wi_up.to(x.dtype), self.wo.to(x.dtype))


class SwiGLUExperts(nn.Module):
    """E stacked SwiGLU FFNs: wi_gate, wi_up [E, D, F], wo [E, F, D]."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.wi_gate, self.wi_up = weight(num_experts, d_model, d_ff), weight(num_experts, d_model, d_ff)
        self.wo = weight(num_experts, d_ff, d_model)

    def one(self, e: int, x):
        """Expert e on rows x [n, D]."""
        return swiglu(x, self.wi_gate[e].to(x.dtype), self.wi_up[e].to(x.dtype), self.wo[e].to(x.dtype))


class MoEFeedForward(nn.Module):
    """Routed SwiGLU experts (BTX, BAM), dropless: each token's output is the gate-weighted sum of
    its chosen experts' outputs. With expert_split C there are num_experts * C experts of width
    d_ff / C. Parameters: router.kernel [D, E], experts.*."""

    def __init__(self, model: dict):
        super().__init__()
        self.moe = model['moe']
        split = self.moe.get('expert_split', 1)
        self.num_experts = self.moe['num_experts'] * split
        self.router = Router(model['d_model'], self.num_experts)
        self.experts = SwiGLUExperts(self.num_experts, model['d_model'], model['d_ff'] // split)

    def forward(self, x, step: Step):
        rows = x.reshape(-1, x.shape[-1])
        index, gate = route(self.router(rows), self.moe)  # [B*T, k]
        y = torch.zeros(rows.shape, dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):  # each expert on the rows that chose it
            token, choice = (index == e).nonzero(as_tuple=True)
            if token.numel():
                out = self.experts.one(e, rows[token]).float() * gate[token, choice, None]
                y.index_add_(0, token, out)
        return y.to(x.dtype).reshape(x.shape)


class LoryFeedForward(nn.Module):
    """Lory's merged experts: one SwiGLU whose weights are the experts' averaged by a router softmax.

    Without a cache every segment of segment_len tokens uses the merge routed from the previous
    segment's mean hidden state (the first from its own); segments count from the first slot, so
    they are bam_jax's for unpadded or right-padded rows. At prefill one merge per row, routed from
    the mean of the whole prompt, serves every position, and is kept in the cache for the tokens
    that follow. Parameters: router.kernel [D, E], experts.* [E, D, F], [E, F, D].
    """

    def __init__(self, model: dict, index: int):
        super().__init__()
        self.lory, self.index = model['lory'], index
        self.router = Router(model['d_model'], self.lory['num_experts'])
        self.experts = SwiGLUExperts(self.lory['num_experts'], model['d_model'], model['d_ff'])

    def merge(self, logits, dtype):
        """The experts' weights averaged by softmax(logits [B, S, E]) in float32: [B, S, D, F], ..."""
        merge = logits.softmax(dim=-1)
        return tuple(torch.einsum('bse,e...->bs...', merge, w.float()).to(dtype)
                     for w in (self.experts.wi_gate, self.experts.wi_up, self.experts.wo))

    @staticmethod
    def run(x, merged):
        """Each (row, segment)'s own SwiGLU. x: [B, S, T, D] -> [B, S, T, D]."""
        wi_gate, wi_up, wo = merged
        hidden = F.silu(torch.einsum('bstd,bsdf->bstf', x, wi_gate)) * torch.einsum('bstd,bsdf->bstf', x, wi_up)
        return torch.einsum('bstf,bsfd->bstd', hidden, wo)

    def forward(self, x, step: Step):
        batch, length, d = x.shape
        store = None if step.cache is None else step.cache.lory  # forward made sure it is a BamJaxCache
        if step.lory == 'decode':
            return self.run(x[:, None], store[self.index])[:, 0]
        if store is not None:  # the merge the tokens that follow will use
            logits = self.router(masked_mean(x, step.real, dim=1))[:, None]  # [B, 1, E]
            store[self.index] = merged = self.merge(logits, x.dtype)
            if step.lory == 'prefill':
                return self.run(x[:, None], merged)[:, 0]
        t = self.lory['segment_len']
        segments = -(-length // t)
        pad = segments * t - length
        x_seg = F.pad(x, (0, 0, 0, pad)).reshape(batch, segments, t, d)
        real = F.pad(step.real, (0, pad)).reshape(batch, segments, t)
        logits = self.router(masked_mean(x_seg, real, dim=2))  # [B, S, E]
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # segment k merges by segment k-1
        return self.run(x_seg, self.merge(logits, x.dtype)).reshape(batch, -1, d)[:, :length]


class Block(nn.Module):
    """One layer: x + attn(norm(x)) + ffn(norm(x)) (parallel), or x + attn(attn_norm(x)) followed
    by + ffn(ffn_norm(.)) (sequential)."""

    def __init__(self, model: dict, index: int):
        super().__init__()
        self.parallel = bool(model['parallel_block'])
        d, eps = model['d_model'], model['norm_eps']
        if self.parallel:
            self.norm = RMSNorm(d, eps)
        else:
            self.attn_norm, self.ffn_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.attn = MoAttention(model, index) if model.get('moa') else Attention(model, index)
        if model.get('lory'):
            self.ffn = LoryFeedForward(model, index)
        elif model.get('moe'):
            self.ffn = MoEFeedForward(model)
        else:
            self.ffn = SwiGLU(model)

    def forward(self, x, step: Step):
        if self.parallel:
            h = self.norm(x)
            return x + self.attn(h, step) + self.ffn(h, step)
        x = x + self.attn(self.attn_norm(x), step)
        return x + self.ffn(self.ffn_norm(x), step)


class Embed(nn.Module):
    """embedding [V, D]."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.embedding = weight(vocab_size, d_model)

    def forward(self, tokens):
        return self.embedding[tokens]


class Unembed(nn.Module):
    """kernel [D, V] (untied output layer)."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.kernel = weight(d_model, vocab_size)


# ---------------------------------------------------------------------------------------
# The transformers model


class BamJaxPreTrainedModel(PreTrainedModel):
    config_class = BamJaxConfig
    base_model_prefix = 'bam_jax'  # no such submodule: checkpoint keys are used as they are
    main_input_name = 'input_ids'
    _no_split_modules = ['Block']

    def _init_weights(self, module):
        """Weights a checkpoint did not give: norm scales 1, biases 0, the rest N(0, init_std)."""
        std = self.config.bam_jax.get('init_std', 0.02)
        with torch.no_grad():
            for name, param in module.named_parameters(recurse=False):
                if name in ('scale', 'q_norm', 'k_norm'):
                    param.fill_(1.0)
                elif name in ('bq', 'bk', 'bv'):
                    param.zero_()
                else:
                    param.normal_(0.0, std)


class BamJaxForCausalLM(BamJaxPreTrainedModel, GenerationMixin):
    """The language model: embed, layers.{i}, final_norm, unembed (absent when tied).

    forward returns float32 logits. Positions are 0, 1, ... from the first token (after a
    cache's tokens); with a 2D attention_mask they count the unmasked tokens only, so
    left-padded rows start at 0 too and nothing reads padding. cache_class is the cache it
    decodes with (and makes when given none): `model.cache_class()` to pass one.
    """

    cache_class = BamJaxCache

    def __init__(self, config: BamJaxConfig):
        super().__init__(config)
        model = config.bam_jax
        if not model:
            raise ValueError('BamJaxConfig.bam_jax is empty: it must hold the bam_jax ModelConfig.to_dict()')
        self.model_config = model
        self.embed = Embed(model['vocab_size'], model['d_model'])
        self.layers = nn.ModuleList(Block(model, i) for i in range(model['num_layers']))
        self.final_norm = RMSNorm(model['d_model'], model['norm_eps'])
        if not model['tie_embeddings']:
            self.unembed = Unembed(model['d_model'], model['vocab_size'])
        self.post_init()
        if any(name.endswith('router.kernel') for name, _ in self.named_parameters()):
            # Routers stay float32 when the model is loaded in half precision, as bam_jax keeps
            # them. Set on the instance, after post_init: transformers rejects names a model lacks.
            self._keep_in_fp32_modules = {'router'}
            self._keep_in_fp32_modules_strict = {'router'}

    def get_input_embeddings(self):
        return self.embed

    def logits(self, x):
        """float32 logits [B, T, V] of final hidden states [B, T, D]."""
        kernel = self.embed.embedding.T if self.model_config['tie_embeddings'] else self.unembed.kernel
        return (x @ kernel.to(x.dtype)).float()

    def step(self, input_ids, attention_mask, position_ids, cache, cache_given: bool) -> Step:
        """The positions, attention mask and padding of the new tokens input_ids [B, T].

        attention_mask: None or [B, S] (1 = a real token), covering the cached tokens and these.
        A query reads the keys at or before its own slot that are real and, with a sliding window
        W, less than W positions behind it. cache_given: the caller passed `cache` (Lory prefills
        or decodes through it; a cache made here only records).
        """
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        total = past + length
        device = input_ids.device
        if attention_mask is None:
            key_real = torch.ones(batch, total, dtype=torch.bool, device=device)
            key_positions = torch.arange(total, device=device).expand(batch, total)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] != total:
                raise ValueError(f'attention_mask must be [batch, {total}] (cached and new tokens), '
                                 f'got {tuple(attention_mask.shape)}')
            key_real = attention_mask.bool()
            key_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        positions = key_positions[:, past:] if position_ids is None else position_ids.expand(batch, length)
        slots = torch.arange(total, device=device)
        mask = key_real[:, None, :] & (slots[None, None, :] <= slots[past:, None])  # [B, T, S]
        window = self.model_config.get('sliding_window') or 0
        if window:
            mask &= key_positions[:, None, :] > positions[:, :, None] - window
        lory = 'segments' if not cache_given else 'decode' if past else 'prefill'
        # Computed per call, not a buffer: models built on the meta device drop non-persistent buffers.
        inv_freq = rope_frequencies(self.model_config).to(device)
        return Step(positions=positions, mask=mask, real=key_real[:, past:], inv_freq=inv_freq, cache=cache,
                    lory=lory)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        """input_ids: [B, T] -> CausalLMOutputWithPast: float32 logits [B, T, V] (the last
        logits_to_keep positions when that is > 0), the cache (use_cache), and the mean
        next-token cross-entropy when labels [B, T] are given (-100: not scored).

        cache (past_key_values before transformers 5): a DynamicCache holding the earlier tokens,
        or None (then a BamJaxCache is made when use_cache). A Lory model merges its experts per
        segment without one; with one, which must be a BamJaxCache, it merges them from the
        tokens of the first call (the prompt) and keeps that merge.
        """
        if input_ids is None:
            raise ValueError('BamJaxForCausalLM takes input_ids (inputs_embeds are not supported)')
        if kwargs.get('inputs_embeds') is not None:
            raise ValueError('BamJaxForCausalLM does not take inputs_embeds')
        cache = cache if cache is not None else past_key_values
        if getattr(cache, 'is_compileable', False):  # fixed-size buffers: the masks here span the tokens seen
            raise ValueError('BamJaxForCausalLM decodes with a DynamicCache; static caches are not supported')
        if self.model_config.get('lory') and cache is not None and not isinstance(cache, BamJaxCache):
            raise ValueError(f'A Lory model keeps its merged experts in the cache: pass model.cache_class() '
                             f'(a BamJaxCache), not a {type(cache).__name__}')
        cache_given = cache is not None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = BamJaxCache()
        step = self.step(input_ids, attention_mask, position_ids, cache, cache_given)
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, step)
        x = self.final_norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.logits(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
        return out.to_tuple() if return_dict is False else out

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate()'s cache: where transformers makes a plain DynamicCache, a BamJaxCache instead,
        so beam search moves Lory's merged FFNs with the keys and values. A cache the caller passed
        is kept as it is (forward checks it)."""
        given = any(model_kwargs.get(name) is not None for name in ('cache', 'past_key_values'))
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if given:
            return
        for name in ('cache', 'past_key_values'):  # the key transformers 5 uses, and the one before
            made = model_kwargs.get(name)
            if type(made) is DynamicCache:  # a quantized or static cache (refused by forward) stays
                offloading = dict(offloading=True) if getattr(made, 'offloading', False) else {}
                model_kwargs[name] = BamJaxCache(**offloading)
