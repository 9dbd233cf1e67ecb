"""Upcycling between checkpoints, one tensor at a time.

Each output tensor is built from its recipe (bam_jax.upcycle.core) by reading just the input
tensors it needs (read ahead while the previous one is built) and written in groups
(bam_jax.workdir.tensors), so host memory stays near a few times (inputs + 1) x the largest
tensor whatever the model size. Everything is written under a hidden
temporary directory next to the output and renamed into place at the end: an interrupted run
leaves no output directory.

Output (usable as INIT_CHECKPOINT, or as a gin file for `bam-jax train`):
  OUT/checkpoints/0/params   the MoE parameters (Orbax PyTree, the run checkpoint layout)
  OUT/checkpoints/0/model    the MoE ModelConfig (Orbax JSON)
  OUT/model.gin              the model config as gin bindings, and INIT_CHECKPOINT = OUT
  OUT/upcycle.json           what was built from what
  OUT/tokenizer/             the inputs' Hugging Face tokenizer, if they read their data with one
                             (model.gin points DataConfig.tokenizer_path here)
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time

from bam_jax import storage, workdir
from bam_jax.errors import BamJaxError
from bam_jax.models.config import ModelConfig, first_difference
from bam_jax.progress import progress_bar
from bam_jax.upcycle.core import (
    Recipe,
    UpcycleSpec,
    build,
    model_config,
    output_bytes,
    plan,
    reads,
    upcycle,
    working_bytes,
)
from bam_jax.upcycle.gin_file import model_gin
from bam_jax.workdir import files, outputs, tensors

STEP = 0


def _read_input(directory: str, what: str) -> tuple[storage.Path, ModelConfig, dict]:
    step_dir = workdir.resolve_checkpoint(directory, what)
    config = workdir.read_model_config(step_dir)
    if config.moe is not None or config.moa is not None or config.lory is not None:
        raise BamJaxError(f'{what} {step_dir} is already a mixture-of-experts model; upcycle dense models')
    return step_dir, config, workdir.read_param_shapes(step_dir)


def _tokenizer(inputs: list[tuple[str, storage.Path, ModelConfig, dict]]) -> storage.Path | None:
    """The Hugging Face tokenizer the dense models read their data with (DataConfig.tokenizer_path
    in their gin config), the same for all of them; None for bam_jax's own vocabularies."""
    found = []
    for name, step_dir, _, _ in inputs:
        paths = files.string_bindings(step_dir.parents[1], 'DataConfig.tokenizer_path')  # <run>/checkpoints/<step>
        found.append((name, storage.path(paths[-1]) if paths else None))

    def content(path):  # the parsed tokenizer.json: formatting aside, the same tokenizer
        return None if path is None else json.loads((path / 'tokenizer.json' if path.is_dir() else path).read_text())
    (first_name, first), described = found[0], lambda p: p or 'no Hugging Face tokenizer'  # noqa: E731
    for name, path in found[1:]:
        if content(path) != content(first):
            raise BamJaxError(f'different tokenizers: {first_name} reads {described(first)}, '
                              f'{name} reads {described(path)}')
    return first


def _check_same_architecture(inputs: list[tuple[str, storage.Path, ModelConfig, dict]]) -> None:
    """Raises naming the first difference between the first input and any other."""
    first_name, _, first_config, first_shapes = inputs[0]
    for name, _, config, shapes in inputs[1:]:
        if config.vocab_size != first_config.vocab_size:
            raise BamJaxError(f'different vocabularies: {first_name} has {first_config.vocab_size} tokens, '
                              f'{name} has {config.vocab_size}')
        for path in sorted(set(first_shapes) | set(shapes)):
            a, b = first_shapes.get(path), shapes.get(path)
            if a is None or b is None or a[0] != b[0]:
                describe = lambda s: 'no such parameter' if s is None else f'shape {tuple(s[0])}'  # noqa: E731
                raise BamJaxError(f'different architectures: {path} has {describe(a)} in {first_name} '
                                  f'but {describe(b)} in {name}')
        difference = first_difference(first_config.architecture(), config.architecture())
        if difference:
            field, first_value, value = difference
            raise BamJaxError(f'different architectures: ModelConfig.{field} is {first_value!r} in {first_name} '
                              f'but {value!r} in {name}')


def run_names(directories: list[str]) -> tuple[str, ...]:
    """What each input run is called by its experts: the domain its config.gin says it trained
    on (DOMAIN, or DataConfig.source: seed, code, ...) when that is a plain name, else its
    directory's name; a name taken already gets _2, _3, ..."""
    names = []
    for directory in directories:
        path = storage.path(directory)
        run = path if (path / files.CHECKPOINTS).is_dir() or not path.name.isdigit() else path.parents[1]
        domains = files.string_bindings(run, 'DOMAIN', 'DataConfig.source')
        name = domains[-1] if domains and re.fullmatch(r'[a-z0-9_]+', domains[-1]) else run.name
        taken = sum(1 for n in names if n == name or re.fullmatch(rf'{re.escape(name)}_\d+', n))
        names.append(name if not taken else f'{name}_{taken + 1}')
    return tuple(names)


