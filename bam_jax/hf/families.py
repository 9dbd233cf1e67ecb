"""The Hugging Face model families bam_jax reads and writes: their config.json and tensor names.

Dense families (read by `bam-jax import-hf`, written by `bam-jax export-hf`):
  llama    LlamaForCausalLM    the plain pre-norm SwiGLU transformer; RoPE scaling linear/llama3
  mistral  MistralForCausalLM  llama with a sliding attention window
  qwen2    Qwen2ForCausalLM    llama with q/k/v biases
  qwen3    Qwen3ForCausalLM    llama with a per-head RMSNorm of q and k, an explicit head_dim
Mixture-of-experts families (written only; bam_jax builds its MoEs itself):
  mixtral    MixtralForCausalLM    top-k experts, gates renormalised over the k chosen
  qwen2_moe  Qwen2MoeForCausalLM   top-k experts, gates optionally renormalised (norm_topk_prob),
                                   q/k/v biases, and a shared expert (written with zero width)
  qwen3_moe  Qwen3MoeForCausalLM   top-k experts, gates optionally renormalised, q/k norm

Every family rotates with the same rotate-half RoPE as bam_jax, so no weight is permuted: HF
linear weights [out, in] are bam_jax's [in..., out...] transposed and reshaped.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from bam_jax.errors import BamJaxError
from bam_jax.models.config import ModelConfig

DENSE = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral', 'Qwen2ForCausalLM': 'qwen2',
         'Qwen3ForCausalLM': 'qwen3'}
MOE = {'MixtralForCausalLM': 'mixtral', 'Qwen2MoeForCausalLM': 'qwen2_moe', 'Qwen3MoeForCausalLM': 'qwen3_moe'}
ARCHITECTURE = {family: arch for arch, family in {**DENSE, **MOE}.items()}


# --- config.json -> ModelConfig -----------------------------------------------------------------

def _rope(hf: dict, family: str) -> dict:
    """ModelConfig's RoPE fields from either spelling: rope_theta + rope_scaling (transformers 4)
    or rope_parameters (transformers 5)."""
    params = hf.get('rope_parameters') or {}
    scaling = hf.get('rope_scaling') or params
    theta = hf.get('rope_theta', params.get('rope_theta', 10_000.0))
    kind = scaling.get('rope_type', scaling.get('type')) or 'default'
    fields = dict(rope_theta=float(theta))
    if kind == 'default':
        return fields
    if kind not in ('linear', 'llama3'):
        raise BamJaxError(f'{family}: RoPE scaling {kind!r} is not supported (supported: linear, llama3)')
    fields.update(rope_scaling=kind, rope_scaling_factor=float(scaling['factor']))
    if kind == 'llama3':
        fields.update(rope_low_freq_factor=float(scaling['low_freq_factor']),
                      rope_high_freq_factor=float(scaling['high_freq_factor']),
                      rope_original_max_len=int(scaling['original_max_position_embeddings']))
    return fields


def _refuse_unless(condition: bool, family: str, what: str) -> None:
    if not condition:
        raise BamJaxError(f'{family}: {what} is not supported')


def model_config(hf: dict, param_dtype: str = 'float32') -> tuple[ModelConfig, str]:
    """(ModelConfig, family) of a dense Hugging Face config.json; refuses what bam_jax cannot
    compute exactly, in one line."""
    architectures = hf.get('architectures') or []
    family = DENSE.get(architectures[0]) if len(architectures) == 1 else None
    if family is None:
        raise BamJaxError(f'unsupported architecture {architectures or hf.get("model_type")}: '
                          f'import-hf reads {", ".join(DENSE)}')
    try:
        d_model, heads = int(hf['hidden_size']), int(hf['num_attention_heads'])
        _refuse_unless(hf.get('hidden_act', 'silu') == 'silu', family, f'hidden_act {hf.get("hidden_act")!r}')
        _refuse_unless(not hf.get('mlp_bias'), family, 'mlp_bias')
        # Qwen2 always has q/k/v biases; elsewhere attention_bias also puts one on the output projection.
        _refuse_unless(family == 'qwen2' or not hf.get('attention_bias'), family, 'attention_bias (an output bias)')
        windowed = any(t != 'full_attention' for t in hf.get('layer_types') or [])
        _refuse_unless(family == 'mistral' or not (hf.get('use_sliding_window') or windowed), family,
                       'a sliding window on some layers only')
        config = ModelConfig(
            vocab_size=int(hf['vocab_size']), d_model=d_model, num_layers=int(hf['num_hidden_layers']),
            num_heads=heads, num_kv_heads=int(hf.get('num_key_value_heads') or heads),
            head_dim=int(hf.get('head_dim') or d_model // heads), d_ff=int(hf['intermediate_size']),
            parallel_block=False, tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
            qkv_bias=family == 'qwen2', qk_norm=family == 'qwen3',
            sliding_window=int(hf.get('sliding_window') or 0) if family == 'mistral' else 0,
            norm_eps=float(hf.get('rms_norm_eps', 1e-6)), init_std=float(hf.get('initializer_range', 0.02)),
            param_dtype=param_dtype, **_rope(hf, family))
    except KeyError as e:
        raise BamJaxError(f'{family}: config.json has no {e.args[0]!r}') from None
    except (TypeError, ValueError) as e:
        raise BamJaxError(f'{family}: bad config.json value: {e}') from None
    return config, family


# --- ModelConfig -> config.json -----------------------------------------------------------------

def _rope_json(config: ModelConfig) -> dict:
    if config.rope_scaling == 'none':
        scaling = None
    else:
        scaling = {'rope_type': config.rope_scaling, 'factor': config.rope_scaling_factor}
        if config.rope_scaling == 'llama3':
            scaling.update(low_freq_factor=config.rope_low_freq_factor,
                           high_freq_factor=config.rope_high_freq_factor,
                           original_max_position_embeddings=config.rope_original_max_len)
    return {'rope_theta': config.rope_theta, 'rope_scaling': scaling}


def hf_config(config: ModelConfig, family: str, *, dtype: str, max_length: int, token_ids: dict,
              moe: dict | None = None) -> dict:
    """config.json of `family` for the model. moe: for the MoE families, {'top_k': k,
    'renormalize': bool}."""
    values = {
        'architectures': [ARCHITECTURE[family]], 'model_type': family,
        'vocab_size': config.vocab_size, 'hidden_size': config.d_model, 'intermediate_size': config.d_ff,
        'num_hidden_layers': config.num_layers, 'num_attention_heads': config.num_heads,
        'num_key_value_heads': config.num_kv_heads, 'head_dim': config.resolved_head_dim,
        'hidden_act': 'silu', 'rms_norm_eps': config.norm_eps, 'max_position_embeddings': max_length,
        'tie_word_embeddings': config.tie_embeddings, 'initializer_range': config.init_std,
        'torch_dtype': dtype, 'use_cache': True, **_rope_json(config), **token_ids,
    }
    if family in ('llama', 'qwen3', 'qwen3_moe'):
        values.update(attention_bias=False, mlp_bias=False)
    if family in ('mistral', 'mixtral'):
        values['sliding_window'] = config.sliding_window or None
    if family in ('qwen2', 'qwen3', 'qwen2_moe', 'qwen3_moe'):
        values.update(use_sliding_window=False, sliding_window=None)
    if family == 'qwen2_moe':
        values['qkv_bias'] = True
    if moe is not None:
        experts = config.moe.num_routed_experts
        values['num_experts_per_tok'] = moe['top_k']
        if family == 'mixtral':
            values.update(num_local_experts=experts, intermediate_size=config.d_ff // config.moe.expert_split)
        else:
            values.update(num_experts=experts, moe_intermediate_size=config.d_ff // config.moe.expert_split,
                          norm_topk_prob=moe['renormalize'], decoder_sparse_step=1, mlp_only_layers=[],
                          output_router_logits=False)
            if family == 'qwen2_moe':
                values['shared_expert_intermediate_size'] = 0
    return values


# --- tensors ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and where it lives in bam_jax.

    kind: 'same' (one layout), 'flat' (HF [N*Dh] <-> bam_jax [N, Dh]: biases), 'linear' (HF
    [out, in] <-> bam_jax [in..., out...], the first `in_axes` axes forming `in`), 'zeros' (written
    only: a tensor the family has and the model does not, whose zeros compute nothing).
    expert: the index into bam_jax's stacked experts axis (MoE families), or None.
    """
    hf: str
    bam: str | None
    kind: str = 'same'
    in_axes: int = 1
    expert: int | None = None
    zeros_shape: tuple[int, ...] = ()

    def hf_shape(self, bam_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == 'zeros':
            return self.zeros_shape
        if self.expert is not None:
            bam_shape = bam_shape[1:]
        if self.kind == 'flat':
            return (math.prod(bam_shape),)
        if self.kind == 'linear':
            return math.prod(bam_shape[self.in_axes:]), math.prod(bam_shape[:self.in_axes])
        return tuple(bam_shape)

    def to_bam(self, w: np.ndarray, bam_shape: tuple[int, ...]) -> np.ndarray:
        return (w.T if self.kind == 'linear' else w).reshape(bam_shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.expert is not None:
            w = w[self.expert]
        if self.kind == 'linear':
            return w.reshape(math.prod(w.shape[:self.in_axes]), -1).T
        return w.reshape(-1) if self.kind == 'flat' else w


def _attention(config: ModelConfig, i: int, family: str) -> list[Tensor]:
    hf, bam = f'model.layers.{i}.self_attn', f'layers/{i}/attn'
    tensors = [Tensor(f'{hf}.{n}_proj.weight', f'{bam}/w{n}', 'linear') for n in 'qkv']
    tensors.append(Tensor(f'{hf}.o_proj.weight', f'{bam}/wo', 'linear', in_axes=2))
    for n, heads in (('q', config.num_heads), ('k', config.num_kv_heads), ('v', config.num_kv_heads)):
        if config.qkv_bias:
            tensors.append(Tensor(f'{hf}.{n}_proj.bias', f'{bam}/b{n}', 'flat'))
        elif family in ('qwen2', 'qwen2_moe'):  # the family always has them: zeros add nothing
            width = heads * config.resolved_head_dim
            tensors.append(Tensor(f'{hf}.{n}_proj.bias', None, 'zeros', zeros_shape=(width,)))
    if config.qk_norm:
        tensors += [Tensor(f'{hf}.{n}_norm.weight', f'{bam}/{n}_norm') for n in 'qk']
    return tensors


def _dense_ffn(i: int) -> list[Tensor]:
    hf, bam = f'model.layers.{i}.mlp', f'layers/{i}/ffn'
    return [Tensor(f'{hf}.gate_proj.weight', f'{bam}/wi_gate', 'linear'),
            Tensor(f'{hf}.up_proj.weight', f'{bam}/wi_up', 'linear'),
            Tensor(f'{hf}.down_proj.weight', f'{bam}/wo', 'linear')]


def _moe_ffn(config: ModelConfig, i: int, family: str) -> list[Tensor]:
    bam = f'layers/{i}/ffn'
    if family == 'mixtral':
        hf = f'model.layers.{i}.block_sparse_moe'
        names = {'wi_gate': 'w1', 'wi_up': 'w3', 'wo': 'w2'}
    else:
        hf = f'model.layers.{i}.mlp'
        names = {'wi_gate': 'gate_proj', 'wi_up': 'up_proj', 'wo': 'down_proj'}
    tensors = [Tensor(f'{hf}.gate.weight', f'{bam}/router/kernel', 'linear')]
    for e in range(config.moe.num_routed_experts):
        tensors += [Tensor(f'{hf}.experts.{e}.{names[n]}.weight', f'{bam}/experts/{n}', 'linear', expert=e)
                    for n in ('wi_gate', 'wi_up', 'wo')]
    if family == 'qwen2_moe':  # its shared expert, zero wide: adds exactly nothing
        d = config.d_model
        tensors += [Tensor(f'{hf}.shared_expert.gate_proj.weight', None, 'zeros', zeros_shape=(0, d)),
                    Tensor(f'{hf}.shared_expert.up_proj.weight', None, 'zeros', zeros_shape=(0, d)),
                    Tensor(f'{hf}.shared_expert.down_proj.weight', None, 'zeros', zeros_shape=(d, 0)),
                    Tensor(f'{hf}.shared_expert_gate.weight', None, 'zeros', zeros_shape=(1, d))]
    return tensors


def tensors(config: ModelConfig, family: str) -> list[Tensor]:
    """Every tensor of `family` for the model, in the order of a Hugging Face checkpoint."""
    out = [Tensor('model.embed_tokens.weight', 'embed/embedding')]
    for i in range(config.num_layers):
        out.append(Tensor(f'model.layers.{i}.input_layernorm.weight', f'layers/{i}/attn_norm/scale'))
        out += _attention(config, i, family)
        out.append(Tensor(f'model.layers.{i}.post_attention_layernorm.weight', f'layers/{i}/ffn_norm/scale'))
        out += _moe_ffn(config, i, family) if family in MOE.values() else _dense_ffn(i)
    out.append(Tensor('model.norm.weight', 'final_norm/scale'))
    if not config.tie_embeddings:
        out.append(Tensor('lm_head.weight', 'unembed/kernel', 'linear'))
    return out
