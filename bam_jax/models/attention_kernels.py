"""Attention run by the kernel ModelConfig.attention_impl names: one entry point, `attention`.

Shapes: B batch, T query length, S key length, H query heads, K K/V heads (H a multiple of K:
query head h reads K/V head h // (H/K), grouped-query attention), Dh head dim.

  plain   einsums under a [B, 1, T, S] boolean mask: the reference, and the default.
  xla     jax.nn.dot_product_attention(implementation='xla'): causality and the sliding window
          are the call's own arguments; packed documents a [B, 1, T, T] mask.
  cudnn   cuDNN flash attention (GPU; bfloat16 or float16): causal and windowed inside the
          kernel, which skips the blocks above the diagonal; packed documents a mask (_cudnn says why).
  splash  Pallas splash attention (TPU): causal or local mask and segment ids inside the kernel,
          which skips every fully masked block; no [T, T] array is built at all.

Self-attention hands the kernels `Documents` (segment ids), not a mask, so each takes packing
its own way. An explicit boolean mask [B, 1, T, S] (a layer called directly) works with every
kernel but splash. Decoding through a KV cache keeps the plain kernel (layers.attend).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bam_jax.errors import BamJaxError
from bam_jax.models.config import ModelConfig
from bam_jax.parallel.sharding import logical_to_spec

NEG_INF = -1e9
# Pallas interpret mode: the splash kernel on any backend, slowly (tests run it on CPU).
SPLASH_INTERPRET = False
SPLASH_BLOCKS = (512, 256, 128)  # tile sizes tried, largest first; 128 is the TPU lane width


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Documents:
    """Causal self-attention over packed documents, described rather than built: a token reads
    the earlier tokens of its own document (and, with a window W, only the last W positions).
    segment_ids: [B, T]; equal ids are one document (0, padding, is one more); None: one
    document per row."""
    segment_ids: jax.Array | None = None


def attention_mask(segment_ids, window: int = 0):
    """Causal mask that also keeps packed documents apart and, with window > 0, lets a query
    read only the last `window` positions. segment_ids: [B, T] -> [B, 1, T, T]."""
    length = segment_ids.shape[-1]
    offset = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]  # query - key
    allowed = (offset >= 0) & ((offset < window) if window else True)
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (allowed[None] & same_doc)[:, None]


def self_attention_mask(segment_ids, config: ModelConfig, one_document: bool = False):
    """The `mask` a model's layers get for self-attention over segment_ids [B, T]: the
    [B, 1, T, T] array for 'plain', built once for every layer, else Documents, for the fused
    kernels to read. one_document: every row is one document (no document mask needed)."""
    if config.attention_impl != 'plain':
        return Documents(None if one_document else segment_ids)
    return attention_mask(segment_ids, config.sliding_window)


def check_attention_impl(config: ModelConfig) -> None:
    """Refuses, in one line, a kernel this process cannot run (checked when a layer is built,
    so a run stops at its start rather than at its first step)."""
    impl, dtype = config.attention_impl, config.compute_dtype
    need = {'cudnn': 'gpu', 'splash': 'tpu'}.get(impl)
    if need is None or (impl == 'splash' and SPLASH_INTERPRET):
        return
    if jax.default_backend() != need:
        raise BamJaxError(f"ModelConfig.attention_impl={impl!r} needs a {need.upper()}; this process sees "
                          f"{jax.default_backend()} devices; use 'plain' or 'xla'")
    allowed = ('bfloat16', 'float16') if impl == 'cudnn' else ('bfloat16', 'float32')
    if dtype.name not in allowed:
        raise BamJaxError(f"ModelConfig.attention_impl={impl!r} computes in {' or '.join(allowed)}, "
                          f"not ModelConfig.dtype={config.dtype!r}; use 'xla'")


def attention(q, k, v, mask, *, impl: str = 'plain', window: int = 0, gate=None):
    """Attention of q [B, T, H, Dh] over k, v [B, S, K, Dh] -> [B, T, H, Dh].

    mask: Documents (self-attention, S == T; causal, `window` > 0 keeps the last `window`
    positions) or a boolean [B, 1, T, S] (True: may read; `window` unused). gate [B, T, H], if
    given, multiplies each head's output per token (attention experts' gates).
    """
    if isinstance(mask, Documents) and k.shape[1] != q.shape[1]:
        raise ValueError(f'Documents describe self-attention; got {q.shape[1]} queries, {k.shape[1]} keys')
    if impl == 'plain':
        if isinstance(mask, Documents):
            ids = mask.segment_ids
            mask = attention_mask(jnp.ones(q.shape[:2], jnp.int32) if ids is None else ids, window)
        return dot_product_attention(q, k, v, mask, gate)
    kernels = {'xla': _xla, 'cudnn': _cudnn, 'splash': _splash}
    if impl not in kernels:
        raise BamJaxError(f'unknown attention_impl {impl!r}')
    out = kernels[impl](q, k, v, mask, window)
    return out if gate is None else out * gate[..., None].astype(out.dtype)


def dot_product_attention(q, k, v, mask, gate=None):
    """The plain kernel. q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; mask: [B, 1, T, S].

    H must be a multiple of K: each group of H/K query heads reads one K/V head. `gate`, if
    given ([B, T, H]), scales each head's output per token (used by attention experts).
    Returns [B, T, H, Dh].
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(head_dim).astype(jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(batch, length, heads, head_dim)
    if gate is not None:
        out = out * gate[..., None].astype(out.dtype)
    return out


def _jax_nn_mask(mask, window: int) -> dict:
    """jax.nn.dot_product_attention's masking arguments for `mask` (see attention)."""
    if not isinstance(mask, Documents):
        return dict(mask=mask)
    ids = mask.segment_ids
    same_doc = None if ids is None else (ids[:, :, None] == ids[:, None, :])[:, None]
    # (left, right) = (W - 1, 0): a query reads its own position and the W - 1 before it.
    return dict(mask=same_doc, is_causal=True, local_window_size=(window - 1, 0) if window else None)


def _xla(q, k, v, mask, window: int):
    return jax.nn.dot_product_attention(q, k, v, **_jax_nn_mask(mask, window), implementation='xla')


def _cudnn(q, k, v, mask, window: int):
    # Causality and the window are the kernel's own (MaskType.CAUSAL, sliding_window_length = W),
    # so it skips the blocks above the diagonal and outside the window. Packed documents go in as
    # the boolean mask, which cuDNN adds as a [B, 1, T, T] bias: its own packing (q/kv offsets,
    # segment lengths) is reachable only through jax._src, needs Hopper and a static bound on the
    # documents per row. A model called without segment_ids (one document per row) builds no mask.
    try:
        return jax.nn.dot_product_attention(q, k, v, **_jax_nn_mask(mask, window), implementation='cudnn')
    except (NotImplementedError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BamJaxError(f"ModelConfig.attention_impl='cudnn' cannot run this attention ({reason}); "
                          "use 'xla'") from None


def _splash(q, k, v, mask, window: int):
    """Splash attention per example, over the current mesh (a Pallas kernel is not partitioned
    automatically: batch and heads are split by shard_map)."""
    if not isinstance(mask, Documents):
        raise BamJaxError("ModelConfig.attention_impl='splash' reads packed documents as segment ids, "
                          "not a mask array; use 'plain' or 'xla'")
    length, head_dim = q.shape[1], q.shape[3]
    if length % SPLASH_BLOCKS[-1]:
        raise BamJaxError(f"ModelConfig.attention_impl='splash' needs a sequence length that is a multiple of "
                          f"{SPLASH_BLOCKS[-1]}, got {length}; use 'plain' or 'xla'")
    # The kernel does not scale the scores: scale q (in float32) instead.
    q = (q.astype(jnp.float32) * head_dim ** -0.5).astype(q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, T, Dh]
    local = functools.partial(_splash_local, window=window, interpret=SPLASH_INTERPRET)
    out = _over_mesh(local, q, k, v, mask.segment_ids)
    return out.transpose(0, 2, 1, 3)


def _splash_local(q, k, v, segment_ids, *, window: int, interpret: bool):
    """q [B, H, T, Dh], k, v [B, K, T, Dh] (one device's share) -> [B, H, T, Dh]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    kernel = _splash_kernel(q.shape[1], q.shape[2], window, interpret)
    if segment_ids is None:
        return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids)))(
        q, k, v, segment_ids)


@functools.cache
def _splash_kernel(heads: int, length: int, window: int, interpret: bool):
    """The kernel for one example: causal (or the last `window` positions), H query heads over
    any number of K/V heads dividing H (splash's grouped form)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    shape = (length, length)
    one = splash.LocalMask(shape, (window - 1, 0), offset=0) if window else splash.CausalMask(shape)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to reuse across traces
        return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def _over_mesh(fn, q, k, v, segment_ids):
    """fn(q, k, v, segment_ids) on each device's batch rows and heads (heads split over 'tensor'
    when it divides both H and K: contiguous blocks keep every query head with its K/V head)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, segment_ids)
    batch = logical_to_spec(('batch',), q.shape[:1], mesh)[0]
    tensor = mesh.shape.get('tensor', 1)
    heads = 'tensor' if tensor > 1 and not q.shape[1] % tensor and not k.shape[1] % tensor else None
    qkv = P(batch, heads, None, None)
    # check_vma=False: the Pallas call declares no per-axis variance for its outputs.
    over = functools.partial(jax.shard_map, mesh=mesh, out_specs=qkv, check_vma=False)
    if segment_ids is None:
        return over(lambda q, k, v: fn(q, k, v, None), in_specs=(qkv,) * 3)(q, k, v)
    return over(fn, in_specs=(qkv, qkv, qkv, P(batch, None)))(q, k, v, segment_ids)
