"""Run directories on storage other than a local disk.

A local Google Cloud Storage server (tests/gcs_emulator.py: gcp-storage-emulator, in memory, on
loopback) stands in for a bucket. Every layer that touches a run directory speaks to it as it would to GCS: epath
through fsspec's gcsfs (EPATH_USE_TF=false; on a pod epath uses tf.io.gfile instead),
Orbax's arrays through TensorStore's gcs driver (TENSORSTORE_GCS_HTTP_URL), TensorBoard through
google-cloud-storage (STORAGE_EMULATOR_HOST).
"""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from helpers import REPO, cli_env

BUCKET = 'runs'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def emulator():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'gcs_emulator.py'), str(port), BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}'
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, 'the GCS emulator did not start'
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _objects(url: str) -> dict[str, int]:
    """{object name: size} of everything in the bucket."""
    with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o?maxResults=100000') as response:
        return {item['name']: int(item['size']) for item in json.load(response).get('items', [])}


def _download(url: str, name: str) -> bytes:
    with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe="")}?alt=media') as r:
        return r.read()


def test_every_stage_reads_and_writes_a_gcs_bucket(emulator, tmp_path):
    env = dict(cli_env(), EPATH_USE_TF='false', STORAGE_EMULATOR_HOST=emulator, TENSORSTORE_GCS_HTTP_URL=emulator,
               GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator', NO_GCE_CHECK='True')
    report = tmp_path / 'report.json'
    proc = subprocess.run([sys.executable, str(REPO / 'tests' / 'remote_storage_run.py'), BUCKET, str(report)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f'resuming gs://{BUCKET}/seed from step 2' in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ['report.json']  # nothing fell back to a local 'gs:' path

    objects = _objects(emulator)
    for name in ['seed/config.gin', 'seed/metrics.json', 'seed/budget.json', 'seed/checkpoints/4/params/manifest.ocdbt',
                 'seed/checkpoints/4/train_state/metadata', 'moe/model.gin', 'moe/upcycle.json',
                 'moe/checkpoints/0/params/manifest.ocdbt', 'moe/eval.json', 'moe/routing_map.png',
                 'hf/config.json', 'hf/model.safetensors', 'imported/import.json',
                 'imported/checkpoints/0/params/manifest.ocdbt']:
        assert name in objects, f'{name} not written; the bucket holds {sorted(objects)}'
    assert any(name.startswith('seed/tb/events') and size for name, size in objects.items())
    assert not any('-tmp' in name or '-old' in name for name in objects)  # staging dirs were published, not left

    metrics = json.loads(_download(emulator, 'seed/metrics.json'))
    assert [r['step'] for r in metrics['train']] == [2, 4]  # logged every 2 steps; step 2's record is the first run's
    assert [r['step'] for r in metrics['eval']] == [4]
    evaluated = json.loads(_download(emulator, 'moe/eval.json'))
    assert evaluated['perplexity']

    completion = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"prompt"')))
    assert completion['prompt'] == 'def ' and 0 < len(completion['completion_ids']) <= 4

    result = json.loads(report.read_text())
    for name in ['manifest.json', 'train/part-00000.bin', 'validation/part-00000.ends.npy']:
        assert f'prepared/{result["prepared_name"]}/{name}' in objects
    assert result['prepared_texts'] == result['input_texts']  # every document, from and back to the bucket
    assert result['imported_params'] == result['seed_params']
    assert result['max_difference'] == 0.0  # float32 out and back


def test_two_workers_prepare_a_domain_into_a_bucket(emulator, tmp_path):
    """launch/run.sh --local_processes=2 prepare-data with DataConfig.data_dir in the bucket: each
    worker uploads its parts beside the others', the first publishes the joined domain."""
    import io

    import numpy as np

    texts = [f'note {i}: ' + 'words ' * (i % 17) for i in range(200)]
    raw = tmp_path / 'raw'
    raw.mkdir()
    for i in range(4):
        (raw / f'{i}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts[i::4]))
    gin_file = tmp_path / 'notes.gin'
    gin_file.write_text(f"DataConfig.user_domains = [@notes/text_domain()]\nnotes/text_domain.name = 'notes'\n"
                        f"notes/text_domain.paths = ['{raw}/*']\nDataConfig.data_dir = 'gs://{BUCKET}/pod'\n")
    env = dict(cli_env(), EPATH_USE_TF='false', STORAGE_EMULATOR_HOST=emulator, TENSORSTORE_GCS_HTTP_URL=emulator,
               GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator', NO_GCE_CHECK='True')
    done = subprocess.run(['bash', 'launch/run.sh', '--local_processes=2', 'prepare-data', f'--gin_file={gin_file}',
                           '--domains=notes'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    objects = [name for name in _objects(emulator) if name.startswith('pod/')]
    assert not any('.prepare-' in name for name in objects), objects  # the staging was published, not left
    (manifest_name,) = [name for name in objects if name.endswith('/manifest.json')]
    manifest = json.loads(_download(emulator, manifest_name))
    assert manifest['workers'] == 2
    prepared = []
    for split in ('train', 'validation'):
        for part in manifest['splits'][split]['parts']:
            prefix = f'{manifest_name.rsplit("/", 1)[0]}/{split}/{part["name"]}'
            ids = np.frombuffer(_download(emulator, prefix + '.bin'), manifest['dtype'])
            ends = np.load(io.BytesIO(_download(emulator, prefix + '.ends.npy')))
            prepared += [bytes(int(t) - 3 for t in doc[:-1]).decode() for doc in np.split(ids, ends[:-1])]
    assert sorted(prepared) == sorted(texts)
    assert {part['name'][:7] for part in manifest['splits']['train']['parts']} >= {'w00000-', 'w00001-'}
