"""Router rows from the experts' own domains: `bam-jax upcycle --router_init=domain`.

The pipeline knows which expert was trained on what: each expert run's DataConfig.source (the
seed's is the seed mixture). Instead of random rows the mix must first teach, each router row
starts as its expert's domain direction:

  1. sample   ROUTER_TOKENS tokens of each input model's domain, from its training split
  2. inputs   each domain's mean router input at every block: the normed hidden state the block
              hands its attention and its FFN (models.routing.RouterInput), over real tokens
              only (no padding, no start token)
  3. rows     per router, expert e's row is its model's domain mean, centred across the experts
              (what all domains share moves every logit alike and tells them apart not at all),
              L2-normalised, times one scale (rows_from_means)

Where the inputs are taken (`inputs`):
  seed       the dense seed (input model 0) reads every domain: one pass
  layerwise  the upcycled MoE itself, layer by layer: layer l's rows are set before layer l+1's
             inputs are taken, so every layer sees the routing below it

The scale: at each domain's mean input, its own expert's logit leads the mean of the others' by
ln(3 (E - 1)), on average over the domains. Were the others tied, the own expert would get
probability 3/4: confident (3x uniform with 4 experts), yet far from saturation, where the
softmax's slope p (1 - p) = 3/16 keeps three quarters of its largest value, so the mix still
trains the rows. Top-1 choices do not depend on the scale; soft routing (BAM's attention
experts), gates and Lory's merges do.

The statistics and the shares of tokens each domain sends to its own expert are recorded in
upcycle.json ('router_init'). The MoE is built in host memory for them (core.upcycle): this is
for models that fit one host's memory.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bam_jax.errors import BamJaxError
from bam_jax.models import ModelConfig, abstract_model, merge_params, split_params
from bam_jax.models.params import unflatten
from bam_jax.models.routing import RouterInput, call_with_aux
from bam_jax.upcycle.core import UpcycleSpec

ROUTER_TOKENS = 32_768  # tokens of each domain read for its statistics (a setting: --router_tokens)
OWN_PROBABILITY = 0.75  # the own expert's probability at its domain's mean input, others tied
ROWS_PER_BATCH = 8
INPUTS = ('seed', 'layerwise')


@dataclasses.dataclass(frozen=True)
class Domain:
    """An input model's domain: a DataConfig.source expression (a domain, 'seed', 'code:3,law:1'),
    the DataConfig that reads it (its run's) and the row length (its run's seq_len)."""
    source: str
    data: object
    seq_len: int


def sample(domain: Domain, tokens: int) -> list[dict]:
    """About `tokens` tokens of the domain's training split, in batches of packed rows."""
    from bam_jax.data import train_batches

    stream = train_batches(dataclasses.replace(domain.data, source=domain.source), ROWS_PER_BATCH,
                           domain.seq_len, seed=0)
    return [next(stream) for _ in range(max(1, math.ceil(tokens / (ROWS_PER_BATCH * domain.seq_len))))]


def _input_sums(graphdef, params, batch) -> tuple[dict, jax.Array]:
    """({'layers/L/attn' | 'layers/L/ffn': sum of the inputs over real tokens [D]}, token count)."""
    model = merge_params(graphdef, params)
    _, sown = nnx.capture(model, RouterInput)(batch['inputs'], batch['segment_ids'], batch['positions'])
    real = ((batch['segment_ids'] > 0) & (batch['positions'] > 0)).astype(jnp.float32)  # no padding, no start
    sums = {}
    for (_, layer, name), value in nnx.to_flat_state(sown):
        (x,) = value.get_value()
        sums[f'layers/{layer}/{name.removesuffix("_input")}'] = jnp.einsum('btd,bt->d', x.astype(jnp.float32), real)
    return sums, jnp.sum(real)


