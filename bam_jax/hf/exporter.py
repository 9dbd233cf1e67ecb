"""`bam-jax export-hf`: a run's latest checkpoint as a Hugging Face model directory.

Formats (--format; `auto` takes the first that computes the model exactly):
  llama, mistral, qwen2, qwen3     dense models with sequential blocks (auto prefers the family
                                   the run was imported from)
  mixtral, qwen3_moe, qwen2_moe    BTX: routed FFN experts, sequential blocks, dense attention
  bam_jax                          anything, BAM and Lory included: this project's own modeling
                                   file ships in the export (bam_jax/hf/remote), loaded with
                                   trust_remote_code=True
A standard family never receives a model it would compute differently: naming it explicitly
gives one line with the reason and the format that would work.

Output: config.json, generation_config.json, model.safetensors (or shards and their index), the
tokenizer (the run's Hugging Face tokenizer, or one that encodes exactly as the byte vocabulary),
export.json (what was exported from where), and for bam_jax the modeling files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import ml_dtypes
import numpy as np

from bam_jax import data, gin_config, storage, workdir
from bam_jax.errors import BamJaxError
from bam_jax.hf import families, remote
from bam_jax.hf.importer import IMPORT_RECORD
from bam_jax.hf.safetensors_files import DEFAULT_SHARD_BYTES, TensorSpec, write_safetensors
from bam_jax.models import ModelConfig
from bam_jax.progress import progress_bar
from bam_jax.workdir import files, outputs
from bam_jax.workdir import tensors as workdir_tensors

CUSTOM = 'bam_jax'
FORMATS = ('auto', *families.DENSE.values(), *families.MOE.values(), CUSTOM)
EXPORT_RECORD = 'export.json'
READ_AHEAD = 2  # tensors' worth of bytes (the largest's) read ahead of the one being converted
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}


def moe_routing(config: ModelConfig) -> dict | None:
    """The FFN experts' routing at inference as a standard MoE family states it: {'top_k': k,
    'renormalize': whether the k gates are renormalised}. Soft routing is top-E, where both agree."""
    moe = config.moe
    if moe is None:
        return None
    if moe.routing == 'soft':
        return {'top_k': moe.num_routed_experts, 'renormalize': True}
    return {'top_k': 1 if moe.routing == 'sample_top1' else moe.top_k, 'renormalize': moe.gate == 'renormalize'}


def why_not(config: ModelConfig, family: str) -> str | None:
    """Why `family` would compute something other than the model (None: it computes it exactly)."""
    if family == CUSTOM:
        return None
    routed = family in families.MOE.values()
    reasons = [
        (config.parallel_block, 'its blocks are parallel (attention and FFN read the same input)'),
        (config.moa is not None, 'it has attention experts'),
        (config.lory is not None, "it merges Lory's experts per segment"),
        (routed and config.moe is None, 'it has no routed experts'),
        (not routed and config.moe is not None, 'it has routed experts'),
        (config.qkv_bias and family not in ('qwen2', 'qwen2_moe'), 'it has q/k/v biases'),
        (config.qk_norm and family not in ('qwen3', 'qwen3_moe'), 'it normalises q and k'),
        (not config.qk_norm and family in ('qwen3', 'qwen3_moe'), f'{family} normalises q and k, the model does not'),
        (config.sliding_window > 0 and family not in ('mistral', 'mixtral'), 'it has a sliding window'),
        (family == 'mixtral' and config.moe is not None and not moe_routing(config)['renormalize'],
         'its top-k gates are not renormalised (mixtral renormalises them)'),
    ]
    return next((reason for failed, reason in reasons if failed), None)


def choose_format(config: ModelConfig, requested: str, origin: str | None) -> str:
    """The format to write: `requested`, checked, or for 'auto' the first that fits (the family
    the model was imported from first)."""
    if requested not in FORMATS:
        raise BamJaxError(f'--format={requested!r} is not one of {", ".join(FORMATS)}')
    candidates = [origin] if origin in families.DENSE.values() else []
    candidates += ['llama', 'mistral', 'qwen2', 'qwen3', 'mixtral', 'qwen3_moe', 'qwen2_moe', CUSTOM]
    fitting = next(f for f in candidates if why_not(config, f) is None)
    if requested == 'auto':
        return fitting
    reason = why_not(config, requested)
    if reason:
        raise BamJaxError(f'--format={requested} cannot express this model: {reason}; use --format={fitting}')
    return requested


# --- where a run came from ----------------------------------------------------------------------

def _same_place(a: storage.Path, b: storage.Path) -> bool:
    if storage.is_uri(a) or storage.is_uri(b):
        return os.fspath(a) == os.fspath(b)
    return os.path.realpath(a) == os.path.realpath(b)  # links followed, as pathlib's resolve()


def import_record(directory: storage.Path, depth: int = 8) -> dict | None:
    """The import.json of the Hugging Face model a run descends from, following its
    INIT_CHECKPOINT and an upcycled model's inputs (the first that has one); None if none does."""
    if depth == 0 or not directory.is_dir():
        return None
    if (directory / IMPORT_RECORD).is_file():
        return json.loads((directory / IMPORT_RECORD).read_text())
    inits = files.string_bindings(directory, 'INIT_CHECKPOINT', 'TrainConfig.init_checkpoint')
    parents = [storage.path(p) for p in inits]
    if (directory / files.UPCYCLE).is_file():
        inputs = json.loads((directory / files.UPCYCLE).read_text())['inputs']
        parents += [storage.path(i['step_dir']).parents[1] for i in inputs]  # <workdir>/checkpoints/<step>
    for parent in parents:
        if not _same_place(parent, directory):
            found = import_record(parent, depth - 1)
            if found:
                return found
    return None


