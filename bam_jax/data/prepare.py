"""`bam-jax prepare-data`: a domain's raw documents as prepared token files, with a manifest.

    <data_dir>/<domain>/manifest.json        what was prepared from what, with which settings
    <data_dir>/<domain>/train/part-NNNNN.*   token_files.py: token ids and a document index
    <data_dir>/<domain>/validation/part-NNNNN.*

Documents stream in from their files (sources.py) or the built-in corpora (corpora.py). Each is
de-duplicated by the hash of its normalised content, kept as 8 bytes per document (SeenHashes),
never as text, and goes to validation when that hash, read as a fraction of 2**64, is below
DataConfig.validation_fraction (the split of corpora.split_documents: the same content is always
on the same side). A split too small to evaluate on takes the documents with the smallest
hashes, up to corpora.MIN_VALIDATION_DOCUMENTS and at most half the domain, held back in a heap
of that many documents until the end. Tokens are the run's vocabulary's, each document followed
by its EOS. The domain is built in a hidden directory beside its final place and renamed into
place at the end: an interrupted preparation publishes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import heapq
import json
import time
from collections.abc import Iterable, Iterator

import numpy as np

from bam_jax import storage
from bam_jax.data import corpora, sources, vocab
from bam_jax.data.token_files import Part, PartWriter, Split, token_dtype
from bam_jax.errors import BamJaxError

FORMAT = 'bam_jax token files 1'
MANIFEST = 'manifest.json'
SPLITS = ('train', 'validation')
PART_TOKENS = 1 << 30  # a part rolls over after this many tokens
_BATCH_BYTES = 4 << 20  # text tokenized together
PREPARE_ON_USE_BYTES = 256 << 20  # a local user domain up to this size is prepared when first read


def document_hash(text: str) -> int:
    """The first 64 bits of the sha256 of the normalised text (corpora.content_hash's first 16 hex
    digits, as an int): the de-duplication key and the split's coin."""
    return int.from_bytes(hashlib.sha256(corpora.normalise(text).encode('utf-8')).digest()[:8], 'big')


class SeenHashes:
    """A set of 64-bit hashes in about 8 bytes each: a sorted array, and a small Python set of the
    newest that is merged into it when it grows past `buffer`."""

    def __init__(self, buffer: int = 1 << 20):
        self._sorted, self._new, self._buffer = np.zeros(0, np.uint64), set(), buffer

    def __len__(self) -> int:
        return len(self._sorted) + len(self._new)

    def add(self, value: int) -> bool:
        """Adds `value`; False when it was there already."""
        if value in self._new:
            return False
        i = int(np.searchsorted(self._sorted, np.uint64(value)))
        if i < len(self._sorted) and int(self._sorted[i]) == value:
            return False
        self._new.add(value)
        if len(self._new) >= self._buffer:
            self._sorted = np.union1d(self._sorted, np.fromiter(self._new, np.uint64, len(self._new)))
            self._new = set()
        return True


@functools.cache
def _file_digest(path: str, size: int, mtime: float) -> str:
    """sha256 of a file, read once per process for each size and modification time it has."""
    return hashlib.sha256(storage.path(path).read_bytes()).hexdigest()


