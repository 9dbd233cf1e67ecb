"""Gin set-up shared by the CLI commands: files, `--gin.NAME=VALUE` overrides, search path."""

from __future__ import annotations

import pathlib

import gin

from bam_jax.errors import BamJaxError

# The repository root holds gin/: files are found relative to the working directory first,
# then relative to it, so `include 'gin/seed.gin'` works from anywhere.
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def resolve_gin_file(name: str) -> str:
    for base in (pathlib.Path.cwd(), REPO_ROOT):
        path = base / name
        if path.is_file():
            return str(path)
    raise BamJaxError(f'gin file {name} not found (looked in {pathlib.Path.cwd()} and {REPO_ROOT})')


def parse_gin(files: list[str], bindings: list[str]) -> None:
    """Parses gin files then overrides, after registering every configurable of bam_jax."""
    import bam_jax.data  # noqa: F401 - registers DataConfig, text_domain
    import bam_jax.models  # noqa: F401 - registers ModelConfig
    import bam_jax.parallel  # noqa: F401 - registers MeshConfig
    import bam_jax.train  # noqa: F401 - registers TrainConfig

    gin.clear_config()
    gin.add_config_file_search_path(str(REPO_ROOT))
    paths = [resolve_gin_file(f) for f in files]
    try:
        gin.parse_config_files_and_bindings(paths, bindings)
    except (OSError, ValueError, SyntaxError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ''
        if 'parse' in first.lower() or isinstance(e, SyntaxError):
            hint = ' (string values need inner quotes: --gin.DOMAIN="\'code\'")'
        raise BamJaxError(f'gin: {first}{hint}') from None
