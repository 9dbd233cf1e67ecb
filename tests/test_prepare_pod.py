"""`launch/run.sh --local_processes=2 prepare-data`: two processes (a pod's workers) prepare one
domain together, each reading its share of the input files, against the same domain prepared by
one process: the same documents on each side of the split, duplicates across the workers' files
removed once, and a bad input in one worker's share stopping both with nothing published."""

import json
import subprocess

from test_prepare import corpus_texts, decoded

from bam_jax.data import DataConfig, prepare, text_domain
from bam_jax.data.prepare import MANIFEST, open_split, prepare_domain

from helpers import REPO, cli_env

WORKERS = 2


def write_files(raw, texts, files=6):
    """The texts as `files` JSONL files, in order (file 0 holds the first texts)."""
    raw.mkdir()
    for i in range(files):
        (raw / f'{i}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts[i::files]))


def gin_file(tmp_path, raw, data_dir):
    path = tmp_path / f'{data_dir.name}.gin'
    path.write_text(f"DataConfig.user_domains = [@notes/text_domain()]\nnotes/text_domain.name = 'notes'\n"
                    f"notes/text_domain.paths = ['{raw}/*.jsonl']\nDataConfig.data_dir = '{data_dir}'\n"
                    'DataConfig.validation_fraction = 0.02\n')
    return path


def prepare_with_workers(gin_path):
    return subprocess.run(['bash', 'launch/run.sh', f'--local_processes={WORKERS}', 'prepare-data',
                           f'--gin_file={gin_path}', '--domains=notes'], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def test_two_workers_prepare_what_one_does(tmp_path):
    texts = corpus_texts(11, 300)
    # Copies in both workers' shares (the first and last files), and within one.
    texts += [texts[1].upper(), '  ' + texts[298], texts[2] + ' ']
    write_files(tmp_path / 'raw', texts)
    config = DataConfig(user_domains=(text_domain('notes', [f'{tmp_path}/raw/*.jsonl']),),
                        data_dir=str(tmp_path / 'one'), validation_fraction=0.02)
    one = prepare_domain(config, 'notes', progress=False)
    done = prepare_with_workers(gin_file(tmp_path, tmp_path / 'raw', tmp_path / 'two'))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'with {WORKERS} workers' in done.stdout
    name = prepare.prepared_name(config, 'notes')
    two = json.loads((tmp_path / 'two' / name / MANIFEST).read_text())
    assert two['workers'] == WORKERS and two['inputs'] == one.inputs
    assert (two['documents_read'], two['duplicates']) == (one.documents_read, one.duplicates) == (303, 3)
    parts = [p['name'] for p in two['splits']['train']['parts']]
    assert any(p.startswith('w00000-') for p in parts) and any(p.startswith('w00001-') for p in parts)
    for split in ('train', 'validation'):
        ours = sorted(decoded(open_split(str(tmp_path / 'two'), name, split)))
        assert ours == sorted(decoded(open_split(str(tmp_path / 'one'), name, split)))
        assert two['splits'][split]['documents'] == len(ours)
    # Only 2% of 300: the split was topped up to its minimum from both workers' candidates.
    assert two['splits']['validation']['documents'] >= prepare.MIN_VALIDATION_DOCUMENTS
    assert [p.name for p in (tmp_path / 'two').iterdir()] == [name]  # no staging left


def test_a_bad_line_in_one_workers_share_stops_both_and_publishes_nothing(tmp_path):
    write_files(tmp_path / 'raw', corpus_texts(12, 60))
    with open(tmp_path / 'raw' / '5.jsonl', 'a') as f:  # the last file: the second worker's share
        f.write('{"text": 7}\n')
    done = prepare_with_workers(gin_file(tmp_path, tmp_path / 'raw', tmp_path / 'two'))
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if 'error:' in line]
    assert any("5.jsonl:11: 'text' is not a string" in line for line in errors), done.stderr[-3000:]
    assert any('worker 1 failed' in line for line in errors), done.stderr[-3000:]
    assert 'Traceback' not in done.stderr
    assert not (tmp_path / 'two').exists() or not any((tmp_path / 'two').iterdir())
