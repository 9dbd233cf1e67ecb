"""bam_jax's offline downstream tasks: lm-evaluation-harness task configs over
local data files, built from the VALIDATION split of the built-in corpora as
they are prepared (bam_jax.data.prepare.split_texts).

    bam_math     generate_until. A held-out worked problem, 'Problem: ...\\n
                 Solution:', with 2 solved problems before it (num_fewshot 2);
                 the model writes the solution and the score is exact match on
                 the value after 'Answer: '. Up to MATH_ITEMS (48) problems;
                 the few-shot examples come from a disjoint pool of up to
                 MATH_FEWSHOT (16) other validation problems. Chance is ~0.
    bam_code     multiple_choice: which of 4 texts continues a passage? The
    bam_law      context is about CONTEXT_CHARS (256) characters of a held-out
    bam_general  document, from a word start to a word end; the true
                 continuation is what follows: the blank space, then about
                 CONTINUATION_CHARS (64) characters up to a word end (so
                 lengths vary). The 3 distractors are cut the same way (so
                 their lengths follow the same distribution) at pseudo-random
                 offsets of 3 other validation documents of the same domain,
                 and differ from the true continuation and from each other.
                 Scored by acc and acc_norm (num_fewshot 0); the true choice
                 sits at a pseudo-random position, so chance is 25%. Up to
                 MC_ITEMS (64) items, from passages that do not overlap,
                 taken round robin over the domain's documents.

The group bam_domains runs all four; it reports no mean of its own, since the
metrics differ (see PRIMARY and CHANCE for tables).

Every text (context, choice, problem) is cut from the domain's validation
documents and none occurs in a training document (the split is by whole
documents, and e.g. licence boilerplate is shared between documents, so
passages found in the training split are dropped). A domain with fewer than 4
validation documents long enough for a passage raises a BamJaxError.

Deterministic: every random draw comes from a numpy Generator seeded by sha256
of the domain and the item (or the document's content), so the files are byte-identical on
every machine. `write_tasks` writes them into a directory named by a hash of
their content, to pass as `lm_eval.tasks.TaskManager(include_path=...)`.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import yaml

from bam_jax.data import corpora
from bam_jax.data.prepare import split_texts
from bam_jax.errors import BamJaxError

TASKS = ('bam_math', 'bam_code', 'bam_law', 'bam_general')
GROUP = 'bam_domains'
DOMAIN = {'bam_math': 'math', 'bam_code': 'code', 'bam_law': 'law', 'bam_general': 'general'}
PRIMARY = {'bam_math': 'exact_match', 'bam_code': 'acc', 'bam_law': 'acc', 'bam_general': 'acc'}
CHANCE = {'bam_math': 0.0, 'bam_code': 0.25, 'bam_law': 0.25, 'bam_general': 0.25}
MATH_FILTER = 'answer'
# The key of the primary metric in lm-eval's results[task]: '<metric>,<filter>'.
RESULT_KEY = {task: f"{metric},{MATH_FILTER if task == 'bam_math' else 'none'}"
              for task, metric in PRIMARY.items()}

MC_ITEMS = 64
MATH_ITEMS = 48
MATH_FEWSHOT = 16
MATH_NUM_FEWSHOT = 2
MATH_MAX_GEN_TOKS = 256
CHOICES = 4
CONTEXT_CHARS = 256
CONTINUATION_CHARS = 64
# How far a cut may move to reach a word boundary; further (a long token, a
# run of blank space) and the passage or segment is dropped.
MAX_OVERRUN = 32
# Passages of a document start at multiples of this, so they never overlap.
SLOT_CHARS = CONTEXT_CHARS + CONTINUATION_CHARS + 3 * MAX_OVERRUN
# Offsets tried per other document when drawing a distractor.
DISTRACTOR_TRIES = 8
# Changes whenever the generated files would change for the same corpora.
FORMAT_VERSION = 2

_WORD_START = re.compile(r'(?<!\S)\S')
_WORD_END = re.compile(r'\S(?!\S)')
_ANSWER = 'Answer: '


def _rng(*key):
    """A Generator seeded by sha256 of `key` (never Python's salted hash())."""
    digest = hashlib.sha256('/'.join(str(k) for k in key).encode('utf-8')).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], 'big'))


