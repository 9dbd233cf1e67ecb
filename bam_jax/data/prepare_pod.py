"""`bam-jax prepare-data --distributed`: the workers of a pod (or of a local job) prepare one
domain together, each reading a disjoint part of its input files (DomainSource.part:
consecutive files of about equal bytes), so preparation scales with the slice. The result is the
domain one process would prepare, with the same documents on each side of the split.

    1. hash     every worker reads its files and writes the sorted hashes of its documents
    2. write    every worker de-duplicates against its own documents and every earlier worker's
                hashes (the first copy in file order is kept, as on one process), then
                tokenizes and writes its parts; its held-back validation candidates go aside
    3. join     the first worker tops up the validation split from all workers' candidates,
                writes the manifest and publishes the domain

The workers share one staging directory beside the prepared domain, so the data directory must
be one they all see: a bucket (gs://...) or a shared filesystem. They agree between steps
through jax.distributed (the job's processes: a pod's hosts, or launch/run.sh
--local_processes), and a worker that fails makes every worker stop with an error; nothing is
published. Holding every earlier worker's hashes costs 8 bytes per document of the domain.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import tempfile
import time

import numpy as np

from bam_jax import storage
from bam_jax.data import sources
from bam_jax.data.prepare import (
    MANIFEST,
    DomainManifest,
    DomainSource,
    DomainWriter,
    Encoder,
    Held,
    SeenHashes,
    SplitWriter,
    check_not_empty,
    document_batches,
    document_hash,
    domain_dir,
    domain_settings,
    manifest,
    place_held,
    prepared_name,
)
from bam_jax.data.token_files import Part
from bam_jax.errors import BamJaxError
from bam_jax.progress import progress_bar

_HASHES, _HELD, _WORKERS = 'hashes', 'held', 'workers'  # the staging directory's working files


@dataclasses.dataclass(frozen=True)
class Workers:
    """This process's place among the processes that prepare together."""
    index: int = 0
    count: int = 1

    @classmethod
    def of_job(cls) -> Workers:
        """The processes of the jax.distributed job this process has joined."""
        import jax

        return cls(jax.process_index(), jax.process_count())

    def gather(self, value: int) -> list[int]:
        """Every worker's `value`, in worker order; a point all of them pass together."""
        if self.count == 1:
            return [value]
        from jax.experimental import multihost_utils

        return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int64(value))).ravel()]

    def together(self, step):
        """Runs step() on every worker; when any of them fails, every one raises (the failed one
        its own error, the others one naming it)."""
        try:
            result, error = step(), None
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
            result, error = None, e
        failed = [i for i, f in enumerate(self.gather(error is not None)) if f]
        if error is not None:
            raise error
        if failed:
            raise BamJaxError(f"prepare-data: worker {', '.join(map(str, failed))} failed (its error is in its log); "
                              'nothing was published')
        return result


def prepare_together(config, domain: str, workers: Workers, skip_bad: bool = False,
                     progress: bool = True) -> DomainManifest:
    """Prepares `domain` into config.data_dir with every worker of the job; returns the manifest
    (on every worker)."""
    start = time.perf_counter()
    source, encoder = DomainSource(config, domain), Encoder(config.spm_path, config.tokenizer_path)
    out = domain_dir(config.data_dir, prepared_name(config, domain))
    shared = out.parent / f'.{out.name}.prepare-workers'
    try:
        _check_shared(shared, workers)
        files = source.part(workers.index, workers.count)
        workers.together(lambda: _write_hashes(source, files, shared, workers.index, skip_bad, progress))
        workers.together(lambda: _write_part(source, files, encoder, shared, workers, skip_bad, progress))
        if workers.index == 0:
            record = workers.together(lambda: _join(source, encoder, shared, out, workers.count, start))
        else:
            workers.together(lambda: None)
            record = DomainManifest.from_dict(json.loads((out / MANIFEST).read_text()))
    except BaseException:
        if workers.index == 0:
            storage.remove(shared)
        raise
    return record


def _check_shared(shared: storage.Path, workers: Workers) -> None:
    """The first worker starts an empty staging directory with a random token in it; every
    worker must read that token there (a data directory local to each host would not show it)."""
    token = workers.together(lambda: _start_staging(shared) if workers.index == 0 else 0)
    expected = workers.gather(token)[0]
    read = workers.together(lambda: int((shared / 'token').read_text()) if (shared / 'token').is_file() else 0)
    if any(seen != expected for seen in workers.gather(read)):
        raise BamJaxError(f'{shared.parent} is not shared by every worker: set DataConfig.data_dir to a bucket '
                          '(gs://...) or a filesystem they all see')


def _start_staging(shared: storage.Path) -> int:
    storage.remove(shared)
    shared.mkdir(parents=True)
    token = random.getrandbits(62) + 1
    (shared / 'token').write_text(str(token))
    return token


