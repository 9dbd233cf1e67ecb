"""The model's shape and numerics, as one gin-configurable record.

Its fields are of two kinds. The architecture (`ModelConfig.architecture()`) fixes the
parameters and what they mean: sizes, block form, RoPE, which layers are experts and how many.
A checkpoint is only ever read into a model of the same architecture. The settings are
everything else: routing mode, top_k, gate form, capacity factors, loss weights, Lory's segment
length, the compute dtype, the attention kernel. They are training (or evaluation) choices and
may differ between a checkpoint and the run that reads it; `setting_changes` lists the differences.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import gin
import jax.numpy as jnp

from bam_jax.errors import BamJaxError

ROUTING_MODES = ('top_k', 'soft', 'sample_top1')
ROPE_SCALINGS = ('none', 'linear', 'llama3')
GATE_FORMS = ('softmax', 'renormalize')
ATTENTION_IMPLS = ('plain', 'xla', 'cudnn', 'splash')  # bam_jax/models/attention_kernels.py

# Settings that earlier versions stored (in a checkpoint's model record and a run's config.gin)
# and that no longer exist, with the reason. Reading an older run skips them.
RETIRED_SETTINGS = {
    'MoEConfig': {'capacity_factor_eval': 'inference never drops tokens, so it has no capacity'},
    # settings of the in-memory seqio pipeline that prepared token files replaced (bam_jax/data)
    'DataConfig': {'shuffle_buffer': 'every epoch is a global shuffle of the prepared windows',
                   'data_shards': 'the global batch never depends on the process count',
                   'max_domain_bytes': 'prepared domains have no size cap',
                   'similarity_group_bytes': 'see similarity_group_documents'},
}


@dataclasses.dataclass(frozen=True)
class RoutedConfig:
    """How a layer routes tokens to its experts (bam_jax/models/routing.py).

    routing: 'top_k' (each token goes to `top_k` experts), 'soft' (every expert, weighted by
      the router softmax) or 'sample_top1' (one expert drawn with Gumbel noise in training,
      the arg-max in evaluation).
    gate: 'softmax' weighs a chosen expert by its softmax probability over all experts, not
      renormalised (BAM, Switch); 'renormalize' takes a softmax over the k kept logits
      (BTX, Mixtral). Soft routing always uses the full softmax.
    load_balance_weight, z_loss_weight: coefficients of the Switch load-balancing loss and the
      ST-MoE router z-loss, added to the token-mean NLL once per layer.
    Only the fields in ARCHITECTURE fix the parameters; the rest are settings.
    """
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ('num_experts',)

    num_experts: int = 4
    routing: str = 'top_k'
    top_k: int = 1
    gate: str = 'softmax'
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.001

    def __post_init__(self):
        name = type(self).__name__
        if self.num_experts < 1:
            raise BamJaxError(f'{name}.num_experts must be >= 1, got {self.num_experts}')
        if self.routing not in ROUTING_MODES:
            raise BamJaxError(f'{name}.routing={self.routing!r} is not one of {ROUTING_MODES}')
        if self.gate not in GATE_FORMS:
            raise BamJaxError(f'{name}.gate={self.gate!r} is not one of {GATE_FORMS}')
        if not 1 <= self.top_k <= self.num_routed_experts:
            raise BamJaxError(f'{name}.top_k={self.top_k} must be in [1, {self.num_routed_experts}]')
        if self.load_balance_weight < 0 or self.z_loss_weight < 0:
            raise BamJaxError(f'{name}: loss weights must be >= 0')

    @property
    def num_routed_experts(self) -> int:
        return self.num_experts

    @property
    def experts_per_token(self) -> int:
        """How many experts each token is computed by."""
        if self.routing == 'soft':
            return self.num_routed_experts
        return 1 if self.routing == 'sample_top1' else self.top_k


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoEConfig(RoutedConfig):
    """Routed FFN experts (bam_jax/models/moe.py). Defaults: BAM's top-1, Switch capacity.

    capacity_factor_train: in training each expert takes at most
      ceil(factor * tokens * k / experts) tokens of a dispatch group (a device's share of the
      batch); the rest pass through on the residual and are counted as dropped. Inference
      (evaluation, log-likelihoods, decoding) has no capacity: it never drops a token.
    dropless: training without a capacity too: every assignment is computed, nothing is dropped
      (the dropped fraction is exactly 0) and capacity_factor_train is unused. Inference is always
      dropless. With the experts spread over the mesh axis `expert`, each device's buffers are
      sized for the worst case (all its assignments on one device's experts).
    expert_split: BTX's split-experts ablation: each expert's FFN is cut into this many
      chunks of d_ff / expert_split hidden units, giving num_experts * expert_split experts.
    """
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ('num_experts', 'expert_split')

    capacity_factor_train: float = 1.25
    dropless: bool = False
    expert_split: int = 1

    def __post_init__(self):
        if self.expert_split < 1:
            raise BamJaxError(f'MoEConfig.expert_split must be >= 1, got {self.expert_split}')
        super().__post_init__()
        if self.capacity_factor_train <= 0:
            raise BamJaxError(f'MoEConfig.capacity_factor_train must be > 0, got {self.capacity_factor_train}')

    @property
    def num_routed_experts(self) -> int:
        return self.num_experts * self.expert_split


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoAConfig(RoutedConfig):
    """Attention experts (bam_jax/models/moa.py). Defaults: BAM's soft routing, expert KV.

    shared_kv: per-expert Wq and Wo with one shared Wk, Wv (the KV cache is the dense one's).
    """
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ('num_experts', 'shared_kv')

    routing: str = 'soft'
    load_balance_weight: float = 0.0
    shared_kv: bool = False


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoryConfig:
    """Lory's fully differentiable FFN experts (bam_jax/models/lory.py): no top-k, no capacity.

    Each segment of `segment_len` tokens runs one FFN whose weights are the experts' weights
    averaged by a router softmax over the previous segment's mean hidden state.
    z_loss_weight: the ST-MoE router z-loss coefficient. There is no load-balancing loss.
    segment_len and z_loss_weight are settings: only num_experts fixes the parameters.
    """
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ('num_experts',)

    num_experts: int = 4
    segment_len: int = 32   # as gin/routing/lory.gin; the paper's 256 is for rows of 4096 tokens
    z_loss_weight: float = 0.0

    def __post_init__(self):
        if self.num_experts < 1:
            raise BamJaxError(f'LoryConfig.num_experts must be >= 1, got {self.num_experts}')
        if self.segment_len < 1:
            raise BamJaxError(f'LoryConfig.segment_len must be >= 1, got {self.segment_len}')
        if self.z_loss_weight < 0:
            raise BamJaxError(f'LoryConfig.z_loss_weight must be >= 0, got {self.z_loss_weight}')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM. Sizes live in gin/models/*.gin.

    Numerics: parameters are stored in `param_dtype` (float32) and cast to `dtype` (bfloat16)
    for the matmuls; norms, softmax and the loss run in float32. dtype='float32' computes
    exactly in float32.
    """
    # Fields of this record that are settings, not architecture (see the module docstring).
    SETTINGS: ClassVar[tuple[str, ...]] = ('dtype', 'init_std', 'attention_impl', 'expert_names', 'max_length')
    EXPERT_LAYERS: ClassVar[tuple[str, ...]] = ('moe', 'moa', 'lory')

    vocab_size: int = 384
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0            # 0: d_model // num_heads
    d_ff: int = 512
    parallel_block: bool = True  # x + attn(norm(x)) + ffn(norm(x)), as in BAM/PaLM
    tie_embeddings: bool = False
    qkv_bias: bool = False       # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False        # RMSNorm over each head of q and k before RoPE (Qwen3)
    rope_theta: float = 10_000.0
    # RoPE frequency scaling for long contexts: 'linear' divides every frequency by the factor;
    # 'llama3' divides the low ones only, blending in between (the rope_low/high_freq_factor bands
    # of wavelengths against rope_original_max_len).
    rope_scaling: str = 'none'
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    sliding_window: int = 0      # > 0: a query reads only the last `sliding_window` positions (Mistral)
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = 'bfloat16'
    param_dtype: str = 'float32'
    # How attention runs (bam_jax/models/attention_kernels.py): 'plain' (einsums, the reference),
    # 'xla' (jax.nn.dot_product_attention), 'cudnn' (fused, GPU), 'splash' (Pallas, TPU): one function, rounding aside.
    attention_impl: str = 'plain'
    moe: MoEConfig | None = None  # routed FFN experts instead of the dense FFN
    moa: MoAConfig | None = None  # attention experts instead of the dense attention
    lory: LoryConfig | None = None  # Lory's merged FFN experts instead of the dense FFN
    # The run each expert came from (seed, code, ...), one name per input model of the upcycle, in
    # expert order: what routing maps, tables and expert surgery call the experts. Empty: 0, 1, ...
    expert_names: tuple[str, ...] = ()
    # The longest sequence the model reads (positions), bound by the stage files to the training
    # length (SEQ_LEN): what inference cuts contexts to and an export declares. 0: unset, as in
    # runs from before this setting (then the run's TrainConfig.seq_len stands in).
    max_length: int = 0

    def __post_init__(self):
        object.__setattr__(self, 'expert_names', tuple(self.expert_names))  # gin and JSON give lists
        counts = {layer.num_experts for layer in (self.moe, self.moa, self.lory) if layer is not None}
        names = self.expert_names
        if names and (counts != {len(names)} or len(set(names)) != len(names)):
            raise BamJaxError(f'ModelConfig.expert_names {list(self.expert_names)} must name each of the '
                              f'{", ".join(map(str, sorted(counts))) or "no"} experts once')
        if self.num_heads % self.num_kv_heads:
            raise BamJaxError(f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})')
        if not self.head_dim and self.d_model % self.num_heads:
            raise BamJaxError(f'd_model ({self.d_model}) is not divisible by num_heads '
                              f'({self.num_heads}); set head_dim')
        if self.resolved_head_dim % 2:
            raise BamJaxError(f'head_dim must be even for RoPE, got {self.resolved_head_dim}')
        if self.rope_scaling not in ROPE_SCALINGS:
            raise BamJaxError(f'ModelConfig.rope_scaling={self.rope_scaling!r} is not one of {ROPE_SCALINGS}')
        if self.rope_scaling != 'none' and self.rope_scaling_factor <= 0:
            raise BamJaxError(f'ModelConfig.rope_scaling_factor must be > 0, got {self.rope_scaling_factor}')
        if self.rope_scaling == 'llama3' and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise BamJaxError('llama3 RoPE scaling needs 0 < rope_low_freq_factor < rope_high_freq_factor, got '
                              f'{self.rope_low_freq_factor} and {self.rope_high_freq_factor}')
        if self.attention_impl not in ATTENTION_IMPLS:
            raise BamJaxError(f'ModelConfig.attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}')
        if self.max_length < 0:
            raise BamJaxError(f'ModelConfig.max_length must be >= 0, got {self.max_length}')
        if self.sliding_window < 0:
            raise BamJaxError(f'ModelConfig.sliding_window must be >= 0, got {self.sliding_window}')
        for name in ('dtype', 'param_dtype'):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise BamJaxError(f'ModelConfig.{name}={getattr(self, name)!r} is not a dtype') from None
        if self.moe and self.d_ff % self.moe.expert_split:
            raise BamJaxError(f'd_ff ({self.d_ff}) is not divisible by MoEConfig.expert_split '
                              f'({self.moe.expert_split})')
        if self.moe and self.lory:
            raise BamJaxError('ModelConfig.moe and ModelConfig.lory both replace the FFN; set one of them')

    def expert_labels(self, kind: str) -> list[str]:
        """The name of each expert of a routed layer, 'ffn' or 'attn', in router order: the run it
        came from; with expert_split C, name/0 .. name/C-1 for the chunks of its FFN."""
        layer = self.moa if kind == 'attn' else (self.moe or self.lory)
        if layer is None:
            return []
        names = list(self.expert_names) or [str(e) for e in range(layer.num_experts)]
        split = getattr(layer, 'expert_split', 1) if kind == 'ffn' else 1
        return names if split == 1 else [f'{name}/{c}' for name in names for c in range(split)]

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> dict[str, Any]:
        """What fixes the parameters and their meaning: {'d_model': 128, ..., 'moe': {'num_experts':
        4, 'expert_split': 1} or None, ...}. Two models read each other's checkpoints iff equal."""
        values = {name: value for name, value in self.to_dict().items() if name not in self.SETTINGS}
        for name in self.EXPERT_LAYERS:
            layer = getattr(self, name)
            values[name] = None if layer is None else {f: getattr(layer, f) for f in layer.ARCHITECTURE}
        return values

    def settings(self) -> dict[str, Any]:
        """Everything that is not architecture, flat: {'dtype': 'bfloat16', 'moe.top_k': 1, ...}."""
        values = {name: getattr(self, name) for name in self.SETTINGS}
        for name in self.EXPERT_LAYERS:
            layer = getattr(self, name)
            if layer is not None:
                values.update({f'{name}.{f.name}': getattr(layer, f.name) for f in dataclasses.fields(layer)
                               if f.name not in layer.ARCHITECTURE})
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise BamJaxError(f'unknown model config fields {sorted(unknown)}')
        values = dict(values)
        for name, kind in (('moe', MoEConfig), ('moa', MoAConfig), ('lory', LoryConfig)):
            if values.get(name) is not None:
                retired = RETIRED_SETTINGS.get(kind.__name__, {})
                values[name] = kind(**{k: v for k, v in values[name].items() if k not in retired})
        return cls(**values)


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """(name, value in a, value in b) of the first key whose values differ (None if absent)."""
    for name in [*a, *(k for k in b if k not in a)]:
        if a.get(name) != b.get(name):
            return name, a.get(name), b.get(name)
    return None


def setting_changes(old: ModelConfig, new: ModelConfig) -> dict[str, list]:
    """{setting: [old value, new value]} for every setting that differs (same architecture)."""
    before, after = old.settings(), new.settings()
    return {name: [before.get(name), after.get(name)] for name in sorted(set(before) | set(after))
            if before.get(name) != after.get(name)}


def describe_changes(changed: dict[str, list]) -> str:
    """setting_changes as one line: 'moe.top_k 2 -> 1, dtype 'bfloat16' -> 'float32''."""
    return ', '.join(f'{name} {before!r} -> {after!r}' for name, (before, after) in changed.items())