# --- the export ---------------------------------------------------------------------------------

def _token_ids(vocabulary, hf: dict) -> dict:
    """bos/eos/pad ids: the imported model's own, else the vocabulary's (bos: the start token
    bam_jax puts before every text)."""
    ids = {'bos_token_id': data.start_id(vocabulary), 'eos_token_id': vocabulary.eos_id,
           'pad_token_id': vocabulary.pad_id}
    return {k: hf.get(k, v) for k, v in ids.items()}


def _tensor_specs(config: ModelConfig, fmt: str, shapes: dict, reader: workdir_tensors.CheckpointReader,
                  dtype: np.dtype) -> list[TensorSpec]:
    """What to write, in order; each tensor is read (the last source kept: experts share one) and
    converted when it is written, with the next sources read ahead (READ_AHEAD x the largest)."""
    last: dict[str, np.ndarray] = {}
    if fmt == CUSTOM:  # bam_jax's own names and layouts, '/' -> '.'
        tensors_in_order = [(path, path) for path in shapes]
    else:
        tensors_in_order = [(t, None if t.kind == 'zeros' else t.bam) for t in families.tensors(config, fmt)]
    wanted = [p for _, p in tensors_in_order if p]
    sources = [p for i, p in enumerate(wanted) if not i or p != wanted[i - 1]]  # as `source` reads them
    ahead = workdir_tensors.ReadAhead((reader, p) for p in sources)
    room = READ_AHEAD * max(reader.nbytes.values())

    def source(path: str) -> np.ndarray:
        if path not in last:
            last.clear()
            ahead.top_up(room)
            last[path] = ahead.get(reader, path)
        return last[path]

    if fmt == CUSTOM:
        return [TensorSpec(path.replace('/', '.'), shape, dtype, lambda p=path: source(p).astype(dtype))
                for path, shape in shapes.items()]
    specs = []
    for tensor, _ in tensors_in_order:
        if tensor.kind == 'zeros':
            specs.append(TensorSpec(tensor.hf, tensor.zeros_shape, dtype,
                                    lambda t=tensor: np.zeros(t.zeros_shape, dtype)))
        else:
            specs.append(TensorSpec(tensor.hf, tensor.hf_shape(shapes[tensor.bam]), dtype,
                                    lambda t=tensor: t.to_hf(source(t.bam)).astype(dtype, order='C')))
    return specs


def _write_tokenizer(out: storage.Path, data_config) -> list[str]:
    if data_config.tokenizer_path:
        return data.copy_tokenizer_files(storage.path(data_config.tokenizer_path), out)
    if data_config.spm_path:  # no exact Hugging Face form is written for a SentencePiece vocabulary
        return []
    return data.write_byte_tokenizer(out)


