"""The Mix step as a pure function: dense parameter trees in, an MoE parameter tree out.

Every output tensor has a recipe (`plan`) that names the input tensors it is made from:
  average  the uniform mean over every input model (attention, embeddings, norms, unembedding,
           and for shared K/V the K/V projections)
  stack    one slice per expert, taken from that expert's model, on a new leading axis
           (FFNs; for BAM also the attention projections, each with its bias and q/k norm
           scale); with expert_split C each dense FFN gives C consecutive experts, chunk c
           holding hidden units c*F/C .. (c+1)*F/C - 1
  router   fresh random weights, normal(0, init_std), from the router seed and the path
`upcycle` runs the plan on trees in memory; bam_jax.upcycle.io runs the same plan one tensor
at a time between checkpoints. Methods:
  btx            FFN experts; everything else averaged
  bam            FFN experts and attention experts with their own K/V (expert KV)
  bam_shared_kv  FFN experts and attention experts with per-expert Wq, Wo; Wk, Wv averaged
  sparse_upcycle one dense model's FFN copied into every expert
  lory           FFN experts as btx, for Lory's parameter-merging layer (no top-k); the rest averaged
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from bam_jax.errors import BamJaxError
from bam_jax.models.config import LoryConfig, MoAConfig, ModelConfig, MoEConfig

_FFN = re.compile(r'^layers/(\d+)/ffn/(wi_gate|wi_up|wo)$')
# Attention projections with the bias and q/k norm scale that belong to each (qkv_bias, qk_norm).
_ATTN = re.compile(r'^layers/(\d+)/attn/(wq|wk|wv|wo|bq|bk|bv|q_norm|k_norm)$')
# Hidden-unit axis of each dense FFN weight: wi_* [D, F], wo [F, D].
_FFN_HIDDEN_AXIS = {'wi_gate': 1, 'wi_up': 1, 'wo': 0}


def _btx(n: int, split: int) -> dict:
    return dict(moe=MoEConfig(num_experts=n, expert_split=split))


def _bam(shared_kv: bool) -> Callable[[int, int], dict]:
    return lambda n, split: dict(moe=MoEConfig(num_experts=n, expert_split=split),
                                 moa=MoAConfig(num_experts=n, shared_kv=shared_kv))


def _lory(n: int, split: int) -> dict:
    return dict(lory=LoryConfig(num_experts=n))


# Per method: the expert layers of its model (shapes only: routing is the mix stage's, in
# gin/routing/), from (input experts, expert_split), and the attention projections stacked as
# attention experts (none: attention is averaged).
_LAYERS: dict[str, Callable[[int, int], dict]] = {
    'btx': _btx, 'bam': _bam(False), 'bam_shared_kv': _bam(True), 'sparse_upcycle': _btx, 'lory': _lory}
_STACKED_ATTENTION = {'bam': ('wq', 'wk', 'wv', 'wo', 'bq', 'bk', 'bv', 'q_norm', 'k_norm'),
                      'bam_shared_kv': ('wq', 'wo', 'bq', 'q_norm')}
METHODS = tuple(_LAYERS)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one output tensor is made.

    kind: 'average' | 'stack' | 'router'. source: the input path read (average, stack).
    experts: for stack, the input model of each expert slot, in order. split, split_axis: for
    stack, each source is cut into `split` chunks along `split_axis`. shape, std, seed: router.
    """
    kind: str
    source: str | None = None
    experts: tuple[int, ...] = ()
    split: int = 1
    split_axis: int = 0
    shape: tuple[int, ...] = ()
    std: float = 0.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class UpcycleSpec:
    """What to build. expert_models: for each expert, the index of the input model it comes
    from (sparse_upcycle repeats one model); every input model joins the averages. model_names:
    each input model's name (its run: seed, code, ...), which names its experts."""
    method: str
    num_models: int
    expert_models: tuple[int, ...]
    expert_split: int = 1
    router_seed: int = 0
    model_names: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise BamJaxError(f'unknown upcycle method {self.method!r}; choose from {", ".join(METHODS)}')
        if self.expert_split < 1:
            raise BamJaxError(f'expert_split must be >= 1, got {self.expert_split}')
        if self.method == 'lory' and self.expert_split != 1:
            raise BamJaxError('lory merges whole FFNs: expert_split must be 1')
        if not self.expert_models or not all(0 <= i < self.num_models for i in self.expert_models):
            raise BamJaxError(f'expert models {self.expert_models} do not index {self.num_models} input models')
        if self.model_names and len(self.model_names) != self.num_models:
            raise BamJaxError(f'{len(self.model_names)} model names for {self.num_models} input models')

    def expert_names(self) -> tuple[str, ...]:
        """Each expert's input model's name; a model that gives several experts (sparse_upcycle)
        names them NAME, NAME_2, ...; () without model names."""
        if not self.model_names:
            return ()
        names, copies = [], {}
        for model in self.expert_models:
            copies[model] = copies.get(model, 0) + 1
            name = self.model_names[model]
            names.append(name if copies[model] == 1 else f'{name}_{copies[model]}')
        return tuple(names)


def model_config(dense: ModelConfig, spec: UpcycleSpec) -> ModelConfig:
    """The MoE's config: the dense shape plus the expert layers' architecture.

    Routing is not set here: it is a training choice, made by the mix stage (gin/routing/*.gin).
    """
    layers = _LAYERS[spec.method](len(spec.expert_models), spec.expert_split)
    return dataclasses.replace(dense, **{'moe': None, 'moa': None, 'lory': None, **layers},
                               expert_names=spec.expert_names())


