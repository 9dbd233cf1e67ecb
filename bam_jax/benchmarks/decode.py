"""Times generation through the real decode engine: prefill, then the on-device decode loop.

Every architecture runs at one model size, in two settings: the BAM paper's (a 256-token prompt,
16 new tokens) and a long context (a 2,048-token prompt, 16 new tokens), each at batch 1 and 16.
Decoding is greedy with no EOS, so every row makes every token. Weights are random: the speed of
a step does not depend on their values (routing does, a little: top-1 FFN experts chosen by a
random router spread over all experts at batch 16, as trained routers do).
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from bam_jax.generate import Engine, cache_bytes, cache_spec
from bam_jax.generate.sampling import GREEDY
from bam_jax.models import ModelConfig, abstract_model, flatten, init_params, split_params

SETTINGS = (('paper', 256, 16), ('long', 2048, 16))  # (name, prompt tokens, new tokens)
BATCHES = (1, 16)
NEVER = -2  # an EOS id no row ever samples


def bytes_per_step(config: ModelConfig, batch: int, cache_len: int) -> float:
    """Bytes one decode step must read at least: every weight it uses, once (the token embedding
    only for the batch's rows; of top-k FFN experts, the expected number of distinct experts the
    batch chooses under uniform routing; Lory's experts not at all, their per-row merge being in
    the cache), plus the whole cache (a query reads every allocated slot, masked)."""
    _, params = split_params(abstract_model(config))
    total = 0.0
    for path, leaf in flatten(params).items():
        size = leaf.size * leaf.dtype.itemsize
        if path == 'embed/embedding' and not config.tie_embeddings:
            size *= batch / config.vocab_size
        elif '/ffn/experts/' in path and config.lory:
            size = 0
        elif '/ffn/experts/' in path:
            experts = config.moe.num_routed_experts
            size *= 1 - (1 - config.moe.experts_per_token / experts) ** batch  # the share of experts used
        total += size
    return total + cache_bytes(cache_spec(config, batch, cache_len))


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
            'cache_bytes': cache_bytes(cache_spec(config, batch, tokens.shape[1] + new_tokens)),
            'bytes_per_token': bytes_per_step(config, batch, tokens.shape[1] + new_tokens) / batch}


def time_row(arch: str, config: ModelConfig, setting: tuple, batches=BATCHES) -> dict:
    """One architecture in one setting ((name, prompt tokens, new tokens)), at every batch size."""
    name, prompt_len, new_tokens = setting
    row = {'arch': arch, 'setting': name, 'prompt_len': prompt_len, 'new_tokens': new_tokens}
    for batch in batches:
        row[f'batch_{batch}'] = time_decode(config, prompt_len, new_tokens, batch)
    return row


def compare_to_btx(rows: list[dict], batches=BATCHES) -> list[dict]:
    """Adds to each timed row its speed relative to BTX's row of the same setting, and the speed a
    memory-bound device would give (BTX's bytes read per token over this model's)."""
    timed = [r for r in rows if 'skipped' not in r]
    for row in timed:
        btx = next((r for r in timed if r['arch'] == 'btx' and r['setting'] == row['setting']), None)
        for batch in batches:
            mine, base = row[f'batch_{batch}'], btx and btx[f'batch_{batch}']
            mine['vs_btx'] = mine['decode_tokens_per_s'] / base['decode_tokens_per_s'] if base else None
            mine['bytes_vs_btx'] = base['bytes_per_token'] / mine['bytes_per_token'] if base else None
    return rows


def run(configs: dict[str, ModelConfig], progress=print, settings=SETTINGS, batches=BATCHES) -> list[dict]:
    """One row per (architecture, setting): the batch sizes side by side, and the ratio to BTX."""
    rows = []
    for setting in settings:
        for arch, config in configs.items():
            progress(f'timing decode {arch}, {setting[0]} ({setting[1]} + {setting[2]} tokens) ...')
            rows.append(time_row(arch, config, setting, batches))
    return compare_to_btx(rows, batches)


def _ratio(x) -> str:
    return '-' if x is None or math.isnan(x) else f'{x:.2f}x'


def print_table(rows: list[dict], description: str, batches=BATCHES) -> None:
    """The table of `rows`; a row with a 'skipped' entry (not timed, or failed) says why."""
    small, large = sorted(batches)
    pair = f'b{small}/b{large}'
    header = (f'{"model":<14} {"setting":<7} {"prefill ms " + pair:>18} {f"tok/s b{small}":>9} '
              f'{f"tok/s b{large}":>9} {f"cache MiB b{large}":>13} {"MiB/tok " + pair:>15} {"vs BTX " + pair:>14} '
              f'{"bytes vs BTX":>13}')
    print(header)
    print('-' * len(header))
    for r in rows:
        if 'skipped' in r:
            print(f'{r["arch"]:<14} {r["setting"]:<7} skipped: {r["skipped"]}')
            continue
        one, many = r[f'batch_{small}'], r[f'batch_{large}']
        prefill = '{:.0f}/{:.0f}'.format(one['prefill_s'] * 1e3, many['prefill_s'] * 1e3)
        read = '{:.1f}/{:.1f}'.format(one['bytes_per_token'] / 2**20, many['bytes_per_token'] / 2**20)
        speed = f'{_ratio(one["vs_btx"])}/{_ratio(many["vs_btx"])}'
        ideal = f'{_ratio(one["bytes_vs_btx"])}/{_ratio(many["bytes_vs_btx"])}'
        print(f'{r["arch"]:<14} {r["setting"]:<7} {prefill:>18} {one["decode_tokens_per_s"]:>9.1f} '
              f'{many["decode_tokens_per_s"]:>9.1f} {many["cache_bytes"] / 2**20:>13.1f} {read:>15} '
              f'{speed:>14} {ideal:>13}')
    print(description)