def _expert_models(method: str, num_models: int, skip_seed: bool, num_experts: int) -> tuple[int, ...]:
    """For each expert, the index of the input model it comes from (the seed, if any, is input 0)."""
    if method == 'sparse_upcycle':
        if num_models != 1:
            raise BamJaxError(f'sparse_upcycle takes exactly one dense model, got {num_models}')
        if num_experts < 2:
            raise BamJaxError(f'sparse_upcycle needs --num_experts >= 2, got {num_experts}')
        if skip_seed:
            raise BamJaxError('--no_seed_expert does not apply to sparse_upcycle, which copies its one model')
        return (0,) * num_experts
    expert_models = tuple(range(1 if skip_seed else 0, num_models))
    if len(expert_models) < 2:
        raise BamJaxError(f'{method} needs at least two expert models, got {len(expert_models)}')
    return expert_models


@dataclasses.dataclass(frozen=True)
class UpcycleSummary:
    """What an upcycle built from what, saved as OUT/upcycle.json (to_dict).

    method: one of core.METHODS; out: the output directory; inputs: per input model, in order (the
    seed first), {'name': its role or directory, 'step_dir': the checkpoint read}; expert_models:
    per expert, the input it comes from (those names); expert_names: the MoE's names for its experts
    (ModelConfig.expert_names); expert_split: chunks per FFN expert; router_seed: the random
    routers' seed; model: the MoE's config; tensors: how many were written; bytes_read,
    bytes_written, largest_tensor_bytes: tensor bytes; router_init: 'random', or the domain
    routers' statistics (router_init.domain_rows, with 'method', 'tokens' and 'domains'); seconds:
    the upcycle's wall time.
    """
    method: str
    out: str
    inputs: list[dict[str, str]]
    expert_models: list[str]
    expert_names: list[str]
    expert_split: int
    router_seed: int
    model: ModelConfig
    tensors: int
    bytes_read: int
    bytes_written: int
    largest_tensor_bytes: int
    router_init: str | dict = 'random'
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """upcycle.json's content."""
        return dataclasses.asdict(self)


def upcycle_checkpoints(method: str, experts: list[str], out: str | storage.Path, *, seed: str | None = None,
                        seed_expert: bool = True, overwrite: bool = False, num_experts: int = 4,
                        expert_split: int = 1, router_seed: int = 0, domains: list | None = None,
                        router_tokens: int = 0, router_inputs: str = 'seed', progress: bool = True
                        ) -> UpcycleSummary:
    """Builds OUT from the dense checkpoints; returns the summary also saved as OUT/upcycle.json.

    seed: the seed run. It is an expert (the first) unless seed_expert is False, and always
    joins the averaged parameters. experts: the dense expert runs, in expert order. For
    sparse_upcycle give exactly one model (seed or expert); it is copied into num_experts experts.
    domains: None for random routers; else each input model's router_init.Domain (the seed's
    first), whose router_tokens tokens set the routers from router_inputs (router_init.py).
    """
    start = time.perf_counter()
    out = storage.path(out)
    named = ([('seed', seed)] if seed else []) + [(d, d) for d in experts]
    expert_models = _expert_models(method, len(named), seed is not None and not seed_expert, num_experts)
    spec = UpcycleSpec(method, len(named), expert_models, expert_split, router_seed,
                       run_names([directory for _, directory in named]))
    with outputs.atomic_output(out, 'upcycle', overwrite) as tmp:
        inputs = [(name, *_read_input(directory, name)) for name, directory in named]
        _check_same_architecture(inputs)
        tokenizer = _tokenizer(inputs)
        if domains is not None and method == 'sparse_upcycle':
            raise BamJaxError('--router_init=domain needs experts from different domains; sparse_upcycle copies one '
                              'model')
        if domains is not None and len(domains) != len(inputs):
            raise BamJaxError(f'{len(domains)} router domains for {len(inputs)} input models')
        context = tensors.shared_context()
        readers = [tensors.CheckpointReader(step_dir, context) for _, step_dir, _, _ in inputs]
        routers, router_record = {}, 'random'
        if domains is not None:
            routers, router_record = _domain_routers(spec, readers, inputs[0][2], domains, router_tokens,
                                                     router_inputs, progress)
        summary = _write(tmp, out, spec, inputs, readers, routers, tokenizer, progress)
        summary = dataclasses.replace(summary, router_init=router_record, seconds=time.perf_counter() - start)
        workdir.write_json_atomic(tmp / files.UPCYCLE, summary.to_dict())
    return summary