def plan(spec: UpcycleSpec, dense: ModelConfig, dense_shapes: dict[str, tuple[int, ...]]) -> dict[str, Recipe]:
    """{output path: Recipe} for every parameter of the MoE, in a stable order."""
    if dense.moe is not None or dense.moa is not None or dense.lory is not None:
        raise BamJaxError('the input is already a mixture-of-experts model; upcycle dense models')
    if dense.d_ff % spec.expert_split:
        raise BamJaxError(f'd_ff ({dense.d_ff}) is not divisible by expert_split ({spec.expert_split})')
    stacked_attention = _STACKED_ATTENTION.get(spec.method, ())
    num_experts = len(spec.expert_models) * spec.expert_split
    recipes: dict[str, Recipe] = {}
    for path in dense_shapes:
        ffn, attn = _FFN.match(path), _ATTN.match(path)
        if ffn:
            layer, name = ffn.groups()
            recipes[f'layers/{layer}/ffn/experts/{name}'] = Recipe(
                'stack', path, spec.expert_models, spec.expert_split, _FFN_HIDDEN_AXIS[name])
            router = f'layers/{layer}/ffn/router/kernel'
            recipes.setdefault(router, _router(spec, dense, router, num_experts))
        elif attn and attn.group(2) in stacked_attention:
            layer, name = attn.groups()
            recipes[f'layers/{layer}/attn/experts/{name}'] = Recipe('stack', path, spec.expert_models)
            router = f'layers/{layer}/attn/router/kernel'
            recipes.setdefault(router, _router(spec, dense, router, len(spec.expert_models)))
        else:
            recipes[path] = Recipe('average', path)
    return recipes


def _router(spec: UpcycleSpec, dense: ModelConfig, path: str, num_experts: int) -> Recipe:
    # A distinct, reproducible stream per router: the seed and a hash of the path.
    return Recipe('router', shape=(dense.d_model, num_experts), std=dense.init_std,
                  seed=zlib.crc32(f'{spec.router_seed}:{path}'.encode()))


def reads(recipe: Recipe, num_models: int) -> list[tuple[int, str]]:
    """The (input model, path) reads `build` makes for the recipe, in its order."""
    if recipe.kind == 'average':
        return [(i, recipe.source) for i in range(num_models)]
    if recipe.kind == 'stack':  # sparse upcycling repeats a model: read once per run of it
        runs = [m for slot, m in enumerate(recipe.experts) if not slot or recipe.experts[slot - 1] != m]
        return [(m, recipe.source) for m in runs]
    return []


def build(recipe: Recipe, read: Callable[[int, str], np.ndarray], num_models: int) -> np.ndarray:
    """One output tensor. read(model index, path) returns that input tensor (float32); it is
    called in the order `reads` lists, each input read when the previous one is done with
    (`working_bytes` is what this holds at most)."""
    if recipe.kind == 'router':
        rng = np.random.default_rng(recipe.seed)
        return (rng.standard_normal(recipe.shape) * recipe.std).astype(np.float32)
    if recipe.kind == 'average':
        return mean(read(i, recipe.source) for i in range(num_models))
    out, source, last = None, None, None
    for slot, model in enumerate(recipe.experts):
        if model != last:
            source, last = np.asarray(read(model, recipe.source)), model
        chunks = np.split(source, recipe.split, axis=recipe.split_axis)
        if out is None:
            out = np.empty((len(recipe.experts) * recipe.split, *chunks[0].shape), source.dtype)
        out[slot * recipe.split:(slot + 1) * recipe.split] = chunks
    return out


def output_bytes(recipe: Recipe, nbytes: Mapping[str, int]) -> int:
    """The bytes of the tensor `build` makes for the recipe; nbytes: an input tensor's bytes by path."""
    if recipe.kind == 'router':
        return math.prod(recipe.shape) * 4
    return nbytes[recipe.source] * (len(recipe.experts) if recipe.kind == 'stack' else 1)


def working_bytes(recipe: Recipe, nbytes: Mapping[str, int]) -> int:
    """The most memory `build` holds for the recipe at once, its inputs in flight aside: a mean's
    float64 sum (2x the tensor) and one input or the result; a stack's output and one input."""
    if recipe.kind == 'average':
        return 3 * nbytes[recipe.source]
    return output_bytes(recipe, nbytes) + (nbytes[recipe.source] if recipe.kind == 'stack' else 0)


def mean(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """The element-wise mean, summed in float64 in order and rounded once to float32 (numpy's
    float64 mean, exactly). The arrays are taken one at a time: only the sum and one are held."""
    total, count = None, 0
    for array in arrays:
        if total is None:
            total = np.array(array, np.float64)
        else:
            total += array
        count += 1
        del array  # before the next one is read
    total /= count
    return total.astype(np.float32)


def upcycle(dense_params: Sequence[dict], dense: ModelConfig, spec: UpcycleSpec) -> tuple[dict, ModelConfig]:
    """Pure: flat dense parameter dicts ({'layers/0/attn/wq': array, ...}, one per input model,
    in spec order) -> (flat MoE parameter dict, MoE ModelConfig)."""
    if len(dense_params) != spec.num_models:
        raise BamJaxError(f'{len(dense_params)} parameter trees given, the spec has {spec.num_models}')
    shapes = {k: tuple(np.shape(v)) for k, v in dense_params[0].items()}
    recipes = plan(spec, dense, shapes)
    read = lambda i, path: dense_params[i][path]  # noqa: E731
    return ({path: build(recipe, read, spec.num_models) for path, recipe in recipes.items()},
            model_config(dense, spec))
