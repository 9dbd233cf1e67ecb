"""Tests run on an emulated 8-device CPU mesh: the flag must be set before jax is imported.
Every test starts and ends with gin's global bindings empty."""

import json
import os

import gin  # neither gin nor pytest imports jax
import pytest

# The tests' models are tiny, so compiling, not running, is most of their time: XLA's CPU
# backend skips its slow optimisation passes and emits fusions with its older emitters (slower
# code, compiled much sooner: a third less CPU time on test_generate and test_upcycle).
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + f' --xla_force_host_platform_device_count=8 {FAST_COMPILE}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Many tests (and the CLI subprocesses they start, which inherit this environment) compile the
# same programs: JAX's persistent compilation cache compiles each once per suite run.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), '.pytest_cache', 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
# Prepared domains (bam_jax.data.prepare) go there too, not to the user's cache: each built-in
# corpus is prepared once per suite run, by whichever process needs it first.
os.environ.setdefault('BAM_JAX_DATA_DIR', os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), '.pytest_cache', 'prepared_data'))


# `make test` gives each xdist worker whole files (--dist loadfile: a module's fixtures are built
# once, and no worker waits on another's), in this order (--no-loadscope-reorder keeps it): the
# longest files first, by their measured time on 2 cores, so that no worker is left running one
# of them alone at the end of the suite.
SLOW_FIRST = ('test_storage.py', 'test_upcycle.py', 'test_hf.py', 'test_multiprocess.py', 'test_pipeline.py',
              'test_generate.py', 'test_gpu_check.py', 'test_harness.py', 'test_cli.py', 'test_surgery.py',
              'test_train.py', 'test_lory_train.py', 'test_moa.py', 'test_prepare.py', 'test_routing.py',
              'test_hf_remote.py', 'test_offline_tasks.py', 'test_lory.py', 'test_attention_kernels.py',
              'test_upcycle_errors.py', 'test_workdir.py', 'test_docs.py', 'test_moe.py', 'test_router_init.py',
              'test_eval.py', 'test_prepare_pod.py', 'test_model.py', 'test_data.py', 'test_dropless.py',
              'test_budget.py', 'test_launch.py', 'test_checkpoint_compression.py', 'test_sharding.py')


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=rank)  # stable: each file keeps its order


@pytest.fixture(autouse=True)
def no_gin_bindings():
    """gin's bindings are global: a configurable (TrainConfig, ModelConfig, DataConfig, ...) would
    take values that another test parsed."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope='session')
def bam_run(tmp_path_factory):
    """One tiny BAM run (1 layer, trained 1 step on 64-token rows) and its `bam-jax eval --json`,
    made once per session and shared by the xdist workers (a file lock): {'run': workdir, 'cli':
    {'status', 'stdout', 'stderr'} of the eval, 'result': its parsed output}. Tests that write
    into the run work on a copy of it."""
    from helpers import finish, shared, start_eval, train_run

    def make(directory):
        train_run(['gin/models/tiny.gin', 'gin/arch/bam.gin', 'gin/seed.gin'], directory / 'run')
        gin.clear_config()
        eval_cli = finish(start_eval(f'--workdir={directory / "run"}', '--json'))
        (directory / 'cli.json').write_text(json.dumps(eval_cli))

    directory = shared(tmp_path_factory, 'bam_run', make)
    out = {'run': directory / 'run', 'cli': json.loads((directory / 'cli.json').read_text())}
    assert out['cli']['status'] == 0, out['cli']['stderr'][-3000:]
    out['result'] = json.loads(out['cli']['stdout'])  # stdout holds the JSON and nothing else
    return out


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(COMMAND, *ARGS, check=False): `bam-jax` run in this process, without a subprocess's
    interpreter and JAX start-up; returns .returncode, .stdout and .stderr (check: assert 0)."""
    import types

    from helpers import cli_in_process

    def run(*args, check=False):
        status, out, err = cli_in_process(monkeypatch, capsys, *args)
        assert not check or status == 0, err[-3000:]
        return types.SimpleNamespace(returncode=status, stdout=out, stderr=err)

    return run
