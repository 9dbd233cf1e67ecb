"""One owner of a run directory: its file names, atomic JSON, and its Orbax checkpoints.

train, upcycle and evaluate read and write workdirs only through this package.
"""

from bam_jax.workdir import files
from bam_jax.workdir.checkpoints import (
    RunCheckpoints,
    check_model,
    latest_step_dir,
    read_model_config,
    read_param_shapes,
    resolve_checkpoint,
    restore_params,
)
from bam_jax.workdir.files import write_json_atomic

__all__ = ['RunCheckpoints', 'check_model', 'files', 'latest_step_dir',
           'read_model_config', 'read_param_shapes', 'resolve_checkpoint', 'restore_params',
           'write_json_atomic']
