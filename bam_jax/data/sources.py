"""Documents read from raw files as streams, one file and one line at a time, never whole.

  *.jsonl, *.jsonl.gz, *.jsonl.zst   one JSON object per line; its `text_key` field is the text
  *.parquet                          the `text_key` column (as Hugging Face datasets publish them)
  any other file                     one document (gzip-compressed when it ends in .gz)

Patterns are local paths, directories (read recursively) or globs, or the same on remote
storage (gs://bucket/dir/*.jsonl, through bam_jax.storage). A bad input (a malformed JSON line,
text that is not UTF-8, a missing text field or column, an unreadable file) is a BamJaxError
naming the file and line, unless the reader skips bad inputs, counting them in `skipped`.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator

from bam_jax import storage
from bam_jax.errors import BamJaxError

JSONL = ('.jsonl', '.jsonl.gz', '.jsonl.zst')
PARQUET = ('.parquet',)
_PARQUET_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class InputFile:
    """A file with its size and modification time (what says it changed, without reading it)."""
    path: str
    bytes: int
    mtime: float


def expand(patterns: tuple[str, ...]) -> list[InputFile]:
    """The files the patterns name, sorted, each once, with their sizes."""
    found = set()
    for pattern in patterns:
        if storage.is_uri(pattern):
            found.update(_expand_remote(pattern))
            continue
        for match in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isdir(match):
                found.update(os.path.join(root, n) for root, _, names in os.walk(match) for n in names)
            elif os.path.isfile(match):
                found.add(os.path.abspath(match))
    stats = {path: storage.path(path).stat() for path in sorted(found)}
    return [InputFile(path, stat.length, stat.mtime) for path, stat in stats.items()]


def _expand_remote(pattern: str) -> set[str]:
    """A URI's matches: its directory part up to the first wildcard, globbed below it."""
    scheme, _, rest = pattern.partition('://')
    parts = rest.split('/')
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in '*?[')), len(parts))
    base = storage.path(f'{scheme}://{"/".join(parts[:fixed])}')
    if fixed == len(parts):
        if base.is_dir():
            return {str(p) for p in base.rglob('*') if p.is_file()}
        return {str(base)} if base.is_file() else set()
    return {str(p) for p in base.glob('/'.join(parts[fixed:])) if p.is_file()}


class BadInput(BamJaxError):
    """An input that cannot be read as documents: its file (and line) and what is wrong."""


class DocumentReader:
    """Iterates (document id, text) over files; `skip_bad` counts bad inputs instead of failing
    (a bad line of a JSONL file, or a whole file), in `skipped`."""

    def __init__(self, text_key: str = 'text', skip_bad: bool = False):
        self.text_key, self.skip_bad = text_key, skip_bad
        self.skipped: list[str] = []

    def read(self, files: list[InputFile]) -> Iterator[tuple[str, str]]:
        for file in files:
            try:
                yield from self._file(file.path)
            except BadInput as e:
                self._bad(e)

    def _bad(self, error: BadInput) -> None:
        if not self.skip_bad:
            raise error
        self.skipped.append(str(error))

    def _file(self, path: str) -> Iterator[tuple[str, str]]:
        try:
            if path.endswith(JSONL):
                yield from self._jsonl(path)
            elif path.endswith(PARQUET):
                yield from self._parquet(path)
            else:
                with _open(path) as f:
                    data = f.read()
                try:
                    yield path, data.decode('utf-8')
                except UnicodeDecodeError as e:
                    raise BadInput(f'{path}: not UTF-8 text (byte {e.start})') from None
        except (OSError, EOFError) as e:
            raise BadInput(f'{path}: cannot read: {_first_line(e)}') from None

    def _jsonl(self, path: str) -> Iterator[tuple[str, str]]:
        with _open(path) as raw:
            for number, line in enumerate(io.BufferedReader(raw), 1):
                where = f'{path}:{number}'
                try:
                    text = self._json_text(line, where)
                except BadInput as e:
                    self._bad(e)
                    continue
                if text is not None:
                    yield where, text

    def _json_text(self, line: bytes, where: str) -> str | None:
        try:
            line = line.decode('utf-8')
        except UnicodeDecodeError as e:
            raise BadInput(f'{where}: not UTF-8 text (byte {e.start})') from None
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f'{where}: bad JSON: {e.msg}') from None
        if not isinstance(record, dict) or self.text_key not in record:
            raise BadInput(f'{where}: no {self.text_key!r} field')
        if not isinstance(record[self.text_key], str):
            raise BadInput(f'{where}: {self.text_key!r} is not a string')
        return record[self.text_key]

    def _parquet(self, path: str) -> Iterator[tuple[str, str]]:
        import pyarrow.parquet as pq

        with storage.path(path).open('rb') as f:
            try:
                table = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is no Parquet
                raise BadInput(f'{path}: not a Parquet file: {_first_line(e)}') from None
            if self.text_key not in table.schema_arrow.names:
                raise BadInput(f'{path}: no {self.text_key!r} column (columns: '
                               f'{", ".join(table.schema_arrow.names)})')
            row = 0
            for batch in table.iter_batches(batch_size=_PARQUET_BATCH, columns=[self.text_key]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if isinstance(text, str):
                        yield f'{path}:{row}', text
                    elif text is not None:
                        self._bad(BadInput(f'{path}: row {row}: {self.text_key!r} is not a string'))


def _open(path: str):
    """A binary stream of the file's bytes, decompressed by its suffix."""
    raw = storage.path(path).open('rb')
    if path.endswith('.gz'):
        return gzip.GzipFile(fileobj=raw, mode='rb')
    if path.endswith('.zst'):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