class Forward:
    """A model (its config) run on host numpy parameters: input means and routing loads."""

    def __init__(self, config: ModelConfig):
        self.graphdef, _ = split_params(abstract_model(config))
        self._sums = jax.jit(lambda params, batch: _input_sums(self.graphdef, params, batch))
        self._aux = jax.jit(lambda params, batch: call_with_aux(
            merge_params(self.graphdef, params), batch['inputs'], batch['segment_ids'], batch['positions'])[1])

    def input_means(self, flat_params: dict, batches: list[dict]) -> dict[str, np.ndarray]:
        """{site: mean router input [D] (float64)} over the batches' real tokens."""
        params, totals, count = unflatten(flat_params), {}, 0.0
        for batch in batches:
            sums, n = self._sums(params, batch)
            count += float(n)
            for site, value in sums.items():
                totals[site] = totals.get(site, 0.0) + np.asarray(value, np.float64)
        if not count:
            raise BamJaxError('router init: the domain sample holds no real tokens')
        return {site: total / count for site, total in totals.items()}

    def loads(self, flat_params: dict, batches: list[dict]) -> dict[str, np.ndarray]:
        """{routed layer: its mean load [E] over the batches} (routing.router_aux's 'load')."""
        params, total = unflatten(flat_params), {}
        for batch in batches:
            for layer, aux in self._aux(params, batch).items():
                total[layer] = total.get(layer, 0.0) + np.asarray(aux['load'], np.float64) / len(batches)
        return total


def rows_from_means(means: np.ndarray) -> tuple[np.ndarray, float]:
    """means [E, D], expert e's domain mean input -> (router kernel [D, E], the scale used).

    Rows: the means centred across the experts, L2-normalised, scaled so that at each domain's
    mean its own logit leads the others' mean by ln(OWN_PROBABILITY / (1 - OWN_PROBABILITY) * (E - 1))
    on average over the domains (the module's docstring says why)."""
    experts = means.shape[0]
    centred = means - means.mean(axis=0)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise BamJaxError('router init: two experts read domains with the same mean input; give them different '
                          'domains (--router_data)')
    unit = centred / norms
    logits = means @ unit.T  # [domain, expert]
    lead = np.mean([logits[d, d] - np.mean(np.delete(logits[d], d)) for d in range(experts)])
    if lead <= 0:
        raise BamJaxError('router init: the domains cannot be told apart by their mean inputs')
    scale = math.log(OWN_PROBABILITY / (1 - OWN_PROBABILITY) * (experts - 1)) / lead
    return (scale * unit).T.astype(np.float32), float(scale)


