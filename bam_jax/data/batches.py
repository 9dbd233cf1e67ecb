"""Training and validation batches of a DataConfig, read from prepared domains (prepare.py).

  train_batches       the run's training stream (token_stream.TokenStream) over the domains that
                      DataConfig.source names, each prepared first if it is built in or small and
                      local (prepare.ensure_prepared)
  eval_batches        a domain's validation split as windows of seq_len tokens, in order

DataConfig.source names: a domain; 'seed' or 'mix' (the four built-in domains at equal rates, as
BAM's mix phase takes 25% of each); domains separated by commas (equal rates); or domains with
their rates, 'code:3,law:1'. Rates count rows of the batch, and so tokens: every row is full.

No seqio and no TensorFlow for the byte vocabulary (vocab.config_start_id).
"""

from __future__ import annotations

import math

import numpy as np

from bam_jax.data import corpora, prepare
from bam_jax.data.token_stream import Schedule, TokenStream, pack_windows
from bam_jax.data.vocab import config_start_id
from bam_jax.errors import BamJaxError

MIXTURES = {'seed': corpora.BUILTIN_DOMAINS, 'mix': ('general', 'code', 'law', 'math')}


def source_rates(config) -> dict[str, float]:
    """{domain: rate} of config.source."""
    source = (config.source or '').strip()
    if not source:
        raise BamJaxError('DataConfig.source is not set: name a domain (branch runs: --gin.DOMAIN="\'code\'")')
    if source in MIXTURES:
        return dict.fromkeys(MIXTURES[source], 1.0)
    rates = {}
    for entry in (e.strip() for e in source.split(',')):
        name, _, rate = entry.partition(':')
        try:
            rates[name.strip()] = float(rate) if rate else 1.0
        except ValueError:
            raise BamJaxError(f'bad rate {rate!r} for {name!r} in DataConfig.source {source!r}') from None
    unknown = [name for name in rates if name not in config.domains]
    if unknown:
        raise BamJaxError(f"unknown domains {', '.join(unknown)} in DataConfig.source {source!r}; domains are "
                          f"{', '.join(config.domains)}, and the mixtures {', '.join(MIXTURES)}")
    return rates


def train_batches(config, batch_size: int, seq_len: int, seed: int, start_batch: int = 0, process_index: int = 0,
                 process_count: int = 1) -> TokenStream:
    """This process's rows of every global training batch, from batch `start_batch` on."""
    rates = source_rates(config)
    for domain in rates:
        prepare.ensure_prepared(config, domain)
    splits = [prepare.open_split(config.data_dir, prepare.prepared_name(config, domain), 'train') for domain in rates]
    return TokenStream(splits, Schedule.from_rates(rates), batch_size, seq_len, seed, config_start_id(config),
                       process_index, process_count, step=start_batch)


def eval_batches(config, domain: str, batch_size: int, seq_len: int) -> list[dict[str, np.ndarray]]:
    """The validation split of `domain` as windows of seq_len tokens in order, batch_size rows a
    batch, the last padded with empty rows. Under DataConfig.eval_batches (0: no cap) the rows
    are every k-th window rather than the first ones, so a capped evaluation spans the split."""
    if domain not in config.domains:
        raise BamJaxError(f"unknown eval domain {domain!r}; domains are {', '.join(config.domains)}")
    prepare.ensure_prepared(config, domain)
    split = prepare.open_split(config.data_dir, prepare.prepared_name(config, domain), 'validation')
    if not split.tokens:
        raise BamJaxError(f"domain '{domain}' has no validation documents (too few distinct documents)")
    windows = math.ceil(split.tokens / seq_len)
    chosen = range(windows)
    if config.eval_batches:
        cap = config.eval_batches * batch_size
        chosen = range(0, windows, max(1, windows // cap))[:cap]
    batches = []
    for lo in range(0, len(chosen), batch_size):
        reads = [split.window(k * seq_len, min((k + 1) * seq_len, split.tokens)) for k in chosen[lo:lo + batch_size]]
        reads += [(np.zeros(0, np.int32), np.zeros(0, np.int64))] * (batch_size - len(reads))
        batches.append(pack_windows(reads, seq_len, config_start_id(config)))
    return batches
