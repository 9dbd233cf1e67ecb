"""Gin at the commands' entry points: files, `--gin.NAME=VALUE` overrides, the search path, and
the configs they bind (`RunConfig`), which the commands hand down as values. The library below
never reads gin's global bindings itself."""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
import tempfile
from typing import TYPE_CHECKING

import gin

from bam_jax import storage
from bam_jax.errors import BamJaxError

# The repository root holds gin/: files are found relative to the working directory first,
# then relative to it, so `include 'gin/seed.gin'` works from anywhere.
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

if TYPE_CHECKING:
    from bam_jax.data import DataConfig
    from bam_jax.models import ModelConfig
    from bam_jax.parallel import MeshConfig
    from bam_jax.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The configs of one command, bound from gin once (`parse_gin`, `load_run_config`).
    operative: gin's operative config of the bindings (what a training run records as its
    config.gin); empty when the configs were built in Python."""
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    mesh: MeshConfig
    operative: str = ''

    @property
    def max_length(self) -> int:
        """The longest sequence the model reads: ModelConfig.max_length, or, where that is unset (a
        run from before the setting), the length it trained at."""
        return self.model.max_length or self.train.seq_len


def bound_configs() -> RunConfig:
    """The configs as the gin files and overrides just parsed bind them."""
    from bam_jax.data import DataConfig
    from bam_jax.models import ModelConfig
    from bam_jax.parallel import MeshConfig
    from bam_jax.train import TrainConfig

    configs = RunConfig(model=ModelConfig(), data=DataConfig(), train=TrainConfig(), mesh=MeshConfig())
    return dataclasses.replace(configs, operative=gin.operative_config_str())


def resolve_gin_file(name: str) -> str:
    if storage.is_uri(name):  # a run's config.gin on remote storage
        if not storage.path(name).is_file():
            raise BamJaxError(f'gin file {name} not found')
        return name
    for base in (pathlib.Path.cwd(), REPO_ROOT):
        path = base / name
        if path.is_file():
            return str(path)
    raise BamJaxError(f'gin file {name} not found (looked in {pathlib.Path.cwd()} and {REPO_ROOT})')


def parse_gin(files: list[str], bindings: list[str]) -> RunConfig:
    """Parses gin files then overrides, after registering every configurable of bam_jax; returns
    the configs they bind."""
    import bam_jax.data  # noqa: F401 - registers DataConfig, text_domain
    import bam_jax.models  # noqa: F401 - registers ModelConfig
    import bam_jax.parallel  # noqa: F401 - registers MeshConfig
    import bam_jax.train  # noqa: F401 - registers TrainConfig

    gin.clear_config()
    gin.add_config_file_search_path(str(REPO_ROOT))
    paths = [resolve_gin_file(f) for f in files]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = [_without_retired(path, pathlib.Path(tmp) / str(i)) for i, path in enumerate(paths)]
            gin.parse_config_files_and_bindings(paths, bindings)
    except (OSError, ValueError, SyntaxError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ''
        if 'parse' in first.lower() or isinstance(e, SyntaxError):
            hint = ' (string values need inner quotes: --gin.DOMAIN="\'code\'")'
        raise BamJaxError(f'gin: {first}{hint}') from None
    _check_override_macros(bindings)
    return bound_configs()


def _without_retired(path: str, copy: pathlib.Path) -> str:
    """path, or a copy of it at `copy` without the lines that bind retired settings (an older
    run's operative config.gin), so older runs still evaluate and resume. gin reads local files
    only: a remote file is always copied."""
    from bam_jax.models.config import RETIRED_SETTINGS

    retired = {f'{kind}.{name}' for kind, names in RETIRED_SETTINGS.items() for name in names}
    lines = storage.path(path).read_text().splitlines()
    kept = [line for line in lines if line.partition('=')[0].strip() not in retired]
    if len(kept) == len(lines) and not storage.is_uri(path):
        return path
    copy.write_text('\n'.join(kept) + '\n')
    return str(copy)


def _read_macros() -> set[str]:
    """The macros some binding reads (%NAME), in the config just parsed: gin's own listing of it
    writes every reference as %NAME."""
    return set(re.findall(r'%([A-Za-z_][\w.]*)', gin.config_str()))


def _check_override_macros(bindings: list[str]) -> None:
    """Refuses an override that defines a macro nothing reads: a typo would otherwise be ignored
    (--gin.TRAIN_STEP=3 trains the default TRAIN_STEPS without a word)."""
    read = _read_macros()
    for binding in bindings:
        name = binding.partition('=')[0].strip()
        if '.' in name or name in read:  # a configurable's parameter, or a macro in use
            continue
        by_case = {macro.lower(): macro for macro in read}
        close = difflib.get_close_matches(name.lower(), list(by_case), n=1, cutoff=0.6)
        hint = f'did you mean {by_case[close[0]]}?' if close else (
            f'the gin files read {", ".join(sorted(read))}' if read else 'the gin files read no macros')
        raise BamJaxError(f'gin: --gin.{name} sets a macro that no gin file reads ({hint})')


def load_run_config(workdir: str | storage.Path, bindings: list[str]) -> RunConfig:
    """Parses a run directory's operative gin config (config.gin), or the model.gin of an
    upcycled or imported model that has not been trained, then the overrides; returns the
    configs they bind."""
    from bam_jax.workdir import files

    workdir = storage.path(workdir)
    if not workdir.is_dir():
        raise BamJaxError(f'workdir {workdir} does not exist')
    config = workdir / files.CONFIG
    if not config.is_file():
        config = workdir / files.MODEL_GIN
    if not config.is_file():
        raise BamJaxError(f'{workdir} has no {files.CONFIG} (nor {files.MODEL_GIN}): is it a bam_jax run directory?')
    return parse_gin([str(config)], bindings)
