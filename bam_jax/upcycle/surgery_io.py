"""`bam-jax experts remove|add|replace`: expert surgery (surgery.py) between checkpoints.

    bam-jax experts remove  --workdir=MIX --expert=NAME --out=DIR
    bam-jax experts add     --workdir=MIX --run=DENSE_RUN --out=DIR
    bam-jax experts replace --workdir=MIX --expert=NAME --run=DENSE_RUN --out=DIR

MIX is a mixed model (a mix run, or an upcycled one); its latest checkpoint is read. An added or
replacing expert takes a dense run's weights by the upcycler's rules and its router columns from
its domain (router_init.new_expert_columns: the run's DataConfig.source, or --router_data,
against the mix run's own data). OUT is written as the upcycler writes (atomically):
OUT/checkpoints/0, OUT/model.gin (the model with its routing, and INIT_CHECKPOINT = OUT, for
`bam-jax eval` or a router-only finetune) and OUT/experts.json (what was done, and how much of
the new domain's routing its expert receives).
"""

from __future__ import annotations

import dataclasses
import time

from bam_jax import storage, workdir
from bam_jax.errors import BamJaxError
from bam_jax.models.config import ModelConfig, first_difference
from bam_jax.upcycle import router_init, surgery
from bam_jax.upcycle.gin_file import model_gin
from bam_jax.upcycle.io import run_names
from bam_jax.workdir import files, outputs, tensors

RECORD = 'experts.json'
OPERATIONS = ('remove', 'add', 'replace')


def _read(directory: str, what: str) -> tuple[storage.Path, ModelConfig, dict]:
    step_dir = workdir.resolve_checkpoint(directory, what)
    reader = tensors.CheckpointReader(step_dir)
    return step_dir, workdir.read_model_config(step_dir), {path: reader.read(path) for path in reader.nbytes}


def _check_dense(config: ModelConfig, dense: ModelConfig, run: str) -> None:
    if dense.moe or dense.moa or dense.lory:
        raise BamJaxError(f'{run} is a mixed model; an expert comes from a dense run')
    shape = dataclasses.replace(config, moe=None, moa=None, lory=None, expert_names=())
    difference = first_difference(shape.architecture(), dense.architecture())
    if difference:
        field, ours, theirs = difference
        raise BamJaxError(f'{run} is of another shape: ModelConfig.{field} is {theirs!r} there, {ours!r} in the '
                          'mixed model')


@dataclasses.dataclass(frozen=True)
class NewExpertRouting:
    """How an added or replacing expert's router columns were set, and what they do.

    domain: the new expert's domain (DataConfig.source or --router_data); background: the mix
    run's own data; tokens: tokens sampled from each; scale: {router site: the norm its new column
    was given}; own_share: {routed layer: the share of the domain's routing its expert receives}.
    """
    domain: str
    background: str
    tokens: int
    scale: dict[str, float]
    own_share: dict[str, float]


@dataclasses.dataclass(frozen=True)
class ExpertsRecord:
    """What a surgery did, saved as OUT/experts.json (to_dict; router left out when None).

    operation: one of OPERATIONS; workdir: the mixed model given; checkpoint: its checkpoint read;
    expert: the expert removed or replaced (None for add); run: the dense run added (None for
    remove); experts_before, experts_after: the experts' names in router order; router: the new
    expert's routing (None for remove); seconds: the surgery's wall time, before the output was
    written; model: the output model's config.
    """
    operation: str
    workdir: str
    checkpoint: str
    expert: str | None
    run: str | None
    experts_before: list[str]
    router: NewExpertRouting | None
    experts_after: list[str]
    seconds: float
    model: ModelConfig

    def to_dict(self) -> dict:
        """experts.json's content."""
        record = dataclasses.asdict(self)
        if self.router is None:
            del record['router']
        return record


def _with_new_expert(operation: str, mix: str, params: dict, config: ModelConfig, expert: str | None, run: str,
                     router_data: str, tokens: int) -> tuple[dict, ModelConfig, NewExpertRouting]:
    """add, or replace `expert`: the dense run's weights join as an expert, its router columns set
    from its domain; returns the params, their config and the new expert's routing."""
    _, dense_config, dense = _read(run, 'run')
    _check_dense(config, dense_config, run)
    domain, background = router_init.run_domains([run, mix], f'{router_data},' if router_data else '')
    sample = router_init.sample(domain, tokens)
    columns, stats = router_init.new_expert_columns(params, config, sample, router_init.sample(background, tokens))
    name = run_names([run])[0]
    if operation == 'add':
        params, config = surgery.insert_expert(params, config, dense, name, len(surgery.names(config)), columns)
    else:
        params, config = surgery.replace_expert(params, config, expert, dense, name, columns)
    routing = NewExpertRouting(domain=domain.source, background=background.source, tokens=tokens,
                               scale=stats['scale'], own_share=_own_share(params, config, name, sample))
    return params, config, routing


def experts_command(operation: str, mix: str, out: str, expert: str | None = None, run: str | None = None,
                    overwrite: bool = False, router_data: str = '', router_tokens: int = router_init.ROUTER_TOKENS
                    ) -> ExpertsRecord:
    """Runs one surgery from MIX's latest checkpoint into OUT; returns the record saved as
    OUT/experts.json."""
    start = time.perf_counter()
    if operation not in OPERATIONS:
        raise BamJaxError(f'unknown operation {operation!r}; choose from {", ".join(OPERATIONS)}')
    for flag, given, needed in (('--expert', expert, operation != 'add'), ('--run', run, operation != 'remove')):
        if (given is not None) != needed:
            raise BamJaxError(f'experts {operation} {"needs" if needed else "takes no"} {flag}')
    out = storage.path(out)
    with outputs.atomic_output(out, 'experts', overwrite) as tmp:
        step_dir, config, params = _read(mix, 'workdir')
        before, routing = surgery.names(config), None
        if operation == 'remove':
            params, config = surgery.remove_expert(params, config, expert)
        else:
            params, config, routing = _with_new_expert(operation, mix, params, config, expert, run, router_data,
                                                       router_tokens)
        record = ExpertsRecord(operation=operation, workdir=str(mix), checkpoint=str(step_dir), expert=expert,
                               run=run, experts_before=before, router=routing, experts_after=surgery.names(config),
                               seconds=time.perf_counter() - start, model=config)
        _write(tmp, out, params, config, record, operation, step_dir)
    return record


def _own_share(params: dict, config: ModelConfig, name: str, batches: list[dict]) -> dict[str, float]:
    """{routed layer: the share of the new domain's routing its expert receives}."""
    index = surgery.names(config).index(name)
    loads = router_init.Forward(config).loads(params, batches)
    return {layer: float(load.reshape(len(surgery.names(config)), -1)[index].sum()) for layer, load in loads.items()}


def _write(tmp: storage.Path, out: storage.Path, params: dict, config: ModelConfig, record: ExpertsRecord,
           operation: str, source: storage.Path) -> None:
    """The checkpoint, model.gin (with the routing, and the source's tokenizer) and experts.json under tmp."""
    largest = max(value.nbytes for value in params.values())
    tensors.write_params(tmp, sorted(params.items()), budget=2 * largest)
    outputs.write_model_config(tmp, config)
    tokenizer = files.string_bindings(source.parents[1], 'DataConfig.tokenizer_path')
    (tmp / files.MODEL_GIN).write_text(model_gin(config, out, f'bam-jax experts {operation}', routing=True,
                                                 tokenizer=storage.path(tokenizer[-1]) if tokenizer else None))
    workdir.write_json_atomic(tmp / RECORD, record.to_dict())
