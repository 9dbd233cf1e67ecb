"""A training run, resolved (its configs, budget, mesh, abstract model, optimizer and shardings),
and the state its step loop starts from.

Building one checks everything that does not need the workdir (budget, data, vocabulary, batch
split) and writes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from bam_jax import data, storage
from bam_jax.errors import BamJaxError
from bam_jax.models import ModelConfig, abstract_model, param_shardings, split_params
from bam_jax.parallel import MeshConfig, batch_sharding, create_mesh, replicated
from bam_jax.train.budget import resolve_train_steps
from bam_jax.train.config import TrainConfig
from bam_jax.train.optimizer import make_optimizer, trainable_mask

if TYPE_CHECKING:
    from bam_jax.gin_config import RunConfig


@dataclasses.dataclass(frozen=True)
class Run:
    """What `train` needs besides the start state. Fields with `abstract_` hold ShapeDtypeStructs.
    configs: as given (the operative gin text, a sub-run's base; model, data and mesh_config
    read it); config: configs.train with the budget's train_steps."""
    workdir: storage.Path
    configs: RunConfig
    config: TrainConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    abstract_params: Any
    param_shardings: Any
    optimizer: optax.GradientTransformation
    abstract_opt_state: Any
    opt_shardings: Any
    batch_sharding: Any

    @classmethod
    def create(cls, workdir, configs: RunConfig) -> Run:
        """The run of `configs` (gin_config.parse_gin binds them from a command's gin files); the
        budget (if any) sets TrainConfig.train_steps."""
        model, data_config, mesh_config = configs.model, configs.data, configs.mesh
        config = resolve_train_steps(configs.train, model)
        if config.match_run or config.flops_budget:
            basis = (f'the {config.match} of {config.match_run}' if config.match_run
                     else f'{config.flops_budget:.3g} FLOPs')
            print(f'training {config.train_steps} steps: {basis}')
        mesh = create_mesh(mesh_config)
        _check_data(config, model, data_config, mesh)

        abstract = abstract_model(model)
        graphdef, abstract_params = split_params(abstract)
        shardings = param_shardings(abstract, mesh)
        if config.trainable and not any(jax.tree.leaves(trainable_mask(abstract_params, config.trainable))):
            raise BamJaxError(f'TrainConfig.trainable {config.trainable!r} matches no parameter of the model')
        optimizer = make_optimizer(config)
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        return cls(workdir=storage.path(workdir), configs=configs, config=config, mesh=mesh, graphdef=graphdef,
                   abstract_params=abstract_params, param_shardings=shardings, optimizer=optimizer,
                   abstract_opt_state=abstract_opt,
                   opt_shardings=opt_shardings(optimizer, abstract_opt, shardings, mesh),
                   batch_sharding=batch_sharding(mesh))

    @property
    def model(self) -> ModelConfig:
        return self.configs.model

    @property
    def data(self) -> data.DataConfig:
        return self.configs.data

    @property
    def mesh_config(self) -> MeshConfig:
        return self.configs.mesh


def opt_shardings(optimizer, abstract_opt_state, shardings, mesh):
    """Moments mirror the parameters' shardings; counters and other scalars are replicated. A
    parameter that does not train (TrainConfig.trainable) has no moments: an empty MaskedNode."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_map_params(optimizer, lambda p, s: p if masked(p) else s, abstract_opt_state, shardings,
                                 transform_non_params=lambda _: replicated(mesh), is_leaf=masked)


def _check_data(config: TrainConfig, model: ModelConfig, data_config: data.DataConfig, mesh: Mesh) -> None:
    if model.max_length and config.seq_len > model.max_length:
        raise BamJaxError(f'TrainConfig.seq_len {config.seq_len} is longer than the model reads '
                          f'(ModelConfig.max_length {model.max_length})')
    data.source_rates(data_config)
    data.eval_domain_names(data_config)
    vocab_size = data.vocab_size(data_config)
    if vocab_size > model.vocab_size:
        raise BamJaxError(f'the vocabulary has {vocab_size} ids but ModelConfig.vocab_size is {model.vocab_size}')
    data_parallel = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']
    if config.batch_size % data_parallel:
        raise BamJaxError(f'batch size {config.batch_size} is not divisible by the {data_parallel} '
                          f'data-parallel devices')
    if config.batch_size % jax.process_count():
        raise BamJaxError(f'batch size {config.batch_size} is not divisible by the {jax.process_count()} processes')


@dataclasses.dataclass
class StartState:
    """The state the step loop begins from (bam_jax.train.start). data_position: global batches
    read, all the training stream needs to go on. settings_changed: on resume, the model settings
    that differ from the checkpoint's ({setting: [checkpoint's, this run's]})."""
    step: int
    params: Any
    opt_state: Any
    data_position: int
    settings_changed: dict = dataclasses.field(default_factory=dict)