class Encoder:
    """The run's vocabulary for preparation: encode(texts) -> id arrays, each ending in EOS."""

    def __init__(self, spm_path=None, tokenizer_path=None):
        self.key = vocab.vocabulary_key(spm_path, tokenizer_path)
        self.kind = self.key[0]
        if self.kind == 'bytes':  # seqio.ByteVocabulary's ids: byte b -> b + 3
            self.vocab_size, self.eos_id = vocab.BYTE_VOCAB_SIZE, vocab.BYTE_EOS_ID
        else:
            self._vocabulary = vocab.make_vocabulary(spm_path, tokenizer_path)
            self.vocab_size, self.eos_id = self._vocabulary.vocab_size, self._vocabulary.eos_id
        self.dtype = token_dtype(self.vocab_size)

    def identity(self) -> dict:
        """What names this vocabulary in a manifest: its kind, file and the file's sha256."""
        if self.kind == 'bytes':
            return {'kind': 'bytes', 'vocab_size': self.vocab_size, 'eos_id': self.eos_id}
        path = str(self._vocabulary.path if self.kind == 'hf' else self.key[1])
        stat = storage.path(path).stat()
        return {'kind': self.kind, 'path': path, 'sha256': _file_digest(path, stat.length, stat.mtime),
                'vocab_size': self.vocab_size,
                'eos_id': self.eos_id}

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self.kind == 'bytes':
            return [np.append(np.frombuffer(t.encode('utf-8'), np.uint8).astype(self.dtype) + 3,
                              self.eos_id).astype(self.dtype) for t in texts]
        if self.kind == 'hf':  # the tokenizers library encodes a batch on every core
            encodings = self._vocabulary.tokenizer.encode_batch(texts, add_special_tokens=False)
            ids = [e.ids for e in encodings]
        else:
            ids = self._vocabulary.tokenizer.encode(texts)
        return [np.asarray(i + [self.eos_id], self.dtype) for i in ids]


class SplitWriter:
    """One split's parts, rolled over every PART_TOKENS tokens."""

    def __init__(self, directory: storage.Path, dtype: np.dtype):
        self.directory, self.dtype = directory, dtype
        self.parts: list[dict] = []
        self.documents = 0
        self._writer: PartWriter | None = None

    def add(self, ids: np.ndarray) -> None:
        if self._writer is None or self._writer.tokens >= PART_TOKENS:
            self._close_part()
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f'part-{len(self.parts):05d}'
            self._writer = PartWriter(self.directory / name, self.dtype)
            self.parts.append({'name': name})
        self._writer.add(ids)
        self.documents += 1

    def _close_part(self) -> None:
        if self._writer is not None:
            self.parts[-1].update(self._writer.close())
            self._writer = None

    def close(self) -> dict:
        self._close_part()
        return {'documents': self.documents, 'tokens': sum(p['tokens'] for p in self.parts), 'parts': self.parts}


@dataclasses.dataclass
class _Held:
    """A validation candidate held back: the heap keeps the largest hash on top."""
    negative_hash: int
    ids: np.ndarray
    text: str

    def __lt__(self, other):
        return self.negative_hash < other.negative_hash


class SimilarityOrder:
    """Passes training documents on to `write` in groups of `group` documents, each group in
    similarity order (similarity.similarity_order: chains of similar documents, as in Lory), so
    the windows cut from the split hold similar neighbours. Holds one group's texts at most."""

    def __init__(self, write, group: int):
        self.write, self.group, self._buffer = write, group, []

    def add(self, ids: np.ndarray, text: str) -> None:
        self._buffer.append((ids, text))
        if len(self._buffer) >= self.group:
            self.flush()

    def flush(self) -> None:
        from bam_jax.data import similarity

        order = similarity.similarity_order([text for _, text in self._buffer], shard_size=self.group)
        for i in order:
            self.write(self._buffer[i][0])
        self._buffer = []


