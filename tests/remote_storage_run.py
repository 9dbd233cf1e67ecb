"""Every stage's CLI against one `gs://` bucket, in this one process (tests/test_storage.py starts
it with the environment that points epath, TensorStore and TensorBoard at a local GCS emulator).

Usage: python tests/remote_storage_run.py BUCKET REPORT.json
Trains a tiny seed for 2 of 4 steps, resumes it to 4, upcycles it into 2 experts, evaluates the
upcycled model (eval.json, routing map), exports the seed to Hugging Face files, imports them
back and generates with the imported model's tokenizer, and prepares a user domain of JSONL files
in the bucket into prepared token files in the bucket, all under gs://BUCKET. The report holds
what the test compares.
"""

import json
import sys

import numpy as np

from bam_jax import cli

RUN = ['--gin_file=gin/models/tiny.gin', '--gin_file=gin/seed.gin', "--gin.DataConfig.source='code'",
       '--gin.TRAIN_STEPS=4', '--gin.BATCH_SIZE=8', '--gin.SEQ_LEN=32', '--gin.TrainConfig.warmup_steps=1',
       '--gin.TrainConfig.checkpoint_every=2', '--gin.TrainConfig.eval_every=4', '--gin.DataConfig.eval_batches=1',
       '--gin.ModelConfig.num_layers=1', "--gin.ModelConfig.dtype='float32'",
       '--gin.ModelConfig.parallel_block=False']  # a Llama, so the export is one transformers reads


def _run(*args) -> None:
    print('$ bam-jax', ' '.join(args), flush=True)
    status = cli.main(list(args))
    if status:
        raise SystemExit(f'bam-jax {args[0]} exited {status}')


def _params(directory: str) -> dict[str, np.ndarray]:
    from bam_jax.models.params import flatten
    from bam_jax.workdir import read_param_shapes, resolve_checkpoint
    from bam_jax.workdir.tensors import CheckpointReader

    step_dir = resolve_checkpoint(directory)
    reader = CheckpointReader(step_dir)
    return {path: reader.read(path) for path in flatten(read_param_shapes(step_dir))}


PREPARED_TEXTS = [f'document {i}: ' + 'words ' * i for i in range(1, 41)]


def _prepare(root: str) -> list[str]:
    """prepare-data from gs://.../raw/*.jsonl to gs://.../prepared; the prepared texts, read back."""
    from bam_jax import gin_config, storage
    from bam_jax.data import DataConfig
    from bam_jax.data.prepare import open_split, prepared_name

    for i in range(2):
        lines = ''.join(json.dumps({'text': t}) + '\n' for t in PREPARED_TEXTS[i::2])
        storage.path(f'{root}/raw/part{i}.jsonl').write_text(lines)
    gin_file = storage.path(f'{root}/notes.gin')
    gin_file.write_text(f"DataConfig.user_domains = [@notes/text_domain()]\nnotes/text_domain.name = 'notes'\n"
                        f"notes/text_domain.paths = ['{root}/raw/*.jsonl']\nDataConfig.data_dir = '{root}/prepared'\n")
    _run('prepare-data', f'--gin_file={gin_file}', '--domains=notes')
    gin_config.parse_gin([str(gin_file)], [])
    name = prepared_name(DataConfig(), 'notes')
    texts = []
    for split in ('train', 'validation'):
        tokens = open_split(f'{root}/prepared', name, split)
        ids, starts = tokens.window(0, tokens.tokens)
        bounds = [*starts.tolist(), len(ids)]
        texts += [bytes(t - 3 for t in ids[a:b - 1]).decode() for a, b in zip(bounds, bounds[1:])]
    return name, texts


def main(bucket: str, report: str) -> None:
    root = f'gs://{bucket}'
    name, prepared = _prepare(root)
    _run('train', *RUN, '--gin.TrainConfig.stop_at_step=2', f'--workdir={root}/seed')
    _run('train', *RUN, f'--workdir={root}/seed')
    _run('upcycle', '--method=sparse_upcycle', '--num_experts=2', f'--seed={root}/seed', f'--out={root}/moe')
    _run('eval', f'--workdir={root}/moe', '--gin.DataConfig.eval_batches=1')
    _run('export-hf', f'--workdir={root}/seed', f'--out={root}/hf', '--dtype=float32')
    _run('import-hf', f'--hf_dir={root}/hf', f'--out={root}/imported')
    # the imported model reads its data with the tokenizer it carries, in the bucket
    _run('generate', f'--workdir={root}/imported', '--prompt=def ', '--max_new_tokens=4', '--json')
    seed, imported = _params(f'{root}/seed'), _params(f'{root}/imported')
    with open(report, 'w') as f:
        json.dump({'prepared_name': name, 'prepared_texts': sorted(prepared), 'input_texts': sorted(PREPARED_TEXTS),
                   'seed_params': sorted(seed), 'imported_params': sorted(imported),
                   'max_difference': max(float(np.max(np.abs(seed[k] - imported[k]))) for k in seed)}, f)


if __name__ == '__main__':
    main(*sys.argv[1:])
