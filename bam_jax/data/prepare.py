"""`bam-jax prepare-data`: a domain's raw documents as prepared token files, with a manifest.

    <data_dir>/<domain>/manifest.json        what was prepared from what, with which settings
    <data_dir>/<domain>/train/part-NNNNN.*   token_files.py: token ids and a document index
    <data_dir>/<domain>/validation/part-NNNNN.*

Documents stream in from their files (sources.py) or the built-in corpora (corpora.py). Each is
de-duplicated by the hash of its normalised content, kept as 8 bytes per document (SeenHashes),
never as text, and goes to validation when that hash, read as a fraction of 2**64, is below
DataConfig.validation_fraction (the same content is always on the same side). A split too small
to evaluate on takes the documents with the smallest hashes, up to MIN_VALIDATION_DOCUMENTS and
at most half the domain, held back in a heap of that many documents until the end. Tokens are
the run's vocabulary's, each document followed by its EOS. The domain is built in a hidden
directory beside its final place and renamed into place at the end: an interrupted preparation
publishes nothing; prepare_pod.py does the same with many workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import heapq
import json
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np

from bam_jax import storage
from bam_jax.data import corpora, sources, vocab
from bam_jax.data.token_files import Part, PartWriter, Split, token_dtype
from bam_jax.errors import BamJaxError
from bam_jax.progress import progress_bar

FORMAT = 'bam_jax token files 1'
MANIFEST = 'manifest.json'
SPLITS = ('train', 'validation')
PART_TOKENS = 1 << 30  # a part rolls over after this many tokens
_BATCH_BYTES = 4 << 20  # text tokenized together
MIN_VALIDATION_DOCUMENTS = 4  # a validation split smaller than this is topped up (place_held)
PREPARE_ON_USE_BYTES = 256 << 20  # a local user domain up to this size is prepared when first read


def document_hash(text: str) -> int:
    """The first 64 bits of the sha256 of the normalised text (corpora.content_hash's first 16 hex
    digits, as an int): the de-duplication key and the split's coin."""
    return int.from_bytes(hashlib.sha256(corpora.normalise(text).encode('utf-8')).digest()[:8], 'big')


class SeenHashes:
    """A set of 64-bit hashes in about 8 bytes each: a sorted array, and a small Python set of the
    newest that is merged into it when it grows past `buffer`."""

    def __init__(self, initial: np.ndarray | None = None, buffer: int = 1 << 20):
        """initial: hashes seen already, sorted and unique."""
        self._sorted = np.zeros(0, np.uint64) if initial is None else np.asarray(initial, np.uint64)
        self._new, self._buffer = set(), buffer

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
            self._merge()
        return True

    def values(self) -> np.ndarray:
        """Every hash added, sorted."""
        self._merge()
        return self._sorted

    def _merge(self) -> None:
        self._sorted = np.union1d(self._sorted, np.fromiter(self._new, np.uint64, len(self._new)))
        self._new = set()


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
    """One split's parts, rolled over every PART_TOKENS tokens; `prefix` starts their names (a
    worker's parts beside the others' when many prepare one domain)."""

    def __init__(self, directory: storage.Path, dtype: np.dtype, prefix: str = ''):
        self.directory, self.dtype, self.prefix = directory, dtype, prefix
        self.parts: list[dict] = []
        self.documents = 0
        self._writer: PartWriter | None = None

    def add(self, ids: np.ndarray) -> None:
        if self._writer is None or self._writer.tokens >= PART_TOKENS:
            self._close_part()
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f'{self.prefix}part-{len(self.parts):05d}'
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
class Held:
    """A validation candidate held back: the heap keeps the largest hash on top."""
    negative_hash: int
    ids: np.ndarray
    text: str = ''  # for the similarity order, which a held document may still join

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


