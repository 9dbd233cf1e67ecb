"""Packed numpy batches for training and evaluation.

Every batch is a dict of numpy arrays shaped [batch, seq_len]:
    inputs        int32    decoder input: targets shifted right, with
                           start_id(vocabulary) at each segment start (0 for
                           bytes and SentencePiece; a Hugging Face
                           tokenizer's BOS, or its EOS when it has none)
    targets       int32
    segment_ids   int32    0 = padding, 1.. = the packed documents of a row
    positions     int32    position within its document (chunk)
    loss_weights  float32  0 on padding
"""

import functools

import numpy as np

from bam_jax.data import tasks
from bam_jax.data.tf_setup import seqio, tf
from bam_jax.data.train_stream import TrainStream, has_state, process_shards, shard_count, shard_info
from bam_jax.data.vocab import start_id, vocabulary
from bam_jax.errors import BamJaxError

_FEATURES = {'inputs': 'decoder_input_tokens',
             'targets': 'decoder_target_tokens',
             'segment_ids': 'decoder_segment_ids',
             'positions': 'decoder_positions',
             'loss_weights': 'decoder_loss_weights'}


def _task_names(config):
    return tasks.register_all(config)


def resolve_source(config):
    """The seqio task or mixture name that `config.source` stands for."""
    if not config.source:
        raise BamJaxError('DataConfig.source is not set: name a domain '
                          "(branch runs: --gin.DOMAIN=\"'code'\")")
    names = _task_names(config)
    source = config.source.strip()
    if source in names:
        return names[source]
    if source in ('seed', 'mix'):
        return tasks.SEED_MIXTURE if source == 'seed' else tasks.MIX_MIXTURE
    if ',' in source:
        domains = [d.strip() for d in source.split(',') if d.strip()]
        unknown = [d for d in domains if d not in names]
        if unknown or not domains:
            raise BamJaxError(f'unknown domains {unknown} in source '
                              f'{source!r}; domains are {list(names)}')
        return tasks.register_mixture(tasks.custom_mixture_name(domains),
                                      domains)
    if source in seqio.TaskRegistry.names() or \
            source in seqio.MixtureRegistry.names():
        return source
    raise BamJaxError(f'unknown data source {source!r}: use a domain '
                      f"({', '.join(names)}), 'seed', 'mix', comma-separated "
                      'domains, or a registered seqio task or mixture')


def _model_features(batch, start=0):
    """seqio decoder_* features -> the names and dtypes the model uses.

    seqio's shift right leaves 0 at the start of every segment (a document
    or a chunk of one: position 0, segment id > 0); `start` goes there
    instead."""
    out = {k: tf.cast(batch[v], tf.int32) for k, v in _FEATURES.items()}
    out['loss_weights'] = tf.cast(batch[_FEATURES['loss_weights']],
                                  tf.float32)
    if start:
        first = (out['positions'] == 0) & (out['segment_ids'] > 0)
        out['inputs'] = tf.where(first, tf.constant(start, tf.int32),
                                 out['inputs'])
    return out


def _features_fn(config):
    return functools.partial(_model_features,
                             start=start_id(vocabulary(config)))


def _options():
    options = tf.data.Options()
    options.deterministic = True
    # Keep a skip(0) in the graph: a saved iterator state fits only the graph
    # that saved it, and a stream that replayed (skip(k)) must save a state
    # that a restoring stream (skip(0)) can read.
    options.experimental_optimization.noop_elimination = False
    return options


def _packed(name, split, seq_len, shuffle, seed, num_epochs, shard_info):
    if seq_len < 2:
        raise BamJaxError(f'seq_len must be >= 2, got {seq_len}')
    lengths = {'targets': int(seq_len)}
    # No in-memory cache of small sources (seqio's default): a cache would
    # replay the first epoch's document order in every epoch, and a saved
    # iterator state would hold every document read so far.
    ds = seqio.get_mixture_or_task(name).get_dataset(
        lengths, split=split, shuffle=shuffle, seed=seed,
        num_epochs=num_epochs, shard_info=shard_info,
        try_in_mem_cache=False)
    return seqio.DecoderFeatureConverter(pack=True)(ds, lengths)