class _Training:
    """`text in training`: whether a text occurs in one of a domain's training
    documents (an exact search; bytes keep the search one byte per character)."""

    def __init__(self, texts):
        self._joined = b'\0'.join(text.encode('utf-8') for text in texts)

    def __contains__(self, text):
        return text.encode('utf-8') in self._joined


def _cut(text, start, length):
    """(begin, end) of a segment of `text`: it begins at the first word end at
    or after `start` (so with the blank space that follows a word) and ends at
    the first word end at least `length` characters later. None if the text
    runs out or a boundary is more than MAX_OVERRUN characters away."""
    first = _WORD_END.search(text, max(start - 1, 0))
    if first is None or first.end() - start > MAX_OVERRUN or first.end() >= len(text):
        return None
    begin = first.end()
    last = _WORD_END.search(text, begin + length - 1)
    if last is None or last.end() - begin > length + MAX_OVERRUN:
        return None
    return begin, last.end()


def _passage(text, start):
    """(context, continuation) from `start`, or None: the context starts at a
    word and ends at a word end; the continuation follows it directly."""
    word = _WORD_START.search(text, start)
    if word is None or word.start() - start > MAX_OVERRUN:
        return None
    c0 = word.start()
    end = _WORD_END.search(text, c0 + CONTEXT_CHARS - 1)
    if end is None or end.end() - c0 > CONTEXT_CHARS + MAX_OVERRUN:
        return None
    continuation = _cut(text, end.end(), CONTINUATION_CHARS)  # begins at end.end()
    if continuation is None:
        return None
    return text[c0:end.end()], text[slice(*continuation)]


