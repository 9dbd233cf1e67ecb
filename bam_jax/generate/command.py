"""`bam-jax generate`: completions of prompts by a run's latest checkpoint, with its own vocabulary."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import jax

from bam_jax import storage
from bam_jax.errors import BamJaxError
from bam_jax.generate.lm import Completion, LanguageModel
from bam_jax.generate.sampling import GREEDY, Sampling
from bam_jax.gin_config import load_run_config


def read_prompts(path: str | storage.Path) -> list[str]:
    """A JSONL file (local or a URI): one prompt per line, as {"prompt": "..."} or a JSON string.
    Blank lines skip."""
    path = storage.Path(path)  # not made absolute: messages name the file as given
    if not path.is_file():
        raise BamJaxError(f'prompts file {path} does not exist')
    prompts = []
    for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise BamJaxError(f'{path}:{number}: not JSON ({e.msg})') from None
        prompt = item.get('prompt') if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise BamJaxError(f'{path}:{number}: expected {{"prompt": "..."}} or a JSON string')
        prompts.append(prompt)
    if not prompts:
        raise BamJaxError(f'prompts file {path} has no prompts')
    return prompts


def generate_command(workdir: str | storage.Path, bindings: list[str], prompts: Sequence[str], *,
                     max_new_tokens: int = 64, sampling: Sampling = GREEDY, seed: int = 0,
                     stop: Sequence[str] = (), batch_size: int = 16, as_json: bool = False) -> list[Completion]:
    """Prints each prompt's completion (or, with as_json, one JSON object per line on stdout);
    progress and notes go to stderr."""
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise BamJaxError(f'prompt {i} is empty')
    workdir = storage.path(workdir)
    configs = load_run_config(workdir, bindings)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    model = LanguageModel.restore(workdir, configs.model, configs.data, configs.mesh, configs.max_length,
                                  progress=log, batch_size=batch_size)
    log(f'{workdir.name}: step {model.step_dir.name}, {len(prompts)} prompt(s), up to {max_new_tokens} new tokens')
    completions = model.generate([model.encode(p) for p in prompts], max_new_tokens, sampling=sampling,
                                 seed=seed, stop=stop, progress=log)
    for i, (prompt, done) in enumerate(zip(prompts, completions)):
        if jax.process_index() != 0:  # a multi-process job: process 0 prints for all
            break
        if as_json:
            # input_ids: what the model read, the start token every document began with in training
            # first, so another implementation (transformers) given them computes the same tokens.
            print(json.dumps({'prompt': prompt, 'completion': done.text, 'prompt_ids': done.prompt_ids,
                              'completion_ids': done.completion_ids, 'stop_reason': done.stop_reason,
                              'start_id': model.start_id, 'input_ids': [model.start_id, *done.prompt_ids]}),
                  flush=True)
        else:
            print(f'--- {i + 1}/{len(prompts)}: {len(done.prompt_ids)} + {len(done.completion_ids)} tokens, '
                  f'stopped by {done.stop_reason}')
            print(prompt + done.text, flush=True)
    return completions
