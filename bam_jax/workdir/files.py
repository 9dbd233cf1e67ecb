"""The names of a run directory's files, and atomic JSON writes.

A workdir (`bam-jax train --workdir=DIR`, or the output of `bam-jax upcycle`) holds:
  checkpoints/<step>/   Orbax checkpoints (bam_jax.workdir.checkpoints)
  config.gin            the operative gin config of the run (what `bam-jax eval` rebuilds it from)
  metrics.json          train and validation records (bam_jax.train.metrics)
  budget.json           steps, tokens and FLOPs trained (bam_jax.train.budget)
  eval.json             the last `bam-jax eval` (bam_jax.evaluate.evaluator)
  routing_map.png       its routing map, for expert models
  tb/                   TensorBoard scalars
  dense_warmup/         Lory from scratch: the dense warm-up's own workdir
  model.gin             upcycled outputs: the model as gin bindings, INIT_CHECKPOINT = DIR
  upcycle.json          upcycled outputs: what was built from what
  tokenizer/            upcycled and imported outputs: the model's Hugging Face tokenizer, if it has one
  import.json           imported outputs: what was imported from where (bam_jax.hf.importer)
"""

from __future__ import annotations

import json
import re

from etils import epath

CHECKPOINTS = 'checkpoints'
CONFIG = 'config.gin'
METRICS = 'metrics.json'
BUDGET = 'budget.json'
EVAL = 'eval.json'
ROUTING_MAP = 'routing_map.png'
TENSORBOARD = 'tb'
DENSE_WARMUP = 'dense_warmup'
MODEL_GIN = 'model.gin'
UPCYCLE = 'upcycle.json'
TOKENIZER_DIR = 'tokenizer'


def write_json_atomic(path: epath.Path, value) -> None:
    """Writes to a temporary file and renames it into place: readers never see half a file
    (an object store's single-object writes are whole by themselves; the rename keeps one path)."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)


def string_bindings(directory: epath.Path, *names: str) -> list[str]:
    """The string values bound to any of `names` (gin: `NAME = 'value'`) in a run directory's
    config.gin, or in the model.gin of an upcycled or imported model, in file order."""
    for file in (CONFIG, MODEL_GIN):
        if (directory / file).is_file():
            pattern = re.compile(rf"^(?:{'|'.join(map(re.escape, names))})\s*=\s*'([^']*)'", re.MULTILINE)
            return pattern.findall((directory / file).read_text())
    return []
