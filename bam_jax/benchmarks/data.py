"""The data table: preparation throughput, the training stream's speed, its memory against the
corpus size, and a resume's time at a far position.

Text: the built-in corpora (general, code, law, math), documents repeated under distinct
headers until a JSONL file of the wanted size is written, so nothing is a duplicate.

  prepare   `prepare_domain` of the JSONL file (read, hashed, de-duplicated, split,
            tokenized, written), in tokens/s, with the byte vocabulary and a 32k BPE Hugging Face
            tokenizer trained on the text; next to a bare `encode_batch` of the same texts on all
            cores (the limit), and to 2 processes that each encode half the batch; and the byte
            vocabulary's preparation by 2 workers of a local job (prepare-data --distributed,
            as on a pod's hosts: each reads half the files, which are hashed in a first pass)
  stream    TokenStream's tokens/s in one process: the 590M shape's batches (8 x 2,048 tokens),
            four prepared domains at equal rates; the 590M model consumes about 110k tokens/s on
            one H100 at 50% MFU
  memory    peak resident set of a process that reads 200 batches of a stream over a domain of
            each size (a fresh interpreter each, numpy and the stream only)
  resume    a stream started at batch 1,000,000: construction to its first batch
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time

from bam_jax.benchmarks import child

SEQ_LEN, BATCH = 2048, 8
H100_TOKENS_PER_S = 110_000
SIZES_MB = (200, 2000)
PREPARE_MB = 40
STREAM_BATCHES = 200


def write_corpus(path: pathlib.Path, megabytes: float) -> int:
    """A JSONL file of about `megabytes` MB of distinct documents; returns its document count."""
    from bam_jax.data import corpora

    texts = [text for domain in corpora.BUILTIN_DOMAINS for _, text in corpora.read_documents(domain)]
    target, written, count = megabytes * 1e6, 0, 0
    with open(path, 'w') as f:
        while written < target:
            text = f'[{count}] {texts[count % len(texts)]}'
            line = json.dumps({'text': text}) + '\n'
            f.write(line)
            written += len(line)
            count += 1
    return count


def _texts(path: pathlib.Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)['text'] for line in f]


def train_tokenizer(texts: list[str], directory: pathlib.Path) -> pathlib.Path:
    """A 32k byte-level BPE tokenizer of `texts`, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=['</s>'], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts[:20000], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / 'tokenizer.json'))
    (directory / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '</s>'}))
    return directory


def _encode_half(args):
    path, texts = args
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # one core each
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    return sum(len(e.ids) for chunk in _chunks(texts)
               for e in tokenizer.encode_batch(chunk, add_special_tokens=False))


def _chunks(texts: list[str]) -> list[list[str]]:
    """The texts in batches of about the size preparation encodes at once."""
    from bam_jax.data.prepare import _BATCH_BYTES

    chunks, size = [[]], 0
    for text in texts:
        chunks[-1].append(text)
        size += len(text)
        if size >= _BATCH_BYTES:
            chunks.append([])
            size = 0
    return chunks


