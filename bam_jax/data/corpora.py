"""Built-in corpora read from files on any Debian machine with Python.

    general  English prose: pydoc topics, README/changelog/NEWS under
             /usr/share/doc (gzip-compressed or plain)
    code     the Python standard library sources (tests left out)
    law      /usr/share/common-licenses/* and /usr/share/doc/*/copyright
    math     generated worked problems (math_problems.py), 5000 documents
             of 6 problems by default

A domain's documents are de-duplicated by normalised content (whitespace
collapsed, lowercased), then split into train and validation by sha256 of
that content. The split depends on the content alone, so one text can never
sit in both splits, even when it appears under several file names.

Size limits: files over `max_file_bytes` (default 200 kB) are skipped, and a
domain keeps at most `max_domain_bytes` (default 64 MiB) of text, picked in a
stable pseudo-random order when it has more.
"""

import dataclasses
import functools
import gzip
import hashlib
import logging
import os
import re
import sysconfig

from bam_jax.data import math_problems
from bam_jax.data.user_domains import DomainSpec, read_user_documents
from bam_jax.errors import BamJaxError

BUILTIN_DOMAINS = ('general', 'code', 'law', 'math')
DOC_ROOT = '/usr/share/doc'
LICENSE_ROOT = '/usr/share/common-licenses'
MAX_FILE_BYTES = 200_000
MAX_DOMAIN_BYTES = 64 << 20
MIN_VALIDATION_DOCUMENTS = 4
_log = logging.getLogger(__name__)
DEFAULT_MATH_DOCUMENTS = 5_000

# Prose files under /usr/share/doc; markup and binaries are not prose.
_PROSE_NAME = re.compile(r'^(readme|changelog|changes|news)([._-].*)?$')
_NOT_PROSE = ('.html', '.htm', '.css', '.js', '.json', '.xml', '.png',
              '.gif', '.jpg', '.jpeg', '.svg', '.pdf', '.ico', '.py', '.sh')
_NOT_CODE_DIRS = {'site-packages', 'dist-packages', 'test', 'tests',
                  'idle_test', '__pycache__'}


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: a stable id (domain/path) and its text."""
    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A domain's distinct documents, split; `documents_read` counts
    documents before de-duplication."""
    domain: str
    train: tuple
    validation: tuple
    documents_read: int

    @property
    def duplicates(self):
        return self.documents_read - len(self.train) - len(self.validation)


def normalise(text):
    """Whitespace collapsed, lowercased: the key for de-duplication."""
    return ' '.join(text.split()).lower()


def content_hash(text):
    """sha256 hex digest of the normalised text."""
    return hashlib.sha256(normalise(text).encode('utf-8')).hexdigest()


def _read_text(path, max_file_bytes):
    """UTF-8 text of a (maybe gzip) file; None if too big, binary or
    unreadable."""
    try:
        if os.path.islink(path) or not os.path.isfile(path):
            return None
        if path.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                data = f.read(max_file_bytes + 1)
        else:
            if os.path.getsize(path) > max_file_bytes:
                return None
            with open(path, 'rb') as f:
                data = f.read()
        if len(data) > max_file_bytes or b'\0' in data:
            return None
        return data.decode('utf-8')
    except (OSError, EOFError, UnicodeDecodeError):
        return None


def _general(max_file_bytes):
    from pydoc_data import topics
    documents = [(f'general/pydoc/{name}', text)
                 for name, text in sorted(topics.topics.items())]
    for root, dirs, files in os.walk(DOC_ROOT):
        dirs.sort()
        for name in sorted(files):
            base = name.removesuffix('.gz')
            if not _PROSE_NAME.match(base.lower()) or \
                    base.lower().endswith(_NOT_PROSE):
                continue
            path = os.path.join(root, name)
            text = _read_text(path, max_file_bytes)
            if text is not None:
                documents.append(
                    (f'general/{os.path.relpath(path, DOC_ROOT)}', text))
    return documents, ['pydoc_data.topics', f'{DOC_ROOT}/**/README*',
                       f'{DOC_ROOT}/**/changelog*', f'{DOC_ROOT}/**/NEWS*']


def _code(max_file_bytes):
    stdlib = sysconfig.get_paths()['stdlib']
    documents = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _NOT_CODE_DIRS)
        for name in sorted(files):
            if name.endswith('.py'):
                path = os.path.join(root, name)
                text = _read_text(path, max_file_bytes)
                if text is not None:
                    documents.append(
                        (f'code/{os.path.relpath(path, stdlib)}', text))
    return documents, [f'{stdlib}/**/*.py']


