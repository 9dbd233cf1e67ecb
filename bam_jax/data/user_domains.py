"""User-defined domains, named in gin and prepared from their files (sources.py: JSONL, Parquet
or text, local or in a bucket) by `bam-jax prepare-data`.

    DataConfig.user_domains = [@notes/text_domain()]
    notes/text_domain.name = 'notes'
    notes/text_domain.paths = ['/data/notes/*.txt']
"""

import dataclasses
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