class DomainWriter:
    """Writes a stream of documents (a whole domain's, or one worker's part of it) under tmp:
    each de-duplicated against `seen`, tokenized and written to its split by its hash. The
    MIN_VALIDATION_DOCUMENTS training documents of smallest hash are held back until `finish`,
    in case the validation split turns out too small (place_held decides).

    settings: validation_fraction, and similarity_group_documents > 0 for a training split in
    similarity order over groups of that many documents."""

    def __init__(self, encoder: Encoder, tmp: storage.Path, settings: dict, seen: SeenHashes | None = None,
                 prefix: str = ''):
        fraction = settings['validation_fraction']
        if not 0.0 <= fraction < 1.0:
            raise BamJaxError(f'validation_fraction must be in [0, 1), got {fraction}')
        self.encoder, self.threshold = encoder, fraction * 2.0 ** 64
        self.seen = seen if seen is not None else SeenHashes()
        self.writers = {split: SplitWriter(tmp / split, encoder.dtype, prefix) for split in SPLITS}
        group = settings.get('similarity_group_documents', 0)
        self._similar = SimilarityOrder(self.writers['train'].add, group) if group else None
        self.held: list[Held] = []
        self.read = self.kept = 0

    def add(self, batch: list[tuple[str, str]]) -> None:
        self.read += len(batch)
        kept = [(h, text) for h, text in ((document_hash(text), text) for _, text in batch) if self.seen.add(h)]
        self.kept += len(kept)
        for (h, text), ids in zip(kept, self.encoder.encode([text for _, text in kept])):
            if h < self.threshold:
                self.writers['validation'].add(ids)
                continue
            heapq.heappush(self.held, Held(-h, ids, text if self._similar else ''))
            if len(self.held) > MIN_VALIDATION_DOCUMENTS:
                out = heapq.heappop(self.held)
                self._similar.add(out.ids, out.text) if self._similar else self.writers['train'].add(out.ids)

    def finish(self) -> list[Held]:
        """Writes what waits for similarity ordering; returns the held documents, smallest hash first."""
        if self._similar:
            self._similar.flush()
        return sorted(self.held, key=lambda entry: -entry.negative_hash)