def _write_hashes(source: DomainSource, files, shared: storage.Path, index: int, skip_bad: bool,
                  progress: bool) -> None:
    """Step 1: the sorted hashes of this worker's non-empty documents."""
    seen = SeenHashes()
    bar = progress_bar(None, f'hash {source.domain} [{index}]', source.unit, progress, total=source.size(files))
    for batch in document_batches(source.documents(sources.DocumentReader(source.text_key, skip_bad), files)):
        for _, text in batch:
            seen.add(document_hash(text))
        bar.update(source.batch_size(batch))
    bar.close()
    _save_array(shared / _HASHES / f'{index:05d}.npy', seen.values())


def _write_part(source: DomainSource, files, encoder: Encoder, shared: storage.Path, workers: Workers,
                skip_bad: bool, progress: bool) -> None:
    """Step 2: this worker's documents, de-duplicated against every earlier worker's, as parts
    named wNNNNN-part-*; its held-back candidates as a part and their hashes."""
    index = workers.index
    earlier = [_load_array(shared / _HASHES / f'{i:05d}.npy') for i in range(index)]
    seen = SeenHashes(np.unique(np.concatenate([np.zeros(0, np.uint64), *earlier])))
    local = storage.path(tempfile.mkdtemp(prefix='bam_jax-prepare-')) if storage.is_uri(shared) else shared
    reader = sources.DocumentReader(source.text_key, skip_bad)
    writer = DomainWriter(encoder, local, domain_settings(source.config, source.domain), seen, prefix=f'w{index:05d}-')
    bar = progress_bar(None, f'prepare {source.domain} [{index}]', source.unit, progress, total=source.size(files))
    try:
        for batch in document_batches(source.documents(reader, files)):
            writer.add(batch)
            bar.update(source.batch_size(batch))
        held = writer.finish()
        held_split = SplitWriter(local / _HELD, encoder.dtype, prefix=f'w{index:05d}-')
        for entry in held:
            held_split.add(entry.ids)
        _save_array(local / _HELD / f'{index:05d}.npy', np.array([-e.negative_hash for e in held], np.uint64))
        record = {'documents_read': writer.read, 'kept': writer.kept, 'skipped': reader.skipped,
                  'splits': {split: w.close() for split, w in writer.writers.items()}, 'held': held_split.close()}
        (local / _WORKERS).mkdir(parents=True, exist_ok=True)
        (local / _WORKERS / f'{index:05d}.json').write_text(json.dumps(record))
        if local != shared:
            storage.copy_tree(local, shared)
    finally:
        bar.close()
        if local != shared:
            storage.remove(local)


def _join(source: DomainSource, encoder: Encoder, shared: storage.Path, out: storage.Path, count: int,
          start: float) -> DomainManifest:
    """Step 3 (first worker): the workers' parts as one domain, the held candidates placed."""
    records = [json.loads((shared / _WORKERS / f'{i:05d}.json').read_text()) for i in range(count)]
    held = sorted(_held(shared, records, encoder.dtype), key=lambda e: -e.negative_hash)
    joined = {split: SplitWriter(shared / split, encoder.dtype, prefix='join-') for split in ('train', 'validation')}
    place_held(held, sum(r['kept'] for r in records), sum(r['splits']['validation']['documents'] for r in records),
               joined)
    splits = {}
    for split, writer in joined.items():
        last = writer.close()['parts']
        parts = [p for r in records for p in r['splits'][split]['parts']] + last
        splits[split] = {'documents': sum(p['documents'] for p in parts), 'tokens': sum(p['tokens'] for p in parts),
                         'parts': parts}
    read = sum(r['documents_read'] for r in records)
    counts = {'documents_read': read, 'duplicates': read - sum(r['kept'] for r in records), 'splits': splits}
    check_not_empty(source.domain, counts, source.inputs())
    for name in (_HASHES, _HELD, _WORKERS, 'token'):
        storage.remove(shared / name)
    skipped = [s for r in records for s in r['skipped']]
    record = dataclasses.replace(manifest(source, out.name, encoder, counts, skipped, time.perf_counter() - start),
                                 workers=count)
    (shared / MANIFEST).write_text(json.dumps(record.to_dict(), indent=1) + '\n')
    storage.publish(shared, out, 'prepare')
    return record


def _held(shared: storage.Path, records: list[dict], dtype: np.dtype):
    """Every worker's held-back candidates, read back with their hashes."""
    for i, record in enumerate(records):
        hashes = _load_array(shared / _HELD / f'{i:05d}.npy')
        for part in (Part(shared / _HELD / p['name'], dtype) for p in record['held']['parts']):
            documents = np.split(part.read(0, part.tokens), part.ends[:-1])
            part.close()
            yield from (Held(-int(h), doc) for h, doc in zip(hashes, documents))


def _save_array(path: storage.Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array)
    path.write_bytes(buffer.getvalue())


def _load_array(path: storage.Path) -> np.ndarray:
    return np.load(io.BytesIO(path.read_bytes()))
