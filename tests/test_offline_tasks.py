"""The offline lm-eval tasks: they load through the real harness, hold only
validation text, and are deterministic."""

import json
import re

import pytest

from bam_jax.data import DataConfig, corpora, math_problems
from bam_jax.errors import BamJaxError
from bam_jax.evaluate import offline_tasks

from references import builtin_split

# Small corpora: 500 math documents, at most 4 MiB of each other domain (the
# independent "not in training" check below searches every training byte).
CONFIG = DataConfig(math_documents=500)
MC_TASKS = [t for t in offline_tasks.TASKS if t != 'bam_math']


def _corpus(task):
    """The reference split of the task's domain (the tasks read the prepared one)."""
    return builtin_split(offline_tasks.DOMAIN[task], validation_fraction=CONFIG.validation_fraction,
                         math_documents=CONFIG.math_documents, max_file_bytes=CONFIG.max_file_bytes)


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines()]


@pytest.fixture(scope='module')
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp('tasks')
    first = offline_tasks.write_tasks(CONFIG, root)
    second = offline_tasks.write_tasks(CONFIG, root)
    items = {p.stem: _read(p) for p in first.glob('*.jsonl')}
    return {'root': root, 'dirs': (first, second), 'items': items}


@pytest.fixture(scope='module')
def hf_cache(tmp_path_factory):
    """lm-eval's datasets.load_dataset caches the JSONL files in tmp."""
    import datasets  # lm_eval's dependency
    cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp('hf_datasets')
    yield
    datasets.config.HF_DATASETS_CACHE = cache


@pytest.fixture(scope='module')
def harness(written, hf_cache):
    """The tasks as lm-eval builds them."""
    import lm_eval.tasks
    manager = lm_eval.tasks.TaskManager(include_path=str(written['dirs'][0]), include_defaults=False)
    loaded = manager.load([offline_tasks.GROUP])
    return {'manager': manager, 'tasks': loaded['tasks'], 'group_map': loaded['group_map']}


def test_deterministic_content_addressed_directory(written):
    first, second = written['dirs']
    assert first == second and first.parent == written['root'].absolute()
    assert [p.name for p in written['root'].iterdir()] == [first.name]  # no temporary left
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted([f'{t}.yaml' for t in offline_tasks.TASKS] + [f'{t}.jsonl' for t in offline_tasks.TASKS]
                           + [f'{offline_tasks.GROUP}.yaml', 'bam_math_fewshot.jsonl'])
    # A fresh build writes the same bytes (the directory name is their hash).
    files = offline_tasks._files(offline_tasks.build_items(CONFIG), first)
    assert {name: (first / name).read_bytes() for name in names} == files


def test_harness_lists_and_builds_the_tasks(written, harness):
    manager, items = harness['manager'], written['items']
    assert set(offline_tasks.TASKS) <= set(manager.all_tasks)
    assert offline_tasks.GROUP in manager.all_groups
    assert harness['group_map'] == {offline_tasks.GROUP: list(offline_tasks.TASKS)}
    assert sorted(harness['tasks']) == sorted(offline_tasks.TASKS)
    assert len(items['bam_math']) == offline_tasks.MATH_ITEMS
    assert len(items['bam_math_fewshot']) == offline_tasks.MATH_FEWSHOT
    for task_name in offline_tasks.TASKS:
        task = harness['tasks'][task_name]
        assert 0 < len(items[task_name]) <= offline_tasks.MC_ITEMS
        assert len(task.test_docs()) == len(items[task_name])


def test_multiple_choice_requests_match_the_items(written, harness):
    for task_name in MC_TASKS:
        task, items = harness['tasks'][task_name], written['items'][task_name]
        for doc, item in zip(task.test_docs(), items):
            context = task.fewshot_context(doc, num_fewshot=0)
            assert context == item['context']
            assert task.doc_to_target(doc) == item['gold']
            requests = task.construct_requests(doc, context)
            assert [r.arguments for r in requests] == [(item['context'], c) for c in item['choices']]


def test_multiple_choice_items_look_like_chance(written):
    for task_name in MC_TASKS:
        items = written['items'][task_name]
        golds = [item['gold'] for item in items]
        assert len(set(golds)) == offline_tasks.CHOICES, (task_name, golds)
        for item in items:
            choices = item['choices']
            assert len(choices) == offline_tasks.CHOICES
            assert len({corpora.normalise(c) for c in choices}) == len(choices)
            # Every choice follows the context's last word with blank space
            # and ends at a word: no boundary tells the true one apart.
            assert all(c[0].isspace() and not c[-1].isspace() for c in choices)
            assert not item['context'][0].isspace() and not item['context'][-1].isspace()
        true = [len(item['choices'][item['gold']]) for item in items]
        other = [len(c) for item in items for i, c in enumerate(item['choices']) if i != item['gold']]
        assert abs(sum(true) / len(true) - sum(other) / len(other)) < 8