def place_held(held: list[Held], documents: int, validation: int, writers: dict[str, SplitWriter]) -> None:
    """Tops a validation split of `validation` documents up to MIN_VALIDATION_DOCUMENTS (at most
    half the domain's `documents`) with the held documents of smallest hash (`held` is sorted so);
    the others go to training."""
    needed = max(0, min(MIN_VALIDATION_DOCUMENTS, documents // 2) - validation)
    for i, entry in enumerate(held):
        writers['validation' if i < needed else 'train'].add(entry.ids)


def write_domain(documents: Iterable[tuple[str, str]], encoder: Encoder, tmp: storage.Path, settings: dict,
                 on_batch=None) -> dict:
    """Writes the de-duplicated, split and tokenized documents under tmp; returns the counts."""
    writer = DomainWriter(encoder, tmp, settings)
    for batch in document_batches(documents):
        writer.add(batch)
        if on_batch:
            on_batch(batch)
    place_held(writer.finish(), writer.kept, writer.writers['validation'].documents, writer.writers)
    return {'documents_read': writer.read, 'duplicates': writer.read - writer.kept,
            'splits': {split: w.close() for split, w in writer.writers.items()}}


def document_batches(documents: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
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


def split_texts(config, domain: str, split: str) -> list[str]:
    """The texts of a prepared split, in their order, for readers that need text rather than
    tokens (the offline harness tasks, built from the small built-in corpora: the split is read
    whole). They come from the domain prepared with the byte vocabulary, which decodes back
    exactly, and no similarity order, under config's other settings (so the same documents on
    each side of the split as config's own), prepared on first use as ensure_prepared does."""
    plain = dataclasses.replace(config, spm_path=None, tokenizer_path=None, similarity_batching=False)
    tokens = open_split(plain.data_dir, ensure_prepared(plain, domain)['name'], split)
    texts = []
    for part in tokens.parts:
        for ids in np.split(part.read(0, part.tokens), part.ends[:-1]):
            texts.append((ids[:-1] - 3).astype(np.uint8).tobytes().decode('utf-8'))  # byte b is id b + 3; EOS
    return texts


class DomainSource:
    """Where a domain's documents come from: a user domain's files, or a built-in corpus (small
    files on this machine, read by corpora.py). Many workers share it by `part`."""

    def __init__(self, config, domain: str):
        if domain not in config.domains:
            raise BamJaxError(f"unknown domain {domain!r}; domains are {', '.join(config.domains)}")
        self.config, self.domain = config, domain
        self.spec = next((s for s in config.user_domains if s.name == domain), None)
        self.files = None
        if self.spec is not None:
            self.files = sources.expand(self.spec.paths)
            if not self.files:
                raise BamJaxError(f"domain '{domain}': no files match {', '.join(self.spec.paths)}")
        self.text_key = self.spec.text_key if self.spec else 'text'
        self.unit = 'B' if self.spec else 'doc'

    def inputs(self) -> list[dict]:
        return [dataclasses.asdict(f) for f in self.files] if self.files is not None else [{'builtin': self.domain}]

    def part(self, worker: int = 0, workers: int = 1) -> list[sources.InputFile] | None:
        """Worker `worker`'s files of `workers`: consecutive files of about equal bytes in all
        (None: the whole built-in corpus, which is the first worker's)."""
        if self.files is None:
            return None if worker == 0 else []
        total, start, mine = sum(f.bytes for f in self.files), 0, []
        for f in self.files:  # a file is the worker's whose share holds the file's middle byte
            if min(workers - 1, (2 * start + f.bytes) * workers // max(2 * total, 1)) == worker:
                mine.append(f)
            start += f.bytes
        return mine

    def documents(self, reader: sources.DocumentReader, files) -> Iterator[tuple[str, str]]:
        if files is None:
            return iter(corpora.read_documents(self.domain, self.config.max_file_bytes, self.config.math_documents))
        return reader.read(files)

    def size(self, files) -> int:
        """What the progress bar counts to: bytes of files, or a built-in corpus's documents."""
        if files is None:
            return len(corpora.read_documents(self.domain, self.config.max_file_bytes, self.config.math_documents))
        return sum(f.bytes for f in files)

    def batch_size(self, batch: list[tuple[str, str]]) -> int:
        return sum(len(text.encode('utf-8')) for _, text in batch) if self.spec else len(batch)


def check_not_empty(domain: str, counts: dict, inputs: list[dict]) -> None:
    if not counts['splits']['train']['documents']:
        where = ', '.join(str(i.get('path', i.get('builtin'))) for i in inputs[:3]) + (
            ', ...' if len(inputs) > 3 else '')
        raise BamJaxError(f"domain '{domain}': no training documents in the {counts['documents_read']} read "
                          f"from {where}")


@dataclasses.dataclass(frozen=True)
class SplitCounts:
    """One split of a prepared domain: its documents, its tokens (each document's EOS included) and
    its parts in reading order, each {'name': file stem, 'tokens': int, 'documents': int}."""
    documents: int
    tokens: int
    parts: list[dict]


@dataclasses.dataclass(frozen=True)
class Splits:
    """A prepared domain's two splits (SPLITS)."""
    train: SplitCounts
    validation: SplitCounts

    @classmethod
    def from_dict(cls, splits: dict) -> Splits:
        """From {split: {'documents', 'tokens', 'parts'}}, as write_domain counts and a manifest stores them."""
        return cls(**{split: SplitCounts(**splits[split]) for split in SPLITS})


@dataclasses.dataclass(frozen=True)
class DomainManifest:
    """A prepared domain, saved as <data_dir>/<name>/manifest.json (to_dict).

    format: FORMAT; name: the prepared directory's name (prepared_name); domain: the DataConfig's
    name for it; vocabulary: Encoder.identity(); dtype: the token ids' numpy dtype; settings:
    domain_settings; inputs: the input files (sources.InputFile as dicts), or [{'builtin': domain}];
    documents_read: non-empty documents read; duplicates: those of them dropped as copies; splits:
    the two splits; skipped: the bad records skipped (--skip_bad), one line each; seconds: the
    preparation's wall time; workers: how many prepared it together (None: one process, and then
    absent from the file).
    """
    format: str
    name: str
    domain: str
    vocabulary: dict
    dtype: str
    settings: dict
    inputs: list[dict]
    documents_read: int
    duplicates: int
    splits: Splits
    skipped: list[str]
    seconds: float
    workers: int | None = None

    def to_dict(self) -> dict:
        """manifest.json's content."""
        record = dataclasses.asdict(self)
        if self.workers is None:
            del record['workers']
        return record

    @classmethod
    def from_dict(cls, record: dict) -> DomainManifest:
        """The manifest as read back from its file."""
        return cls(**{**record, 'splits': Splits.from_dict(record['splits'])})


def manifest(source: DomainSource, name: str, encoder: Encoder, counts: dict, skipped: list[str],
             seconds: float) -> DomainManifest:
    """The manifest of `source` prepared as `name`, from write_domain's counts."""
    return DomainManifest(
        format=FORMAT, name=name, domain=source.domain, vocabulary=encoder.identity(), dtype=encoder.dtype.name,
        settings=domain_settings(source.config, source.domain), inputs=source.inputs(),
        documents_read=counts['documents_read'], duplicates=counts['duplicates'],
        splits=Splits.from_dict(counts['splits']), skipped=skipped, seconds=seconds)


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


def prepare_domain(config, domain: str, skip_bad: bool = False, progress: bool = True) -> DomainManifest:
    """Prepares one domain of a DataConfig (built-in or user) into config.data_dir, on this
    process (prepare_pod.prepare_together: on many); returns its manifest."""
    start = time.perf_counter()
    source, encoder = DomainSource(config, domain), Encoder(config.spm_path, config.tokenizer_path)
    reader = sources.DocumentReader(source.text_key, skip_bad)
    files = source.part()
    out = domain_dir(config.data_dir, prepared_name(config, domain))
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(None, f'prepare {domain}', source.unit, progress, total=source.size(files))
    with contextlib.closing(bar), storage.atomic_output(out, 'prepare', overwrite=True) as tmp:
        tmp.mkdir(parents=True)
        counts = write_domain(source.documents(reader, files), encoder, tmp, domain_settings(config, domain),
                              lambda batch: bar.update(source.batch_size(batch)))
        check_not_empty(domain, counts, source.inputs())
        record = manifest(source, out.name, encoder, counts, reader.skipped, time.perf_counter() - start)
        (tmp / MANIFEST).write_text(json.dumps(record.to_dict(), indent=1) + '\n')
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


def _prepared_on_use(config, domain: str) -> bool:
    """Into a local data directory (where a lock keeps this machine's processes from preparing it
    twice at once): a built-in corpus, or a user domain of local files of PREPARE_ON_USE_BYTES
    at most."""
    if storage.is_uri(config.data_dir):
        return False
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
    domain, is prepared here when it is not (or is stale) and the data directory is local; any
    other is refused with the command that prepares it."""
    name = prepared_name(config, domain)
    problem = stale(config, domain, read_manifest(config.data_dir, name))
    if problem is None:
        return read_manifest(config.data_dir, name)
    if not _prepared_on_use(config, domain):
        raise BamJaxError(f"domain '{domain}' {problem} in {config.data_dir}: run bam-jax prepare-data "
                          f"--gin_file=... --domains={domain} with this run's gin files")
    with _lock(config.data_dir, name):
        manifest = read_manifest(config.data_dir, name)  # another process may have prepared it meanwhile
        if stale(config, domain, manifest) is None:
            return manifest
        print(f'preparing {domain} into {domain_dir(config.data_dir, name)} (first use)', file=sys.stderr)
        return prepare_domain(config, domain, progress=False).to_dict()
