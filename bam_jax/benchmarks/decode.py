"""Times generation through the real decode engine: prefill, then the on-device decode loop.

Every architecture runs at one model size, in two settings: the BAM paper's (a 256-token prompt,
16 new tokens) and a long context (a 2,048-token prompt, 16 new tokens), each at batch 1 and 16.
Decoding is greedy with no EOS, so every row makes every token. Weights are random: the speed of
a step does not depend on their values (routing does, a little: top-1 FFN experts chosen by a
random router spread over all experts at batch 16, as trained routers do).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from bam_jax.generate import Engine, cache_bytes, cache_spec
from bam_jax.generate.sampling import GREEDY
from bam_jax.models import ModelConfig, abstract_model, init_params, split_params

SETTINGS = (('paper', 256, 16), ('long', 2048, 16))  # (name, prompt tokens, new tokens)
BATCHES = (1, 16)
NEVER = -2  # an EOS id no row ever samples


def time_decode(config: ModelConfig, prompt_len: int, new_tokens: int, batch: int, repeats: int = 2) -> dict:
    """Best of `repeats` (after one compiling run): seconds of the prefill (with the first new
    token) and of the decode loop that makes the other new_tokens - 1."""
    graphdef, _ = split_params(abstract_model(config))
    params = init_params(config, 0)
    engine = Engine(graphdef, config, bucket=64)  # prompts of 256 and 2048: no padding
    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt_len)).tolist()
    tokens, lengths = engine.pad_prompts(prompts)
    max_new = np.full(batch, new_tokens, np.int32)
    keys = jax.random.split(jax.random.key(0), batch)
    prefill, decode = [], []
    for _ in range(repeats + 1):
        cache = engine.new_cache(batch, tokens.shape[1] + new_tokens)
        jax.block_until_ready(cache)
        start = time.perf_counter()
        state = engine.start(params, tokens, lengths, cache, keys, max_new, NEVER, sampling=GREEDY)
        jax.block_until_ready(state)
        middle = time.perf_counter()
        state, out = engine.loop(state, params, NEVER, steps=new_tokens - 1, sampling=GREEDY)
        jax.block_until_ready(out)
        prefill.append(middle - start)
        decode.append(time.perf_counter() - middle)
    assert int(np.sum(np.asarray(out) >= 0)) == batch * (new_tokens - 1)  # every row made every token
    decode_s = min(decode[1:])
    return {'prefill_s': min(prefill[1:]), 'decode_s': decode_s,
            'decode_tokens_per_s': batch * (new_tokens - 1) / decode_s,
            'cache_bytes': cache_bytes(cache_spec(config, batch, tokens.shape[1] + new_tokens))}


def run(configs: dict[str, ModelConfig], progress=print) -> list[dict]:
    """One row per (architecture, setting): batch 1 and 16 side by side, and the ratio to BTX."""
    rows = []
    for setting, prompt_len, new_tokens in SETTINGS:
        for arch, config in configs.items():
            progress(f'timing decode {arch}, {setting} ({prompt_len} + {new_tokens} tokens) ...')
            row = {'arch': arch, 'setting': setting, 'prompt_len': prompt_len, 'new_tokens': new_tokens}
            for batch in BATCHES:
                row[f'batch_{batch}'] = time_decode(config, prompt_len, new_tokens, batch)
            rows.append(row)
    for row in rows:
        btx = next((r for r in rows if r['arch'] == 'btx' and r['setting'] == row['setting']), None)
        for batch in BATCHES:
            speed = row[f'batch_{batch}']['decode_tokens_per_s']
            row[f'batch_{batch}']['vs_btx'] = speed / btx[f'batch_{batch}']['decode_tokens_per_s'] if btx else None
    return rows


def print_table(rows: list[dict], description: str) -> None:
    header = (f'{"model":<15} {"setting":<8} {"prefill b1 ms":>13} {"prefill b16 ms":>14} {"tok/s b1":>9} '
              f'{"tok/s b16":>10} {"cache b16 MiB":>13} {"b1 vs BTX":>9} {"b16 vs BTX":>10}')
    print(header)
    print('-' * len(header))
    for r in rows:
        one, many = r['batch_1'], r['batch_16']
        ratio = (lambda x: f'{x:.2f}x' if x is not None else '-')  # noqa: E731
        print(f'{r["arch"]:<15} {r["setting"]:<8} {one["prefill_s"] * 1e3:>13.1f} {many["prefill_s"] * 1e3:>14.1f} '
              f'{one["decode_tokens_per_s"]:>9.1f} {many["decode_tokens_per_s"]:>10.1f} '
              f'{many["cache_bytes"] / 2**20:>13.1f} {ratio(one["vs_btx"]):>9} {ratio(many["vs_btx"]):>10}')
    print(description)