def write_domain(documents: Iterable[tuple[str, str]], encoder: Encoder, tmp: storage.Path,
                 validation_fraction: float, on_document=None, similarity_group: int = 0) -> dict:
    """Writes the de-duplicated, split and tokenized documents under tmp; returns the counts.
    similarity_group > 0: the training split in similarity order over groups of that many."""
    if not 0.0 <= validation_fraction < 1.0:
        raise BamJaxError(f'validation_fraction must be in [0, 1), got {validation_fraction}')
    threshold = validation_fraction * 2.0 ** 64
    seen = SeenHashes()
    writers = {split: SplitWriter(tmp / split, encoder.dtype) for split in SPLITS}
    held: list[_Held] = []  # the train documents of smallest hash, in case validation is too small
    train = SimilarityOrder(writers['train'].add, similarity_group) if similarity_group else None
    read = 0
    for batch in _batches(documents):
        read += len(batch)
        kept = [(h, text) for h, text in ((document_hash(text), text) for _, text in batch) if seen.add(h)]
        for (h, text), ids in zip(kept, encoder.encode([text for _, text in kept])):
            if h < threshold:
                writers['validation'].add(ids)
                continue
            heapq.heappush(held, _Held(-h, ids, text))
            if len(held) > corpora.MIN_VALIDATION_DOCUMENTS:
                out = heapq.heappop(held)
                train.add(out.ids, out.text) if train else writers['train'].add(out.ids)
        if on_document:
            on_document(batch)
    needed = max(0, min(corpora.MIN_VALIDATION_DOCUMENTS, len(seen) // 2) - writers['validation'].documents)
    for i, entry in enumerate(sorted(held, key=lambda e: -e.negative_hash)):
        if i < needed:
            writers['validation'].add(entry.ids)
        else:
            train.add(entry.ids, entry.text) if train else writers['train'].add(entry.ids)
    if train:
        train.flush()
    return {'documents_read': read, 'duplicates': read - len(seen),
            'splits': {split: writer.close() for split, writer in writers.items()}}


def _batches(documents: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch, size = [], 0
    for doc_id, text in documents:
        if not text.strip():
            continue
        batch.append((doc_id, text))
        size += len(text)
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def domain_dir(data_dir: str, name: str) -> storage.Path:
    return storage.path(data_dir) / name


def prepared_name(config, domain: str) -> str:
    """Where a domain is prepared for `config`: DOMAIN-KEY, KEY a digest of the format, the
    settings (domain_settings: similarity order included) and the vocabulary. Runs that differ in
    them read, and prepare, domains of their own: none replaces another's under it."""
    identity = {'format': FORMAT, 'settings': domain_settings(config, domain),
                'vocabulary': Encoder(config.spm_path, config.tokenizer_path).identity()}
    return f'{domain}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]}'


def read_manifest(data_dir: str, name: str) -> dict | None:
    path = domain_dir(data_dir, name) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def open_split(data_dir: str, name: str, split: str, attempts: int = 5) -> Split:
    """A prepared domain's split (name: prepared_name), for reading (token_stream, evaluation).
    Its parts stay readable as opened, even if the domain is prepared again meanwhile; one that
    changes while it is being opened (a publish is a rename) is opened again."""
    for attempt in range(attempts):
        time.sleep(0.1 * attempt)
        manifest = read_manifest(data_dir, name)
        if manifest is None:
            error = BamJaxError(f"'{name}' is not prepared in {data_dir}: run bam-jax prepare-data")
            continue
        directory, dtype = domain_dir(data_dir, name) / split, np.dtype(manifest['dtype'])
        try:
            return Split([Part(directory / part['name'], dtype, part['tokens'])
                          for part in manifest['splits'][split]['parts']])
        except (BamJaxError, OSError) as e:  # token_files.Changed among them
            error = e
    raise error


def prepare_documents(domain: str, documents: Iterable[tuple[str, str]], encoder: Encoder, out: storage.Path,
                      settings: dict, inputs: list[dict], progress=None, skipped: list | None = None) -> dict:
    """Prepares one domain from its (id, text) stream into `out`; returns its manifest."""
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = storage.staging_dir(out, 'prepare')
    tmp.mkdir(parents=True)
    try:
        counts = write_domain(documents, encoder, tmp, settings['validation_fraction'], progress,
                              settings.get('similarity_group_documents', 0))
        if not counts['splits']['train']['documents']:
            where = ', '.join(str(i.get('path', i.get('builtin'))) for i in inputs[:3]) + (
                ', ...' if len(inputs) > 3 else '')
            raise BamJaxError(f"domain '{domain}': no training documents in the {counts['documents_read']} read "
                              f"from {where}")
        record = {'format': FORMAT, 'name': out.name, 'domain': domain, 'vocabulary': encoder.identity(),
                  'dtype': encoder.dtype.name, 'settings': settings, 'inputs': inputs, **counts,
                  'skipped': skipped or [], 'seconds': time.perf_counter() - start}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=1) + '\n')
        storage.publish(tmp, out, 'prepare')
    except BaseException:
        storage.remove(tmp)
        raise
    return record


def domain_settings(config, domain: str) -> dict:
    """The settings a prepared domain depends on besides its inputs and vocabulary."""
    spec = next((s for s in config.user_domains if s.name == domain), None)
    settings = {'validation_fraction': config.validation_fraction}
    if config.similarity_batching:
        settings['similarity_group_documents'] = config.similarity_group_documents
    if spec is not None:
        return {**settings, 'paths': list(spec.paths), 'text_key': spec.text_key}
    if domain == 'math':
        return {**settings, 'math_documents': config.math_documents}
    return {**settings, 'max_file_bytes': config.max_file_bytes}


def prepare_domain(config, domain: str, skip_bad: bool = False, progress: bool = True) -> dict:
    """Prepares one domain of a DataConfig (built-in or user) into config.data_dir."""
    from tqdm import tqdm

    if domain not in config.domains:
        raise BamJaxError(f"unknown domain {domain!r}; domains are {', '.join(config.domains)}")
    encoder = Encoder(config.spm_path, config.tokenizer_path)
    spec = next((s for s in config.user_domains if s.name == domain), None)
    reader = sources.DocumentReader(spec.text_key if spec else 'text', skip_bad)
    if spec is None:  # a built-in corpus: small files on this machine, read by corpora.py
        documents = corpora.read_documents(domain, config.max_file_bytes, config.math_documents)
        inputs, total, size = [{'builtin': domain}], len(documents), lambda batch: len(batch)
    else:
        files = sources.expand(spec.paths)
        if not files:
            raise BamJaxError(f"domain '{domain}': no files match {', '.join(spec.paths)}")
        documents = reader.read(files)
        inputs = [dataclasses.asdict(f) for f in files]
        total, size = sum(f.bytes for f in files), lambda batch: sum(len(t.encode('utf-8')) for _, t in batch)
    bar = tqdm(total=total, desc=f'prepare {domain}', unit='B' if spec else 'doc', unit_scale=True,
               disable=not progress, mininterval=0.5)
    try:
        out = domain_dir(config.data_dir, prepared_name(config, domain))
        record = prepare_documents(domain, documents, encoder, out, domain_settings(config, domain),
                                   inputs, progress=lambda batch: bar.update(size(batch)), skipped=reader.skipped)
    finally:
        bar.close()
    return record


def stale(config, domain: str, manifest: dict | None) -> str | None:
    """Why the prepared `domain` (prepared_name: its settings and vocabulary are config's) does not
    serve `config` (None: it does)."""
    if manifest is None:
        return 'is not prepared with these settings'
    spec = next((s for s in config.user_domains if s.name == domain), None)
    if spec is not None and manifest['inputs'] != [dataclasses.asdict(f) for f in sources.expand(spec.paths)]:
        return 'was prepared from files that have changed since'
    return None


def _small_and_local(config, domain: str) -> bool:
    """A built-in corpus, or a user domain of local files of PREPARE_ON_USE_BYTES at most."""
    spec = next((s for s in config.user_domains if s.name == domain), None)
    if spec is None:
        return True
    files = sources.expand(spec.paths)
    return not any(storage.is_uri(p) for p in spec.paths) and sum(f.bytes for f in files) <= PREPARE_ON_USE_BYTES


@contextlib.contextmanager
def _lock(data_dir: str, domain: str):
    """One process at a time prepares a domain on this machine (the others wait, then read it)."""
    directory = storage.path(data_dir)
    if storage.is_uri(directory):
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f'.{domain}.lock', 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_prepared(config, domain: str) -> dict:
    """The manifest of `domain` prepared for `config`. A built-in corpus, or a small local user
    domain, is prepared here when it is not (or is stale); any other is refused with the command
    that prepares it."""
    name = prepared_name(config, domain)
    problem = stale(config, domain, read_manifest(config.data_dir, name))
    if problem is None:
        return read_manifest(config.data_dir, name)
    if not _small_and_local(config, domain):
        raise BamJaxError(f"domain '{domain}' {problem} in {config.data_dir}: run bam-jax prepare-data "
                          f"--gin_file=... --domains={domain} with this run's gin files")
    with _lock(config.data_dir, name):
        manifest = read_manifest(config.data_dir, name)  # another process may have prepared it meanwhile
        if stale(config, domain, manifest) is None:
            return manifest
        return prepare_domain(config, domain, progress=False)
