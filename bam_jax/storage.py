"""Where run directories live: a local path, or any URI `etils.epath` opens (gs://, s3://).

Every run directory, checkpoint, metrics and config file, eval output, upcycler input and output
and export goes through `path()`, so a pod can write its run to a bucket that every worker sees.
epath is the filesystem layer Orbax itself uses: a local path goes through `os`, a URI through
`tf.io.gfile` (or fsspec when `EPATH_USE_TF=false`), and Orbax writes the arrays themselves with
TensorStore's own drivers (file, gcs, s3). On object stores a "directory" is a key prefix and a
rename is a copy then a delete, so outputs published by rename appear whole there too, only slower.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

from bam_jax.errors import BamJaxError

Path = epath.Path
_COPY_CHUNK = 16 << 20


def is_uri(path: os.PathLike | str) -> bool:
    """Whether `path` names remote storage (`scheme://...`) rather than a local path."""
    return '://' in os.fspath(path)


def path(value: os.PathLike | str) -> epath.Path:
    """`value` as an epath.Path: a local path made absolute with `~` expanded, a URI as given."""
    text = os.fspath(value)
    return epath.Path(text if is_uri(text) else os.path.abspath(os.path.expanduser(text)))


def occupied(target: epath.Path) -> bool:
    """Whether anything is at `target`, a dangling symbolic link included."""
    return target.exists() or (not is_uri(target) and os.path.islink(target))


def remove(target: epath.Path) -> None:
    """Deletes a directory tree, or a file or link (an output path may have been one)."""
    if not is_uri(target) and os.path.islink(target):
        os.unlink(target)
    elif target.is_dir():
        target.rmtree()
    elif target.exists():
        target.unlink()


def copy_file(source: epath.Path, target: epath.Path) -> None:
    """Copies one file between any two filesystems, in chunks."""
    with source.open('rb') as reader, target.open('wb') as writer:
        shutil.copyfileobj(reader, writer, _COPY_CHUNK)


def copy_tree(source: epath.Path, target: epath.Path) -> None:
    """Copies a directory tree between any two filesystems, file by file."""
    for directory, _, names in source.walk():
        relative = directory.relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in names:
            copy_file(directory / name, target / relative / name)


@contextlib.contextmanager
def local_copy(directory: epath.Path, names: list[str]) -> Iterator[epath.Path]:
    """A local directory holding `names` (those that exist) of `directory`: the directory itself
    when it is local, else a temporary copy, for readers that only open local files (safetensors'
    memory map, the tokenizers library)."""
    if not is_uri(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix='bam_jax-') as tmp:
        local = epath.Path(tmp)
        for name in names:
            if (directory / name).exists():
                copy_file(directory / name, local / name)
        yield local


def staging_dir(out: epath.Path, kind: str) -> epath.Path:
    """The hidden directory an output is built in before `publish` moves it into place (one left
    by a killed run is cleared), so an interrupted command leaves no output behind.

    An output on remote storage is built on local disk and uploaded by `publish` (Orbax's partial
    saving adds to a checkpoint in place, which it cannot do on an object store).
    """
    if is_uri(out):
        local = tempfile.mkdtemp(prefix=f'bam_jax-{kind}-')
        os.rmdir(local)  # a fresh name; the writers create the directory
        return path(local)
    tmp = _hidden(out, kind, 'tmp')
    remove(tmp)
    return tmp


def _hidden(out: epath.Path, kind: str, role: str) -> epath.Path:
    return out.parent / f'.{out.name}.{kind}-{role}'


def publish(tmp: epath.Path, out: epath.Path, kind: str, on_upload=None) -> None:
    """Renames tmp to out; an existing out is moved aside first and deleted only afterwards.
    A local tmp for a remote out is first uploaded next to it; on_upload(uploaded, out) then
    runs, before the rename."""
    if is_uri(out) and not is_uri(tmp):
        remote = _hidden(out, kind, 'tmp')
        remove(remote)
        copy_tree(tmp, remote)
        if on_upload:
            on_upload(remote, out)
        remove(tmp)
        tmp = remote
    old = _hidden(out, kind, 'old')
    remove(old)
    if occupied(out):
        out.rename(old)
    tmp.rename(out)
    remove(old)


@contextlib.contextmanager
def atomic_output(out: epath.Path, kind: str, overwrite: bool = False, on_upload=None) -> Iterator[epath.Path]:
    """Builds the directory `out` whole or not at all: yields the hidden directory to build it in
    (staging_dir), which becomes `out` when the block ends (publish: uploaded first for a remote
    `out`, on_upload then runs) and is deleted if the block raises. An existing `out` is refused
    unless it may be replaced, and then replaced only once the new one is complete."""
    if occupied(out) and not overwrite:
        raise BamJaxError(f'{out} exists; pass --overwrite to replace it')
    tmp = staging_dir(out, kind)
    try:
        yield tmp
    except BaseException:  # a damaged input, an interrupt: leave nothing behind
        with contextlib.suppress(OSError):
            remove(tmp)
        raise
    publish(tmp, out, kind, on_upload)