def _law(max_file_bytes):
    documents, seen = [], set()
    paths = [os.path.join(LICENSE_ROOT, n)
             for n in sorted(_listdir(LICENSE_ROOT))]
    paths += [os.path.join(DOC_ROOT, n, 'copyright')
              for n in sorted(_listdir(DOC_ROOT))]
    for path in paths:
        # Package doc directories are often links to another package's.
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        text = _read_text(real, max_file_bytes)
        if text is not None:
            name = os.path.relpath(path, os.path.dirname(LICENSE_ROOT)) \
                if path.startswith(LICENSE_ROOT) else \
                'doc/' + os.path.relpath(path, DOC_ROOT)
            documents.append((f'law/{name}', text))
    return documents, [f'{LICENSE_ROOT}/*', f'{DOC_ROOT}/*/copyright']


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _math(count):
    return ([(f'math/{i:08d}', text)
             for i, text in enumerate(math_problems.documents(count))],
            [f'math_problems.documents({count})'])


def read_documents(domain, max_file_bytes=MAX_FILE_BYTES,
                   math_documents=DEFAULT_MATH_DOCUMENTS):
    """All (id, text) pairs of a built-in domain or a DomainSpec, in id order.

    Cached in-process (a domain is prepared, and its texts read by the
    offline tasks, from the same read), so files changed after the first
    read are not seen again in the same process.
    """
    return _read_cached(domain, _reader_argument(domain, max_file_bytes,
                                                 math_documents))


def _reader_argument(domain, max_file_bytes, math_documents):
    """The one setting a domain's reader depends on (keeps the cache tight)."""
    if isinstance(domain, DomainSpec):
        return None
    return math_documents if domain == 'math' else max_file_bytes


@functools.cache
def _read_cached(domain, argument):
    if isinstance(domain, DomainSpec):
        return tuple(read_user_documents(domain))
    if domain == 'math':
        if argument < 1:
            raise BamJaxError(f'math_documents must be >= 1, got {argument}')
        documents, looked_at = _math(argument)
    elif domain in ('general', 'code', 'law'):
        reader = {'general': _general, 'code': _code, 'law': _law}[domain]
        documents, looked_at = reader(argument)
    else:
        raise BamJaxError(f"unknown domain {domain!r}; built-in domains are "
                          f"{', '.join(BUILTIN_DOMAINS)}")
    documents = [(i, t) for i, t in documents if t.strip()]
    if not documents:
        raise BamJaxError(f"domain '{domain}': no readable documents in "
                          f"{', '.join(looked_at)}")
    return tuple(documents)


def _cap_bytes(domain, documents, max_domain_bytes):
    """At most max_domain_bytes of text, in a stable pseudo-random order."""
    total = sum(len(t.encode('utf-8')) for _, t in documents)
    if total <= max_domain_bytes:
        return documents
    order = sorted(documents, key=lambda d: hashlib.sha256(
        d[0].encode('utf-8')).digest())
    kept, size = [], 0
    for doc_id, text in order:
        length = len(text.encode('utf-8'))
        if size + length > max_domain_bytes and kept:
            break
        kept.append((doc_id, text))
        size += length
    _log.warning("domain '%s': kept %d of %d documents (%d of %d bytes); "
                 'raise DataConfig.max_domain_bytes to keep more', domain,
                 len(kept), len(documents), size, total)
    return sorted(kept)


def split_documents(domain, documents, validation_fraction,
                    min_validation=MIN_VALIDATION_DOCUMENTS):
    """De-duplicate (id, text) pairs and split them into a Corpus.

    A document goes to validation when the first 64 bits of its content hash,
    read as a fraction of 2**64, fall below `validation_fraction`; if that
    gives fewer than `min_validation` documents (capped at half the domain),
    the documents with the next-smallest hashes join it.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise BamJaxError(f'validation_fraction must be in [0, 1), got '
                          f'{validation_fraction}')
    distinct = {}
    for doc_id, text in sorted(documents):
        distinct.setdefault(content_hash(text), Document(doc_id, text))
    by_hash = sorted(distinct.items())
    threshold = validation_fraction * 2.0 ** 64
    count = sum(1 for h, _ in by_hash if int(h[:16], 16) < threshold)
    count = max(count, min(min_validation, len(by_hash) // 2))
    validation = sorted((d for _, d in by_hash[:count]), key=lambda d: d.id)
    train = sorted((d for _, d in by_hash[count:]), key=lambda d: d.id)
    return Corpus(domain, tuple(train), tuple(validation), len(documents))


def load_corpus(domain, validation_fraction=0.05,
                math_documents=DEFAULT_MATH_DOCUMENTS,
                max_file_bytes=MAX_FILE_BYTES,
                max_domain_bytes=MAX_DOMAIN_BYTES):
    """The de-duplicated, split Corpus of a built-in domain or DomainSpec."""
    argument = _reader_argument(domain, max_file_bytes, math_documents)
    return _load_cached(domain, argument, float(validation_fraction),
                        max_domain_bytes)


@functools.cache
def _load_cached(domain, argument, validation_fraction, max_domain_bytes):
    documents = _read_cached(domain, argument)
    name = domain.name if isinstance(domain, DomainSpec) else domain
    documents = _cap_bytes(name, documents, max_domain_bytes)
    return split_documents(name, documents, validation_fraction)


def clear_cache():
    """Forget documents read so far (e.g. after files changed on disk)."""
    _read_cached.cache_clear()
    _load_cached.cache_clear()