def _write(tmp: storage.Path, out: storage.Path, spec: UpcycleSpec, inputs: list, readers: list, routers: dict,
           tokenizer: storage.Path | None, progress: bool) -> UpcycleSummary:
    """Writes the MoE's checkpoint, model.gin and tokenizer under tmp; returns upcycle.json's record
    (its router_init and seconds left to the caller)."""
    dense = inputs[0][2]
    recipes = plan(spec, dense, {k: v[0] for k, v in inputs[0][3].items()})
    moe_config = model_config(dense, spec)
    bar = progress_bar(recipes, f'upcycle {spec.method}', 'tensor', progress)
    written, largest = _build_all(recipes, readers, spec.num_models, tmp, bar, routers)
    outputs.write_model_config(tmp, moe_config, step=STEP)
    if tokenizer is not None:  # the output carries its own copy, as an imported model does
        from bam_jax.data import copy_tokenizer_files
        copy_tokenizer_files(tokenizer if tokenizer.is_dir() else tokenizer.parent, tmp / files.TOKENIZER_DIR)
    (tmp / files.MODEL_GIN).write_text(model_gin(moe_config, out, f'bam-jax upcycle --method={spec.method}',
                                                 tokenizer=tokenizer and out / files.TOKENIZER_DIR))
    return UpcycleSummary(
        method=spec.method, out=str(out), inputs=[{'name': name, 'step_dir': str(d)} for name, d, _, _ in inputs],
        expert_models=[inputs[i][0] for i in spec.expert_models], expert_names=list(moe_config.expert_names),
        expert_split=spec.expert_split, router_seed=spec.router_seed, model=moe_config,
        tensors=len(recipes), bytes_read=sum(r.bytes_read for r in readers), bytes_written=written,
        largest_tensor_bytes=largest)


def _domain_routers(spec: UpcycleSpec, readers: list[tensors.CheckpointReader], dense: ModelConfig, domains: list,
                    tokens: int, inputs: str, progress: bool) -> tuple[dict, dict]:
    """({router kernel path: kernel}, upcycle.json's record) from the input models' domains: the
    MoE is built in memory (core.upcycle, random routers), then its routers set (router_init)."""
    from bam_jax.upcycle import router_init

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else None
    dense_params = [{path: reader.read(path) for path in reader.nbytes} for reader in readers]
    moe, moe_config = upcycle(dense_params, dense, spec)
    models = sorted(set(spec.expert_models))
    if say:
        say(f'router init: {tokens} tokens of each of {", ".join(domains[m].source for m in models)}')
    samples = {m: router_init.sample(domains[m], tokens) for m in models}
    record = router_init.domain_rows(spec, moe, moe_config, dense_params[0], dense, samples, inputs, say)
    record['own_share'] = {layer: {domains[m].source: share for m, share in shares.items()}
                           for layer, shares in record['own_share'].items()}
    record = {'method': 'domain', 'tokens': tokens, 'domains': [d.source for d in domains], **record}
    return {path: moe[path] for path in moe if path.endswith('/router/kernel')}, record


def _build_all(recipes: dict[str, Recipe], readers: list[tensors.CheckpointReader], num_models: int,
               tmp: storage.Path, paths, given: dict | None = None) -> tuple[int, int]:
    """Builds and writes every output tensor (in the order of `paths`), reading ahead; returns
    (bytes written, largest tensor's bytes). given: tensors made elsewhere (router kernels set
    from the domains), written in place of their recipes.

    The budget is (inputs + 1) x the largest tensor, shared by the reads in flight (each counted
    at ReadAhead.READ_COST x its tensor), what building the current tensor holds
    (core.working_bytes: inputs are taken one at a time) and the finished tensors not yet
    written. TensorStore's and Orbax's own buffers come on top: `make bench` measures the whole
    peak.
    """
    nbytes = readers[0].nbytes  # the inputs share their shapes
    largest = max(max(output_bytes(recipe, nbytes) for recipe in recipes.values()), max(nbytes.values()))
    limit = (len(readers) + 1) * largest
    inputs = {path: reads(recipe, num_models) for path, recipe in recipes.items()}
    ahead = tensors.ReadAhead((readers[i], p) for path in recipes for i, p in inputs[path])
    # Groups of one tensor's worth. Groups of two halve the partial saves (each has a fixed cost)
    # and were about 15% faster on the bench shape, but the group being saved and the one filling
    # then held four tensors' worth, more than the budget leaves (measured: peak anonymous memory
    # 4.5x the largest tensor with groups of one, 4.8x with groups of two).
    with tensors.ParamsWriter(tmp, largest, step=STEP) as writer:
        for path in paths:
            recipe = recipes[path]
            need = working_bytes(recipe, nbytes)
            if writer.held + need > limit:  # write out the finished tensors before taking on this one
                writer.wait()
                if writer.held + need > limit:
                    writer.flush()
                    writer.wait()
            ahead.top_up(limit - writer.held - need)
            if given and path in given:
                writer.add(path, given[path])
            else:
                writer.add(path, build(recipe, lambda i, p: ahead.get(readers[i], p), num_models))
        return writer.close()
