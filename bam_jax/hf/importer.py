"""`bam-jax import-hf`: a Hugging Face dense model becomes a bam_jax checkpoint directory.

Output, usable as INIT_CHECKPOINT (branch.gin), as --seed/--experts of `bam-jax upcycle`, and as
--workdir of `bam-jax eval` and `bam-jax generate`:
  OUT/checkpoints/0/params, model   the weights (float32 by default) and the ModelConfig
  OUT/model.gin                     the model (its length in ModelConfig.max_length) and its
                                    tokenizer (DataConfig.tokenizer_path), as gin bindings
  OUT/tokenizer/                    the model's tokenizer files, copied
  OUT/import.json                   what was imported: source, architecture, dtype, tensor count,
                                    and the source's config.json
Tensors stream one at a time from the safetensors files into the checkpoint, so memory stays
near the largest tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np

from bam_jax import storage, workdir
from bam_jax.data import copy_tokenizer_files
from bam_jax.errors import BamJaxError
from bam_jax.hf import families
from bam_jax.hf.safetensors_files import SafetensorsReader, weight_files
from bam_jax.models import ModelConfig, abstract_model, flatten, split_params
from bam_jax.progress import progress_bar
from bam_jax.upcycle.gin_file import model_gin
from bam_jax.workdir import files, outputs, tensors
from bam_jax.workdir.files import TOKENIZER_DIR

IMPORT_RECORD = 'import.json'
DTYPES = ('float32', 'bfloat16')
# The longest ModelConfig.max_length an import gets (what generate and the harness cut contexts
# to) unless told otherwise: the model's own limit can be far longer than one host reads at once.
MAX_LENGTH = 2048


def read_hf_config(hf_dir: storage.Path) -> dict:
    path = hf_dir / 'config.json'
    if not hf_dir.is_dir():
        raise BamJaxError(f'{hf_dir} is not a directory')
    if not path.is_file():
        raise BamJaxError(f'{hf_dir} has no config.json: is it a Hugging Face model directory?')
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise BamJaxError(f'cannot read {path}: {e}') from None


def _hf_tensors(reader: SafetensorsReader, mapping: list[families.Tensor], family: str,
                tied: bool) -> list[families.Tensor]:
    """The mapping, checked against the files: every tensor there, none left over."""
    names = set(reader.names())
    missing = [t.hf for t in mapping if t.hf not in names]
    if missing:
        raise BamJaxError(f'missing weights: {missing[0]} (and {len(missing) - 1} more) not in {reader.directory}'
                          if len(missing) > 1 else f'missing weights: {missing[0]} not in {reader.directory}')
    expected = {t.hf for t in mapping} | ({'lm_head.weight'} if tied else set())  # tied files may carry a copy
    unknown = sorted(n for n in names - expected if not n.endswith('rotary_emb.inv_freq'))
    if unknown:
        raise BamJaxError(f'{family}: unexpected tensor {unknown[0]} ({len(unknown)} in all); '
                          'the checkpoint does not match its config.json')
    return mapping


@dataclasses.dataclass(frozen=True)
class ImportRecord:
    """What an import wrote, saved as OUT/import.json (to_dict).

    source: the Hugging Face directory; architecture: its config.json's class (LlamaForCausalLM,
    ...); family: families.ARCHITECTURE's key for it (llama, ...); dtype: the stored dtype;
    tensors: how many were converted; bytes_read, bytes_written, largest_tensor_bytes: tensor bytes;
    tokenizer_files: the names copied into OUT/tokenizer; model: the imported model's config;
    hf_config: the source's config.json; seconds: the import's wall time.
    """
    source: str
    architecture: str
    family: str
    dtype: str
    tensors: int
    bytes_read: int
    bytes_written: int
    largest_tensor_bytes: int
    tokenizer_files: list[str]
    model: ModelConfig
    hf_config: dict
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """import.json's content."""
        return dataclasses.asdict(self)


def import_hf(hf_dir: str | storage.Path, out: str | storage.Path, *, dtype: str = 'float32',
              overwrite: bool = False, progress: bool = True) -> ImportRecord:
    """Imports the model in hf_dir into out; returns the record also saved as OUT/import.json."""
    start = time.perf_counter()
    hf_dir, out = storage.path(hf_dir), storage.path(out)
    if dtype not in DTYPES:
        raise BamJaxError(f'--dtype={dtype!r} is not one of {DTYPES}')
    hf = read_hf_config(hf_dir)
    config, family = families.model_config(hf, param_dtype=dtype)
    length = min(int(hf.get('max_position_embeddings') or MAX_LENGTH), MAX_LENGTH)
    config = dataclasses.replace(config, max_length=length)
    tokenizer = hf_dir / 'tokenizer.json'
    if not tokenizer.is_file():
        raise BamJaxError(f'{hf_dir} has no tokenizer.json (the model\'s Hugging Face tokenizer)')
    # safetensors memory-maps its files: a remote model's weights are downloaded first.
    with outputs.atomic_output(out, 'import', overwrite) as tmp, \
            storage.local_copy(hf_dir, weight_files(hf_dir)) as local:
        reader = SafetensorsReader(local, source=hf_dir)
        mapping = _hf_tensors(reader, families.tensors(config, family), family, config.tie_embeddings)
        record = _write_import(tmp, out, hf_dir, hf, reader, mapping, config, family, dtype, progress)
        record = dataclasses.replace(record, seconds=time.perf_counter() - start)
        workdir.write_json_atomic(tmp / IMPORT_RECORD, record.to_dict())
    return record


def _write_import(tmp: storage.Path, out: storage.Path, hf_dir: storage.Path, hf: dict,
                  reader: SafetensorsReader, mapping: list[families.Tensor], config, family: str,
                  dtype: str, progress: bool) -> ImportRecord:
    """Writes the checkpoint, model.gin and tokenizer into tmp; returns the import record (its
    seconds left to the caller)."""
    _, abstract = split_params(abstract_model(config))
    shapes = {path: tuple(v.shape) for path, v in flatten(abstract).items()}

    def converted():
        for tensor in progress_bar(mapping, f'import {family}', 'tensor', progress):
            shape = shapes[tensor.bam]
            hf_value = reader.read(tensor.hf)
            if hf_value.shape != tensor.hf_shape(shape):
                raise BamJaxError(f'{tensor.hf} has shape {hf_value.shape}; config.json implies '
                                  f'{tensor.hf_shape(shape)}')
            yield tensor.bam, tensor.to_bam(hf_value, shape).astype(dtype, order='C')  # one copy, transposed

    largest = max(math.prod(s) for s in shapes.values()) * np.dtype(dtype).itemsize
    written, _ = tensors.write_params(tmp, converted(), budget=largest)
    outputs.write_model_config(tmp, config)
    copied = copy_tokenizer_files(hf_dir, tmp / TOKENIZER_DIR)
    gin = model_gin(config, out, f'bam-jax import-hf --hf_dir={hf_dir}', tokenizer=out / TOKENIZER_DIR)
    (tmp / files.MODEL_GIN).write_text(gin)
    return ImportRecord(
        source=str(hf_dir), architecture=families.ARCHITECTURE[family], family=family, dtype=dtype,
        tensors=len(mapping), bytes_read=reader.bytes_read, bytes_written=written, largest_tensor_bytes=largest,
        tokenizer_files=copied, model=config, hf_config=hf)
