"""seqio tasks `bam.<domain>` and mixtures `bam.seed`, `bam.mix`.

Each task reads one domain's documents ({'text'}), tokenizes them into
'targets' with EOS appended, and splits long sequences into chunks of at
most the task's sequence length; packing happens later, in the feature
converter. Splits: 'train' and 'validation' (corpora.py). Under
DataConfig.similarity_batching the training split yields groups of chained
similar documents instead of single documents (similarity.py).

Mixture rates are per example (per chunk), as everywhere in seqio.
`bam.mix` takes 25% from each of general, code, law and math, as in BAM;
since all four domains have documents of a few kB, that is also close to 25%
of tokens (at sequence length 1024: 26/26/26/21%, math a little less).
`bam.seed` takes all built-in domains at equal rates too, rather than in
proportion to their sizes: the size of general and law depends on which
Debian packages a machine has installed, so size-proportional rates would
give a different seed model on every machine, and general's changelogs
would outweigh everything else.

Registration is idempotent: tasks are (re-)registered whenever the
vocabulary or a corpus setting changes, and left alone otherwise.
"""

import functools

from bam_jax.data import corpora, similarity
from bam_jax.data.preprocessors import split_into_chunks
from bam_jax.data.tf_setup import seqio, tf
from bam_jax.data.vocab import make_vocabulary, vocabulary_key

SEED_MIXTURE = 'bam.seed'
MIX_MIXTURE = 'bam.mix'
MIX_DOMAINS = ('general', 'code', 'law', 'math')
SPLITS = ('train', 'validation')

# name -> settings key it was registered with.
_registered = {}


def task_name(domain):
    """The seqio task of a domain: 'code' -> 'bam.code'."""
    return f'bam.{domain}'


def custom_mixture_name(domains):
    """Name of the equal-rate mixture of `domains`: 'bam.mix.code.notes'."""
    return 'bam.mix.' + '.'.join(domains)


class DocumentSource(seqio.FunctionDataSource):
    """The documents of one domain, read lazily (on first use) from corpora.

    With shuffle, all documents of the split are reshuffled every epoch
    (seeded), so the uncached-source caveat of FunctionDataSource does not
    apply and its warning is skipped.

    With `group_bytes` > 0 the training split is put in similarity order and
    its consecutive documents are joined into texts of about `group_bytes`
    bytes: the rows later cut from a group hold neighbouring similar
    documents, even after the rows are shuffled.
    """

    def __init__(self, domain, corpus_args, group_bytes=0):
        self._domain = domain
        self._corpus_args = corpus_args
        self._group_bytes = int(group_bytes)
        self._groups = None  # (training documents, their grouped texts)
        super().__init__(dataset_fn=self._dataset_fn, splits=SPLITS,
                         caching_permitted=False)

    def corpus(self):
        return corpora.load_corpus(self._domain, **self._corpus_args)

    def num_input_examples(self, split):
        return len(self._texts(split))

    def _texts(self, split):
        corpus = self.corpus()
        if split != 'train':
            return [d.text for d in corpus.validation]
        if not self._group_bytes:
            return [d.text for d in corpus.train]
        # Ordering is costly: redo it only when the (cached) corpus changes.
        if self._groups is None or self._groups[0] is not corpus.train:
            texts = [d.text for d in corpus.train]
            groups = similarity.similar_groups(
                texts, self._group_bytes, progress=len(texts) > similarity.DEFAULT_SHARD_SIZE)
            self._groups = (corpus.train, groups)
        return self._groups[1]

    def _dataset_fn(self, split, shuffle_files, seed=None):
        return self.get_dataset(split, shuffle=shuffle_files, seed=seed)

    def get_dataset(self, split='train', shuffle=True, seed=None,
                    shard_info=None, **unused):
        """{'text': string} per document; sharded before shuffling, so each
        process holds a fixed disjoint part of the documents."""
        if split not in SPLITS:
            raise ValueError(f'unknown split {split!r}; have {SPLITS}')
        texts = self._texts(split)
        # Shuffled as indices, looked up after: the same order as shuffling the
        # texts, but a saved iterator state holds the indices, not the corpus.
        table = tf.constant(texts, dtype=tf.string, shape=[len(texts)])
        ds = tf.data.Dataset.range(len(texts))
        size = len(texts)
        if shard_info is not None and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
            size = len(range(shard_info.index, size, shard_info.num_shards))
        if shuffle and size:
            ds = ds.shuffle(size, seed=seed, reshuffle_each_iteration=True)
        return ds.map(lambda i: {'text': tf.gather(table, i)})

    def list_shards(self, split):
        # One "shard" per document: seqio then hands sharding to the source.
        return [str(i) for i in range(max(1, len(self._texts(split))))]


def _preprocessors():
    return [
        functools.partial(seqio.preprocessors.rekey,
                          key_map={'targets': 'text'}),
        functools.partial(seqio.preprocessors.tokenize,
                          copy_pretokenized=False, with_eos=True),
        split_into_chunks,
    ]


def _corpus_args(config):
    return {'validation_fraction': float(config.validation_fraction),
            'math_documents': int(config.math_documents),
            'max_file_bytes': int(config.max_file_bytes),
            'max_domain_bytes': int(config.max_domain_bytes)}


def _replace(registry, name, key, add):
    """Register a task or mixture unless it is already there with `key`."""
    if _registered.get(name) == key and name in registry.names():
        return False
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    add()
    _registered[name] = key
    return True


def register_task(domain, config):
    """Register `bam.<domain>` for a built-in name or a DomainSpec."""
    name = task_name(getattr(domain, 'name', domain))
    args = _corpus_args(config)
    if domain == 'math':
        args.pop('max_file_bytes')
    else:
        args.pop('math_documents')
    group_bytes = int(config.similarity_group_bytes) if config.similarity_batching else 0
    key = (domain, vocabulary_key(config.spm_path, config.tokenizer_path),
           tuple(sorted(args.items())), int(config.shuffle_buffer), group_bytes)
    vocab = make_vocabulary(config.spm_path, config.tokenizer_path)

    def add():
        seqio.TaskRegistry.add(
            name,
            source=DocumentSource(domain, args, group_bytes),
            preprocessors=_preprocessors(),
            output_features={'targets': seqio.Feature(
                vocab, add_eos=True, dtype=tf.int32)},
            shuffle_buffer_size=int(config.shuffle_buffer))

    _replace(seqio.TaskRegistry, name, key, add)
    return name


def register_mixture(name, domains):
    """Register an equal-rate mixture of already registered domain tasks."""
    names = [task_name(d) for d in domains]
    key = tuple((n, _registered[n]) for n in names)

    def add():
        rate = 1.0 / len(names)
        seqio.MixtureRegistry.add(name, [(n, rate) for n in names])

    _replace(seqio.MixtureRegistry, name, key, add)
    return name


def register_all(config):
    """Register the tasks of all built-in and user domains of `config` and
    the mixtures `bam.seed` and `bam.mix`; returns {domain: task name}."""
    names = {d: register_task(d, config) for d in corpora.BUILTIN_DOMAINS}
    for spec in config.user_domains:
        names[spec.name] = register_task(spec, config)
    register_mixture(SEED_MIXTURE, corpora.BUILTIN_DOMAINS)
    register_mixture(MIX_MIXTURE, MIX_DOMAINS)
    return names