def _limits(texts: list[str], tokenizer_dir: pathlib.Path) -> dict:
    """The bare tokenizer's speed on the same batches as preparation's: encode_batch on all
    cores, and 2 processes of half each."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / 'tokenizer.json'))
    start = time.perf_counter()
    tokens = sum(len(e.ids) for chunk in _chunks(texts)
                 for e in tokenizer.encode_batch(chunk, add_special_tokens=False))
    batch_s = time.perf_counter() - start
    halves = [(str(tokenizer_dir / 'tokenizer.json'), texts[i::2]) for i in range(2)]
    with multiprocessing.get_context('spawn').Pool(2) as pool:
        pool.map(_encode_half, [(h[0], h[1][:10]) for h in halves])  # started, tokenizer loaded once
        start = time.perf_counter()
        assert sum(pool.map(_encode_half, halves)) == tokens
        processes_s = time.perf_counter() - start
    return {'tokens': tokens, 'encode_batch_tokens_per_s': tokens / batch_s,
            'two_processes_tokens_per_s': tokens / processes_s}


def _prepare(path: pathlib.Path, data_dir: pathlib.Path, domain: str, tokenizer_dir=None) -> dict:
    """Prepares the JSONL file as user domain `domain` into data_dir; its speed and prepared name."""
    from bam_jax.data import DataConfig, text_domain
    from bam_jax.data.prepare import prepare_domain

    config = DataConfig(user_domains=(text_domain(domain, str(path)),), data_dir=str(data_dir),
                        validation_fraction=0.05, tokenizer_path=str(tokenizer_dir) if tokenizer_dir else None)
    start = time.perf_counter()
    record = prepare_domain(config, domain, progress=False)
    seconds = time.perf_counter() - start
    tokens = record.splits.train.tokens + record.splits.validation.tokens
    return {'tokens': tokens, 'seconds': seconds, 'tokens_per_s': tokens / seconds, 'name': record.name}


def _prepare_hf(corpus: pathlib.Path, texts: list[str], tmp: pathlib.Path, tokenizer_dir: pathlib.Path) -> dict:
    """The Hugging Face tokenizer's preparation next to its limits, each the faster of two runs
    taken in turn (this machine's speed moves between runs a minute apart)."""
    runs = []
    for i in range(2):
        runs.append((_prepare(corpus, tmp / f'prepared_hf{i}', 'text_hf', tokenizer_dir),
                     _limits(texts, tokenizer_dir)))
    best = max((r for r, _ in runs), key=lambda r: r['tokens_per_s'])
    return {**best, **{f'limit_{k}': max(limit[k] for _, limit in runs) for k in runs[0][1]}}


def _prepare_workers(paths: list[pathlib.Path], data_dir: pathlib.Path, domain: str, workers: int) -> dict:
    """`launch/run.sh --local_processes=WORKERS prepare-data`: the time from the workers' start to
    the publish, as the manifest records it (the processes' own start-up is not counted)."""
    import subprocess

    gin_file = data_dir.parent / f'{domain}.gin'
    gin_file.write_text(f"DataConfig.user_domains = [@{domain}/text_domain()]\n{domain}/text_domain.name = '{domain}'\n"
                        f"{domain}/text_domain.paths = {[str(p) for p in paths]}\nDataConfig.data_dir = '{data_dir}'\n"
                        'DataConfig.validation_fraction = 0.05\n')
    subprocess.run([sys.executable, '-m', 'bam_jax.local_job', f'--processes={workers}', '--',
                    'prepare-data', f'--gin_file={gin_file}', f'--domains={domain}'],
                   check=True, capture_output=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    (manifest,) = data_dir.glob(f'{domain}-*/manifest.json')
    record = json.loads(manifest.read_text())
    tokens = sum(split['tokens'] for split in record['splits'].values())
    return {'tokens': tokens, 'seconds': record['seconds'], 'tokens_per_s': tokens / record['seconds'],
            'workers': workers}


def _stream(data_dir: pathlib.Path, domains: list[str], step: int = 0):
    from bam_jax.data.prepare import open_split
    from bam_jax.data.token_stream import Schedule, TokenStream

    splits = [open_split(str(data_dir), domain, 'train') for domain in domains]
    return TokenStream(splits, Schedule.from_rates(dict.fromkeys(domains, 1)), BATCH, SEQ_LEN, seed=0,
                       start_id=0, step=step)


def _stream_speed(data_dir: pathlib.Path, domains: list[str]) -> dict:
    stream = _stream(data_dir, domains)
    next(stream)
    start = time.perf_counter()
    for _ in range(STREAM_BATCHES):
        next(stream)
    seconds = time.perf_counter() - start
    return {'tokens_per_s': STREAM_BATCHES * BATCH * SEQ_LEN / seconds, 'ms_per_batch': seconds / STREAM_BATCHES * 1e3}


def _child(data_dir: str, domain: str) -> None:
    """A fresh interpreter: peak memory of reading STREAM_BATCHES batches of one domain, spread
    over all of it (every step far from the last)."""
    anon = child.sample_anon_peak()
    stream = _stream(pathlib.Path(data_dir), [domain])
    for i in range(STREAM_BATCHES):
        stream.batch(i * 997)
    print(json.dumps(child.peaks(anon)))


def run(sizes_mb=SIZES_MB, prepare_mb=PREPARE_MB, work: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix='bam_jax-data-bench-', dir=work) as tmp:
        tmp = pathlib.Path(tmp)
        corpus = tmp / 'corpus.jsonl'
        write_corpus(corpus, prepare_mb)
        texts = _texts(corpus)
        tokenizer_dir = train_tokenizer(texts, tmp / 'tokenizer')
        prepare = {'bytes': _prepare(corpus, tmp / 'prepared', 'text_bytes'),
                   'hf_32k': _prepare_hf(corpus, texts, tmp, tokenizer_dir), 'text_mb': corpus.stat().st_size / 1e6}
        halves = [tmp / f'half{i}.jsonl' for i in range(2)]
        with open(corpus) as f:
            lines = f.readlines()
        for i, half in enumerate(halves):
            half.write_text(''.join(lines[i * len(lines) // 2:(i + 1) * len(lines) // 2]))
        del lines
        prepare['bytes_2_workers'] = _prepare_workers(halves, tmp / 'prepared', 'text_workers', 2)
        del texts
        byte_name = prepare['bytes']['name']
        for d in range(3):  # four domains for the mixture
            os.symlink(tmp / 'prepared' / byte_name, tmp / 'prepared' / f'copy{d}')
        stream = {'bytes': _stream_speed(tmp / 'prepared', [byte_name, 'copy0', 'copy1', 'copy2']),
                  'hf_32k': _stream_speed(tmp / 'prepared_hf0', [prepare['hf_32k']['name']])}
        memory = []
        for size in sizes_mb:
            path = tmp / f'corpus_{size}.jsonl'
            write_corpus(path, size)
            domain = f'size_{size}'
            prepared = _prepare(path, tmp / 'prepared', domain)
            path.unlink()
            memory.append({'text_mb': size, 'tokens': prepared['tokens'],
                           **child.run('bam_jax.benchmarks.data', str(tmp / 'prepared'), prepared['name'])})
        start = time.perf_counter()
        next(_stream(tmp / 'prepared', [byte_name], step=1_000_000))
        resume_s = time.perf_counter() - start
    return {'prepare': prepare, 'stream': stream, 'memory': memory, 'resume_s': resume_s}


def print_table(r: dict) -> None:
    p, hf = r['prepare'], r['prepare']['hf_32k']
    print(f'{"prepare (" + format(p["text_mb"], ".0f") + " MB of JSONL)":<34} {"tokens/s":>12} {"vs limit":>9}')
    print('-' * 57)
    print(f'{"bytes vocabulary":<34} {p["bytes"]["tokens_per_s"]:>12,.0f} {"-":>9}')
    two = p['bytes_2_workers']['tokens_per_s']
    print(f'{"  2 workers: " + format(two / p["bytes"]["tokens_per_s"], ".2f") + "x of one":<34} {two:>12,.0f} '
          f'{"-":>9}')
    print(f'{"32k BPE tokenizer":<34} {hf["tokens_per_s"]:>12,.0f} '
          f'{hf["tokens_per_s"] / hf["limit_encode_batch_tokens_per_s"]:>8.2f}x')
    print(f'{"  bare encode_batch, all cores":<34} {hf["limit_encode_batch_tokens_per_s"]:>12,.0f} {"1.00x":>9}')
    print(f'{"  bare encode, 2 processes":<34} {hf["limit_two_processes_tokens_per_s"]:>12,.0f} '
          f'{hf["limit_two_processes_tokens_per_s"] / hf["limit_encode_batch_tokens_per_s"]:>8.2f}x')
    print()
    print(f'{"stream (8 x 2,048 per batch)":<34} {"tokens/s":>12} {"ms/batch":>9} {"vs H100 need":>12}')
    print('-' * 70)
    for name, row in (('bytes, 4 domains', r['stream']['bytes']), ('32k BPE, 1 domain', r['stream']['hf_32k'])):
        print(f'{name:<34} {row["tokens_per_s"]:>12,.0f} {row["ms_per_batch"]:>9.2f} '
              f'{row["tokens_per_s"] / H100_TOKENS_PER_S:>11.0f}x')
    print()
    print(f'{"memory: one domain of":<34} {"tokens":>14} {"peak RSS MiB":>13} {"anon MiB":>9}')
    print('-' * 73)
    for row in r['memory']:
        print(f'{format(row["text_mb"], ",") + " MB of text":<34} {row["tokens"]:>14,} '
              f'{row["peak_rss_bytes"] / 2**20:>13.1f} {row["peak_anon_bytes"] / 2**20:>9.1f}')
    print(f'resume at batch 1,000,000: {r["resume_s"] * 1e3:.1f} ms to the first batch; '
          f'{multiprocessing.cpu_count()} CPU cores')


if __name__ == '__main__':
    _child(*sys.argv[1:])