def _candidates(domain, documents):
    """(document index, start) of non-overlapping passages: round robin over
    the documents (texts), each document's slots in an order drawn from its
    content."""
    orders = []
    for text in documents:
        slots = max(1, len(text) // SLOT_CHARS)
        orders.append(_rng(domain, 'slots', corpora.content_hash(text)).permutation(slots))
    for turn in range(max(len(o) for o in orders)):
        for index, order in enumerate(orders):
            if turn < len(order):
                yield index, int(order[turn]) * SLOT_CHARS


def _distractors(rng, documents, own, true, training):
    """CHOICES - 1 segments cut like the true continuation `true` (so their
    lengths follow the same distribution) from distinct other documents, each
    different from `true` and from each other (blank space and case ignored)
    and found in no training document; None if the documents run out."""
    others = [i for i in range(len(documents)) if i != own]
    seen, found = {corpora.normalise(true)}, []
    for index in rng.permutation(others):
        text = documents[index]
        for _ in range(DISTRACTOR_TRIES if len(text) > CONTINUATION_CHARS else 0):
            cut = _cut(text, int(rng.integers(0, len(text) - CONTINUATION_CHARS)), CONTINUATION_CHARS)
            if cut is None:
                continue
            segment = text[slice(*cut)]
            key = corpora.normalise(segment)
            if key and key not in seen and segment not in training:
                seen.add(key)
                found.append(segment)
                break
        if len(found) == CHOICES - 1:
            return found
    return None


def multiple_choice_items(domain, validation, training, limit=MC_ITEMS):
    """Up to `limit` items {'context', 'choices', 'gold'} from a domain's
    validation texts; `training` answers `text in training`."""
    documents = [t for t in validation if len(t) >= CONTEXT_CHARS + CONTINUATION_CHARS]
    if len(documents) < CHOICES:
        raise BamJaxError(f"domain '{domain}': {len(documents)} validation documents of at least "
                          f'{CONTEXT_CHARS + CONTINUATION_CHARS} characters, need {CHOICES} for '
                          'multiple-choice items (raise DataConfig.validation_fraction)')
    items = []
    for index, start in _candidates(domain, documents):
        if len(items) == limit:
            break
        passage = _passage(documents[index], start)
        if passage is None or any(text in training for text in passage):
            continue
        context, true = passage
        rng = _rng(domain, len(items))
        distractors = _distractors(rng, documents, index, true, training)
        if distractors is None:
            continue
        gold = int(rng.integers(CHOICES))
        items.append({'context': context, 'choices': distractors[:gold] + [true] + distractors[gold:],
                      'gold': gold})
    if not items:
        raise BamJaxError(f"domain '{domain}': no validation passage gives a multiple-choice item")
    return items


def _problem(text):
    """{'question', 'solution', 'answer'} of one problem's text."""
    head, solution = text.split('\nSolution:\n', 1)
    answer = solution.rsplit('\n', 1)[-1]
    if not head.startswith('Problem: ') or not answer.startswith(_ANSWER):
        raise ValueError(f'not a worked problem: {text[:80]!r}')
    return {'question': head.removeprefix('Problem: '), 'solution': solution,
            'answer': answer.removeprefix(_ANSWER)}


def math_items(validation, training, limit=MATH_ITEMS, fewshot=MATH_FEWSHOT):
    """(test, fewshot) problem lists from the math domain's validation
    texts: distinct problems found in no training document (the generator
    repeats small problems), in a pseudo-random order; the first `fewshot`
    form the few-shot pool and the next `limit` the test items."""
    distinct = list(dict.fromkeys(problem for text in validation for problem in text.split('\n\n')))
    kept = []
    for i in _rng('math', 'order').permutation(len(distinct)):
        if len(kept) == fewshot + limit:
            break
        if distinct[i] not in training:
            kept.append(distinct[i])
    if len(kept) < 2:
        raise BamJaxError(f"domain 'math': {len(kept)} usable validation problems, need at least 2 "
                          '(raise DataConfig.math_documents)')
    pool = min(fewshot, len(kept) // 2)  # a small split still gets some of each
    return [_problem(t) for t in kept[pool:]], [_problem(t) for t in kept[:pool]]


def build_items(data_config):
    """{task: items} (and 'bam_math_fewshot') from the built-in corpora
    prepared with the settings of `data_config` (a bam_jax.data.DataConfig)."""
    out = {}
    for task in TASKS:
        domain = DOMAIN[task]
        validation = split_texts(data_config, domain, 'validation')
        training = _Training(split_texts(data_config, domain, 'train'))
        if task == 'bam_math':
            out[task], out['bam_math_fewshot'] = math_items(validation, training)
        else:
            out[task] = multiple_choice_items(domain, validation, training)
    return out


def _mc_config(task, data_file):
    return {
        'task': task,
        'dataset_path': 'json',
        'dataset_kwargs': {'data_files': {'test': data_file}},
        'output_type': 'multiple_choice',
        'test_split': 'test',
        'doc_to_text': 'context',  # names of the items' fields
        'doc_to_choice': 'choices',
        'doc_to_target': 'gold',
        'target_delimiter': '',  # the choices carry their own leading blank space
        'num_fewshot': 0,
        'metric_list': [{'metric': m, 'aggregation': 'mean', 'higher_is_better': True}
                        for m in ('acc', 'acc_norm')],
        'metadata': {'version': FORMAT_VERSION},
    }


def _math_config(data_file, fewshot_file):
    return {
        'task': 'bam_math',
        'dataset_path': 'json',
        'dataset_kwargs': {'data_files': {'test': data_file, 'fewshot': fewshot_file}},
        'output_type': 'generate_until',
        'test_split': 'test',
        'fewshot_split': 'fewshot',
        # Examples read exactly like the training documents: problems joined
        # by blank lines, the solution on the line after 'Solution:'.
        'doc_to_text': 'Problem: {{question}}\nSolution:',
        'doc_to_target': 'solution',
        'target_delimiter': '\n',
        'fewshot_delimiter': '\n\n',
        'num_fewshot': MATH_NUM_FEWSHOT,
        'generation_kwargs': {'until': ['\n\n', 'Problem:'], 'do_sample': False,
                              'max_gen_toks': MATH_MAX_GEN_TOKS},
        'filter_list': [{'name': MATH_FILTER, 'filter': [
            {'function': 'regex', 'regex_pattern': _ANSWER + r'([^\n]*)'},
            {'function': 'take_first'}]}],
        # The reference is the whole solution: compare what follows its last
        # 'Answer: ' with the value the filter took from the generation.
        'metric_list': [{'metric': 'exact_match', 'aggregation': 'mean', 'higher_is_better': True,
                         'regexes_to_ignore': ['(?s).*' + _ANSWER]}],
        'metadata': {'version': FORMAT_VERSION},
    }


def _group_config():
    # No aggregate_metric_list: a mean of bam_math's exact match and the
    # others' accuracy means nothing, and an acc mean over part of the group
    # makes lm-eval warn about bam_math on every run.
    return {'group': GROUP, 'task': list(TASKS), 'metadata': {'version': FORMAT_VERSION}}


def _jsonl(items):
    return ''.join(json.dumps(item, ensure_ascii=False, sort_keys=True) + '\n' for item in items).encode('utf-8')


class _Dumper(yaml.SafeDumper):
    """YAML with escapes ("\\n") in strings that hold line breaks, so the
    configs read like the strings they hold."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    'tag:yaml.org,2002:str', text, style='"' if '\n' in text else None))


def _files(items, directory):
    """{file name: bytes}: the data files and the YAML configs pointing at
    them under `directory`."""
    files = {f'{name}.jsonl': _jsonl(rows) for name, rows in items.items()}

    def path(name):
        return str(pathlib.Path(directory) / f'{name}.jsonl')

    configs = {task: _mc_config(task, path(task)) for task in TASKS if task != 'bam_math'}
    configs['bam_math'] = _math_config(path('bam_math'), path('bam_math_fewshot'))
    configs[GROUP] = _group_config()
    for name, config in configs.items():
        files[f'{name}.yaml'] = yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True).encode('utf-8')
    return files


def cache_root():
    """$BAM_JAX_CACHE, else $XDG_CACHE_HOME/bam_jax, else ~/.cache/bam_jax."""
    if os.environ.get('BAM_JAX_CACHE'):
        return pathlib.Path(os.environ['BAM_JAX_CACHE']).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
    return pathlib.Path(base) / 'bam_jax'


def write_tasks(data_config, directory=None):
    """Write the tasks and return their directory, `<directory>/<hash>/`.

    `directory` defaults to `cache_root() / 'lm_eval_tasks'`; `<hash>` is a
    short sha256 of the generated content, so the same corpora give the same
    directory, and one already there is reused. The directory is written
    under a temporary name and renamed, so it is complete or absent.
    """
    parent = (pathlib.Path(directory).expanduser() if directory is not None
              else cache_root() / 'lm_eval_tasks').absolute()
    items = build_items(data_config)
    # The content hash sees the configs with a placeholder for their paths.
    digest = hashlib.sha256(f'bam_jax offline tasks {FORMAT_VERSION}'.encode())
    for name, data in sorted(_files(items, '/@').items()):
        digest.update(f'{name}\0{len(data)}\0'.encode() + data)
    final = parent / digest.hexdigest()[:16]
    if final.is_dir():
        return final
    try:
        parent.mkdir(parents=True, exist_ok=True)
        temporary = pathlib.Path(tempfile.mkdtemp(prefix=f'.{final.name}.', dir=parent))
    except OSError as e:
        raise BamJaxError(f'cannot write lm-eval tasks under {parent}: {e}') from e
    try:
        for name, data in _files(items, final).items():
            (temporary / name).write_bytes(data)
        os.chmod(temporary, 0o755)
        os.rename(temporary, final)
    except OSError as e:
        shutil.rmtree(temporary, ignore_errors=True)
        if final.is_dir():  # another process wrote the same content first
            return final
        raise BamJaxError(f'cannot write lm-eval tasks to {final}: {e}') from e
    return final