def train_batches(config, batch_size, seq_len, seed, start_batch=0,
                  process_index=0, process_count=1, saved_state=None):
    """Endless shuffled packed batches of the training split: a TrainStream
    of this process's rows of each global batch of `batch_size` rows.

    Deterministic given the arguments and config.data_shards: batch i of a
    stream started at batch k equals batch k+i of a fresh stream. It starts
    there from `saved_state` (TrainStream.save() at batch k) when that holds
    this process's shards, in time that does not grow with k; otherwise it
    replays k batches (stream.replayed says how many).
    """
    if batch_size < 1 or start_batch < 0:
        raise BamJaxError(f'need batch_size >= 1 and start_batch >= 0, got '
                          f'{batch_size} and {start_batch}')
    if not 0 <= process_index < process_count:
        raise BamJaxError(f'process_index {process_index} is not in '
                          f'[0, {process_count})')
    num_shards = shard_count(config, process_count)
    if batch_size % num_shards:
        raise BamJaxError(f'batch size {batch_size} is not divisible by the '
                          f'{num_shards} data shards')
    name = resolve_source(config)
    shards = process_shards(num_shards, process_index, process_count)
    restore = has_state(saved_state or {}, shards, num_shards)
    skip = 0 if restore else start_batch
    datasets = {}
    for shard in shards:
        ds = _packed(name, 'train', seq_len, shuffle=True, seed=int(seed),
                     num_epochs=None,
                     shard_info=shard_info(shard, num_shards))
        # The same graph with or without a restore: the skip op is always
        # there, so a saved state fits any stream of these arguments.
        datasets[shard] = (ds.batch(batch_size // num_shards,
                                    drop_remainder=True)
                           .map(_features_fn(config))
                           .skip(skip)
                           .prefetch(2)
                           .with_options(_options()))
    stream = TrainStream(datasets, num_shards, config.source, replayed=skip)
    if restore:
        stream.restore(saved_state)
    return stream


def eval_batches(config, domain, batch_size, seq_len):
    """The validation split of `domain`, packed, in a fixed order: at most
    `config.eval_batches` batches, the last padded with all-zero rows.

    Under the cap, the rows are every k-th chunk of the whole split rather
    than its first chunks: a capped evaluation still spans every validation
    document instead of the one or two that come first.
    """
    names = _task_names(config)
    if domain not in names:
        raise BamJaxError(f'unknown eval domain {domain!r}; domains are '
                          f"{', '.join(names)}")
    task = seqio.TaskRegistry.get(names[domain])
    if not task.source.num_input_examples('validation'):
        raise BamJaxError(f"domain '{domain}' has no validation documents "
                          '(too few distinct documents)')
    lengths = {'targets': int(seq_len)}
    chunks = task.get_dataset(lengths, split='validation', shuffle=False,
                              num_epochs=1, use_cached=False)
    if config.eval_batches:
        count = int(chunks.reduce(np.int64(0), lambda n, _: n + 1))
        stride = max(1, count // (config.eval_batches * batch_size))
        chunks = chunks.shard(stride, 0)  # chunks 0, k, 2k, ...
    ds = seqio.DecoderFeatureConverter(pack=True)(chunks, lengths)
    ds = ds.batch(batch_size).map(_features_fn(config))
    if config.eval_batches:
        ds = ds.take(config.eval_batches)
    batches = list(ds.with_options(_options()).as_numpy_iterator())
    if batches and len(batches[-1]['targets']) < batch_size:
        last = batches[-1]
        missing = batch_size - len(last['targets'])
        batches[-1] = {k: np.concatenate(
            [v, np.zeros((missing,) + v.shape[1:], v.dtype)])
            for k, v in last.items()}
    return batches
