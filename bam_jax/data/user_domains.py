"""User-defined domains: documents from text files or JSONL files, via gin.

    DataConfig.user_domains = [@notes/text_domain()]
    notes/text_domain.name = 'notes'
    notes/text_domain.paths = ['/data/notes/*.txt']

A `.jsonl` (or `.jsonl.gz`) file holds one document per line, a JSON object
whose `text_key` field is the text; any other file is one document.
"""

import dataclasses
import glob
import gzip
import json
import os
import re

import gin

from bam_jax.errors import BamJaxError

RESERVED_NAMES = ('general', 'code', 'law', 'math', 'seed', 'mix')
_NAME = re.compile(r'^[a-z0-9_]+$')


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """A user domain: its name, file paths or globs, and the JSONL text key."""
    name: str
    paths: tuple
    text_key: str = 'text'


@gin.configurable
def text_domain(name, paths, text_key='text'):
    """A user domain read from `paths` (files, directories or globs)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise BamJaxError(f"user domain name {name!r} must match [a-z0-9_]+")
    if name in RESERVED_NAMES:
        raise BamJaxError(f"user domain name {name!r} is reserved; choose "
                          f"a name other than {', '.join(RESERVED_NAMES)}")
    if isinstance(paths, (str, os.PathLike)):
        paths = (paths,)
    return DomainSpec(name, tuple(str(p) for p in paths), text_key)


def _expand(spec):
    """Sorted files matched by the spec's paths (directories recursively)."""
    files = set()
    for pattern in spec.paths:
        for match in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isdir(match):
                for root, _, names in os.walk(match):
                    files.update(os.path.join(root, n) for n in names)
            elif os.path.isfile(match):
                files.add(match)
    return sorted(files)


def _read_bytes(path):
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        return f.read()


def _jsonl_documents(spec, path, data):
    """(id, text) pairs from the lines of a JSONL file."""
    for number, line in enumerate(data.decode('utf-8').splitlines(), 1):
        if not line.strip():
            continue
        where = f'{path}:{number}'
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BamJaxError(f"domain '{spec.name}': bad JSON at {where}: "
                              f"{e.msg}") from None
        if not isinstance(record, dict) or spec.text_key not in record:
            raise BamJaxError(f"domain '{spec.name}': no key "
                              f"{spec.text_key!r} at {where}")
        text = record[spec.text_key]
        if not isinstance(text, str):
            raise BamJaxError(f"domain '{spec.name}': {spec.text_key!r} is "
                              f"not a string at {where}")
        yield f'{spec.name}/{where}', text


def read_user_documents(spec):
    """(id, text) pairs of a user domain; BamJaxError if there are none."""
    files = _expand(spec)
    looked_at = ', '.join(spec.paths) or '(no paths given)'
    if not files:
        raise BamJaxError(f"domain '{spec.name}': no files match "
                          f"{looked_at}")
    documents = []
    for path in files:
        try:
            data = _read_bytes(path)
        except OSError as e:
            raise BamJaxError(f"domain '{spec.name}': cannot read {path}: "
                              f"{e.strerror or e}") from None
        except (EOFError, gzip.BadGzipFile):
            raise BamJaxError(f"domain '{spec.name}': {path} is not a valid "
                              f"gzip file") from None
        try:
            if path.endswith(('.jsonl', '.jsonl.gz')):
                documents.extend(_jsonl_documents(spec, path, data))
            else:
                documents.append((f'{spec.name}/{path}', data.decode('utf-8')))
        except UnicodeDecodeError:
            raise BamJaxError(f"domain '{spec.name}': {path} is not UTF-8 "
                              f"text") from None
    documents = [(i, t) for i, t in documents if t.strip()]
    if not documents:
        raise BamJaxError(f"domain '{spec.name}': no text in the "
                          f"{len(files)} file(s) matching {looked_at}")
    return documents