def _answers_of_validation_math():
    """{problem text: answer}, regenerated from math_problems for the
    validation documents (their ids are 'math/<document index>')."""
    out = {}
    for doc in _corpus('bam_math').validation:
        first = int(doc.id.split('/')[1]) * math_problems.PROBLEMS_PER_DOCUMENT
        for index in range(first, first + math_problems.PROBLEMS_PER_DOCUMENT):
            text = math_problems.problem(index)
            out[text] = re.search(r'\nAnswer: (.*)$', text).group(1)
    return out


def test_math_prompts_and_scoring(written, harness):
    task, items = harness['tasks']['bam_math'], written['items']
    answers = _answers_of_validation_math()
    fewshot_texts = {f"Problem: {p['question']}\nSolution:\n{p['solution']}" for p in items['bam_math_fewshot']}
    for doc, item in zip(task.test_docs(), items['bam_math']):
        text = f"Problem: {item['question']}\nSolution:\n{item['solution']}"
        assert answers[text] == item['answer']
        assert task.doc_to_target(doc) == item['solution']
        context = task.fewshot_context(doc, num_fewshot=offline_tasks.MATH_NUM_FEWSHOT)
        # Two solved examples from the few-shot pool, then the problem: it
        # reads like a training document up to 'Solution:'.
        *shots, last = context.split('\n\n')
        assert last == f"Problem: {item['question']}\nSolution:"
        assert len(shots) == 2 and set(shots) <= fewshot_texts
    doc = task.test_docs()[0]
    answer = items['bam_math'][0]['answer']
    generations = ['\n' + items['bam_math'][0]['solution'], f'\nAnswer: {answer} \n', '\nAnswer: 1234567', 'no answer']
    instances = [task.construct_requests(doc, 'context', metadata=('bam_math', 0, 1)) for _ in generations]
    for instance, generation in zip(instances, generations):
        instance.resps = [generation]
    for ensemble in task._filters:
        ensemble.apply(instances)
    scores = [task.process_results(doc, [i.filtered_resps[offline_tasks.MATH_FILTER]])['exact_match']
              for i in instances]
    assert scores == [1.0, 1.0, 0.0, 0.0]
    assert offline_tasks.RESULT_KEY['bam_math'] == f'exact_match,{offline_tasks.MATH_FILTER}'


def test_an_oracle_scores_one_through_simple_evaluate(written, harness):
    """The whole lm-eval pipeline (requests, filters, metrics, the group) on a
    model that knows the answers: every primary metric is 1."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    items = written['items']
    true = {(item['context'], item['choices'][item['gold']]) for t in MC_TASKS for item in items[t]}
    solutions = {f"Problem: {p['question']}\nSolution:": p['solution'] for p in items['bam_math']}
    seen = []

    class Oracle(LM):
        def loglikelihood(self, requests):
            return [(0.0 if r.args in true else -1.0, False) for r in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            seen.extend(r.args[1] for r in requests)
            return ['\n' + solutions[r.args[0].rsplit('\n\n', 1)[-1]] for r in requests]

    results = simple_evaluate(Oracle(), tasks=[offline_tasks.GROUP], task_manager=harness['manager'],
                              bootstrap_iters=0, log_samples=False)['results']
    for task in offline_tasks.TASKS:
        assert results[task][offline_tasks.RESULT_KEY[task]] == 1.0, results[task]
    assert seen[0]['until'] == ['\n\n', 'Problem:'] and seen[0]['do_sample'] is False


def test_every_text_is_validation_only(written):
    items = written['items']
    for task_name in offline_tasks.TASKS:
        corpus = _corpus(task_name)
        if task_name == 'bam_math':
            texts = [f"Problem: {p['question']}\nSolution:\n{p['solution']}"
                     for p in items['bam_math'] + items['bam_math_fewshot']]
        else:
            texts = [t for item in items[task_name] for t in [item['context'], *item['choices']]]
        validation = '\0'.join(d.text for d in corpus.validation)
        training = '\0'.join(d.text for d in corpus.train)
        for text in texts:
            assert text in validation, (task_name, text)
            assert text not in training, (task_name, text)
    test = {p['question'] + p['solution'] for p in items['bam_math']}
    fewshot = {p['question'] + p['solution'] for p in items['bam_math_fewshot']}
    assert len(test) == len(items['bam_math']) and not test & fewshot


def test_too_few_validation_documents_is_a_user_error():
    documents = [f'word {i} ' * 100 for i in range(3)]
    with pytest.raises(BamJaxError, match="domain 'law': 3 validation documents") as error:
        offline_tasks.multiple_choice_items('law', documents, offline_tasks._Training(()))
    assert '\n' not in str(error.value)
