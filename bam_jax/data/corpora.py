"""Built-in corpora read from files on any Debian machine with Python.

    general  English prose: pydoc topics, README/changelog/NEWS under
             /usr/share/doc (gzip-compressed or plain)
    code     the Python standard library sources (tests left out)
    law      /usr/share/common-licenses/* and /usr/share/doc/*/copyright
    math     generated worked problems (math_problems.py), 5000 documents
             of 6 problems by default

Files over `max_file_bytes` (default 200 kB) are skipped. A domain is
prepared like any other (prepare.py): de-duplicated by its normalised content
(`normalise`: whitespace collapsed, lowercased) and split into train and
validation by that content's sha256, so one text can never sit in both
splits, even when it appears under several file names.
"""

import functools
import gzip
import hashlib
import os
import re
import sysconfig

from bam_jax.data import math_problems
from bam_jax.errors import BamJaxError

BUILTIN_DOMAINS = ('general', 'code', 'law', 'math')
DOC_ROOT = '/usr/share/doc'
LICENSE_ROOT = '/usr/share/common-licenses'
MAX_FILE_BYTES = 200_000
DEFAULT_MATH_DOCUMENTS = 5_000

# Prose files under /usr/share/doc; markup and binaries are not prose.
_PROSE_NAME = re.compile(r'^(readme|changelog|changes|news)([._-].*)?$')
_NOT_PROSE = ('.html', '.htm', '.css', '.js', '.json', '.xml', '.png',
              '.gif', '.jpg', '.jpeg', '.svg', '.pdf', '.ico', '.py', '.sh')
_NOT_CODE_DIRS = {'site-packages', 'dist-packages', 'test', 'tests',
                  'idle_test', '__pycache__'}


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
    """All (id, text) pairs of a built-in domain, in id order.

    Cached in-process (a domain's progress bar counts them before it is
    prepared from the same read), so files changed after the first read are
    not seen again in the same process.
    """
    return _read_cached(domain, _reader_argument(domain, max_file_bytes,
                                                 math_documents))


def _reader_argument(domain, max_file_bytes, math_documents):
    """The one setting a domain's reader depends on (keeps the cache tight)."""
    return math_documents if domain == 'math' else max_file_bytes


@functools.cache
def _read_cached(domain, argument):
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


def clear_cache():
    """Forget documents read so far (e.g. after files changed on disk)."""
    _read_cached.cache_clear()