@dataclasses.dataclass(frozen=True)
class ExportRecord:
    """What an export wrote, saved as OUT/export.json (to_dict).

    run: the run directory; step_dir: the checkpoint exported; format: one of FORMATS (never
    'auto'); dtype: the weights' dtype; architecture: config.json's class (MixtralForCausalLM,
    BamJaxForCausalLM, ...); tensors: how many were written; bytes_read, bytes_written: tensor
    bytes; files: the safetensors files' names; tokenizer_files: the tokenizer's file names (none
    for a SentencePiece vocabulary); imported_from: the Hugging Face directory the run descends
    from, if any; model: the exported model's config; seconds: the export's wall time.
    """
    run: str
    step_dir: str
    format: str
    dtype: str
    architecture: str
    tensors: int
    bytes_read: int
    bytes_written: int
    files: list[str]
    tokenizer_files: list[str]
    imported_from: str | None
    model: ModelConfig
    seconds: float

    def to_dict(self) -> dict:
        """export.json's content."""
        return dataclasses.asdict(self)


def export_hf(run: str | storage.Path, out: str | storage.Path, *, fmt: str = 'auto', dtype: str = 'bfloat16',
              bindings: list[str] = (), overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              progress: bool = True) -> ExportRecord:
    """Exports the latest checkpoint of `run` (under its config.gin plus bindings: the routing
    settings decide the format) to `out`; returns the record also saved as OUT/export.json."""
    start = time.perf_counter()
    run, out = storage.path(run), storage.path(out)
    if dtype not in DTYPES:
        raise BamJaxError(f'--dtype={dtype!r} is not one of {tuple(DTYPES)}')
    configs = gin_config.load_run_config(run, list(bindings))
    config = configs.model
    step_dir = workdir.resolve_checkpoint(run, 'workdir')
    workdir.check_model(config, step_dir, f'checkpoint {step_dir}')
    origin = import_record(run)
    fmt = choose_format(config, fmt, origin and origin['family'])
    data_config = configs.data
    vocabulary = data.vocabulary(data_config)
    hf_origin = origin['hf_config'] if origin else {}
    token_ids = _token_ids(vocabulary, hf_origin)
    max_length = int(hf_origin.get('max_position_embeddings') or configs.max_length)
    shapes = {path: shape for path, (shape, _) in workdir.read_param_shapes(step_dir).items()}

    with outputs.atomic_output(out, 'export', overwrite) as tmp:
        tmp.mkdir(parents=True)
        reader = workdir_tensors.CheckpointReader(step_dir)
        specs = _tensor_specs(config, fmt, shapes, reader, DTYPES[dtype])
        bar = progress_bar(None, f'export {fmt}', 'tensor', progress, total=len(specs))
        index = write_safetensors(tmp, specs, max_shard_bytes=max_shard_bytes, done=lambda spec: bar.update())
        bar.close()
        if fmt == CUSTOM:
            hf_config = remote.config_dict(config, max_position_embeddings=max_length, **token_ids)
            remote.copy_code(tmp)
        else:
            hf_config = families.hf_config(config, fmt, dtype=dtype, max_length=max_length, token_ids=token_ids,
                                           moe=moe_routing(config))
        hf_config['torch_dtype'] = dtype
        (tmp / 'config.json').write_text(json.dumps(hf_config, indent=2) + '\n')
        generation = {**token_ids, 'do_sample': False}
        (tmp / 'generation_config.json').write_text(json.dumps(generation, indent=2) + '\n')
        tokenizer = _write_tokenizer(tmp, data_config)
        record = ExportRecord(
            run=str(run), step_dir=str(step_dir), format=fmt, dtype=dtype, architecture=hf_config['architectures'][0],
            tensors=len(specs), bytes_read=reader.bytes_read, bytes_written=index['metadata']['total_size'],
            files=sorted(set(index['weight_map'].values())), tokenizer_files=tokenizer,
            imported_from=origin and origin['source'], model=config, seconds=time.perf_counter() - start)
        workdir.write_json_atomic(tmp / EXPORT_RECORD, record.to_dict())
    return record