def _router_experts(spec: UpcycleSpec, kernel_shape: tuple[int, ...]) -> list[int]:
    """For each column of a router kernel, the input model its expert comes from."""
    per_model = kernel_shape[1] // len(spec.expert_models)  # expert_split chunks of an FFN share a model
    return [spec.expert_models[k // per_model] for k in range(kernel_shape[1])]


def _set_rows(moe: dict, spec: UpcycleSpec, site: str, means: dict[int, np.ndarray], record: dict) -> None:
    """Sets `site`'s router kernel in `moe` (flat) from the input models' means at that site."""
    path = f'{site}/router/kernel'
    models = _router_experts(spec, moe[path].shape)
    distinct = sorted(set(models))
    kernel, scale = rows_from_means(np.stack([means[m] for m in distinct]))
    columns = kernel[:, [distinct.index(m) for m in models]]
    if len(models) > len(distinct):  # expert_split: an FFN's chunks share its row; the random rows break ties
        columns = columns + moe[path]
    moe[path] = columns.astype(np.float32)
    record['scale'][site] = scale


def domain_rows(spec: UpcycleSpec, moe: dict, moe_config: ModelConfig, dense: dict, dense_config: ModelConfig,
                samples: list[list[dict]], inputs: str = 'seed', progress=None) -> dict:
    """Sets every router kernel of the flat MoE parameters `moe` (in place) from the input
    models' domains; returns the record for upcycle.json.

    dense: the flat parameters of input model 0 (the seed), read by inputs='seed'.
    samples: for each input model that gives an expert, its domain's batches (`sample`)."""
    if inputs not in INPUTS:
        raise BamJaxError(f'unknown router inputs {inputs!r}; choose from {", ".join(INPUTS)}')
    models = sorted(set(spec.expert_models))
    record = {'inputs': inputs, 'scale': {}}
    sites = sorted({path.rsplit('/router/', 1)[0] for path in moe if path.endswith('/router/kernel')},
                   key=lambda s: (int(s.split('/')[1]), s))
    if inputs == 'seed':
        forward = Forward(dense_config)
        means = {m: forward.input_means(dense, samples[m]) for m in models}
        for site in sites:
            _set_rows(moe, spec, site, {m: means[m][site] for m in models}, record)
    else:
        forward = Forward(moe_config)
        for layer in range(moe_config.num_layers):
            if progress:
                progress(f'router init: layer {layer + 1} of {moe_config.num_layers}')
            means = {m: forward.input_means(moe, samples[m]) for m in models}
            for site in (s for s in sites if s.split('/')[1] == str(layer)):
                _set_rows(moe, spec, site, {m: means[m][site] for m in models}, record)
    record['own_share'] = own_shares(Forward(moe_config), moe, spec, samples)
    return record


def own_shares(forward: Forward, moe: dict, spec: UpcycleSpec, samples: list[list[dict]]) -> dict:
    """{routed layer: {input model: share of its domain's routing weight on its own experts}}: the
    load (top-k: the share of assignments; soft routing: the mean gate) on the experts that
    came from the model whose domain the tokens are."""
    shares: dict[str, dict[int, float]] = {}
    for model in sorted(set(spec.expert_models)):
        for layer, load in forward.loads(moe, samples[model]).items():
            experts = _router_experts(spec, (0, len(load)))
            shares.setdefault(layer, {})[model] = float(sum(w for w, m in zip(load, experts) if m == model))
    return shares


def run_domains(directories: list[str], sources: str = '') -> list[Domain]:
    """Each run's Domain, from its own config (config.gin): its DataConfig, its seq_len, and its
    DataConfig.source unless `sources` (comma-separated, one per run; empty keeps the run's)
    names another. A source with rates ('code:3,law:1') is not split on its commas: give
    those runs' sources in their config instead."""
    from bam_jax.gin_config import load_run_config

    given = [s.strip() for s in sources.split(',')] if sources else [''] * len(directories)
    if len(given) != len(directories):
        raise BamJaxError(f'--router_data names {len(given)} domains for {len(directories)} input models '
                          '(the seed first, then the experts)')
    domains = []
    for directory, source in zip(directories, given):
        configs = load_run_config(directory, [])
        source = source or configs.data.source
        if not source:
            raise BamJaxError(f'{directory} records no DataConfig.source: name its domain with --router_data')
        domains.append(Domain(source, configs.data, configs.train.seq_len))
    return domains


def format_shares(record: dict) -> str:
    """A table: per routed layer kind, each domain's share of routing to its own expert, the mean
    over layers."""
    kinds = sorted({layer.rsplit('/', 1)[1] for layer in record['own_share']})
    names = list(dict.fromkeys(name for shares in record['own_share'].values() for name in shares))
    lines = [f'router init from domains ({record["inputs"]} inputs): share routed to the own expert, mean over layers',
             f'{"domain":<12}' + ''.join(f'{kind:>8}' for kind in kinds)]
    for name in names:
        row = [np.mean([s[name] for layer, s in record['own_share'].items() if layer.endswith('/' + kind)])
               for kind in kinds]
        lines.append(f'{name:<12}' + ''.join(f'{value:>8.3f}' for value in row))
    return '\n'.join(lines)


def new_expert_columns(moe: dict, moe_config: ModelConfig, domain: list[dict], background: list[dict]
                       ) -> tuple[dict[str, np.ndarray], dict]:
    """Router columns for an expert added to a trained mixed model (bam-jax experts add/replace):
    at each router, the direction from the mean input of the model's mix data (`background`, its
    batches) to the mean input of the new expert's domain (`domain`), normalised and scaled to the
    mean norm of the router's trained columns, so it competes with them on an equal footing.
    The inputs are the mixed model's own, before the expert joins. Returns ({kernel path:
    column [D]}, {'scale': {site: norm}})."""
    forward = Forward(moe_config)
    new, mix = forward.input_means(moe, domain), forward.input_means(moe, background)
    columns, scales = {}, {}
    for path in (p for p in moe if p.endswith('/router/kernel')):
        site = path.rsplit('/router/', 1)[0]
        direction = new[site] - mix[site]
        if not np.linalg.norm(direction):
            raise BamJaxError("router init: the new expert's domain has the mix's mean input; name another "
                              'with --router_data')
        scales[site] = float(np.mean(np.linalg.norm(moe[path], axis=0)))
        columns[path] = (direction / np.linalg.norm(direction) * scales[site]).astype(np.float32)
    return columns, {'scale': scales}
