"""Hugging Face models in and out, checked against transformers: tiny random models of each family
built with transformers' own config classes and save_pretrained (float32), imported, upcycled,
exported, and run by both libraries on the same tokens."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from bam_jax import gin_config, workdir
from bam_jax.data import write_byte_tokenizer
from bam_jax.hf import export_hf, import_hf
from bam_jax.models import ModelConfig, abstract_model, merge_params, split_params
from bam_jax.upcycle import upcycle_checkpoints

from helpers import assert_one_line_error, cli_in_process

# The special ids are those of the byte tokenizer the models are saved with (write_byte_tokenizer).
COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, bos_token_id=0,
              eos_token_id=1, pad_token_id=0)
LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 16}
# family: (model class, config, the bam_jax setting that turns off what the config adds, where that
# leaves the parameters as they are: a setting both libraries ignored would pass unnoticed)
FAMILIES = {
    'llama': (transformers.LlamaForCausalLM, transformers.LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE),
              {'rope_scaling': 'none'}),
    'mistral': (transformers.MistralForCausalLM, transformers.MistralConfig(**COMMON, sliding_window=6),
                {'sliding_window': 0}),
    'qwen2': (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**COMMON, tie_word_embeddings=True), None),
    'qwen3': (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**COMMON, head_dim=24), None),
}
TOKENS = np.random.default_rng(0).integers(3, 259, (2, 21))
TOLERANCE = dict(rtol=1e-5, atol=2e-5)  # float32 in both libraries; observed differences ~3e-7


def perturb(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Adds noise to every weight; norm scales and biases move away from 1 and 0, so a missed one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def save_hf(model, directory: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(directory)
    write_byte_tokenizer(directory)
    return directory


def hf_logits(directory, tokens=TOKENS, **kwargs) -> np.ndarray:
    """transformers' float32 logits of the tokens (kwargs: trust_remote_code for bam_jax's own model)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def bam_logits(directory, *bindings, tokens=TOKENS) -> np.ndarray:
    """Logits of a bam_jax run directory under its gin config (float32) and the bindings."""
    gin_config.load_run_config(pathlib.Path(directory), ["ModelConfig.dtype = 'float32'", *bindings])
    config = ModelConfig()
    step_dir = workdir.resolve_checkpoint(directory)
    graphdef, abstract = split_params(abstract_model(config))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = workdir.restore_params(step_dir, abstract, jax.tree.map(lambda _: device, abstract))
    return np.asarray(merge_params(graphdef, params)(tokens))


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """{family: (Hugging Face directory, imported bam_jax directory)}."""
    root = tmp_path_factory.mktemp('hf')
    out = {}
    for family, (cls, config, _) in FAMILIES.items():
        torch.manual_seed(0)
        hf_dir = save_hf(perturb(cls(config), seed=1, scale=0.1), root / family)
        out[family] = (hf_dir, root / f'{family}_bam')
        import_hf(hf_dir, out[family][1], progress=False)
    return out


@pytest.mark.parametrize('family', FAMILIES)
def test_imported_logits_equal_transformers(models, family):
    hf_dir, imported = models[family]
    expected = hf_logits(hf_dir)
    assert np.abs(expected).max() > 1.0  # not near-uniform: a wrong tensor would show
    np.testing.assert_allclose(bam_logits(imported), expected, **TOLERANCE)
    if FAMILIES[family][2]:  # what the config adds matters on these tokens: without it the logits are far off
        off = [f'ModelConfig.{name} = {value!r}' for name, value in FAMILIES[family][2].items()]
        assert np.abs(bam_logits(imported, *off) - expected).max() > 100 * TOLERANCE['atol']
    record = json.loads((imported / 'import.json').read_text())
    assert record['architecture'] == FAMILIES[family][0].__name__ and record['dtype'] == 'float32'
    # The model's length is its config's max_position_embeddings (under the import's cap).
    assert gin_config.load_run_config(imported, []).max_length == 128
    assert record['tensors'] == len(load_file(hf_dir / 'model.safetensors'))
    assert (imported / 'tokenizer' / 'tokenizer.json').read_bytes() == (hf_dir / 'tokenizer.json').read_bytes()


@pytest.mark.parametrize('family', FAMILIES)
def test_import_then_export_is_tensor_exact(models, family, tmp_path):
    hf_dir, imported = models[family]
    out = tmp_path / 'export'
    record = export_hf(imported, out, dtype='float32', progress=False)
    assert record.format == family  # auto: the family it came from
    original, exported = load_file(hf_dir / 'model.safetensors'), load_file(out / 'model.safetensors')
    assert exported.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    before, after = (json.loads((d / 'config.json').read_text()) for d in (hf_dir, out))
    for key in ('architectures', 'model_type', 'hidden_size', 'num_key_value_heads', 'tie_word_embeddings',
                'rms_norm_eps', 'max_position_embeddings', 'sliding_window'):
        assert after.get(key) == before.get(key), key
    assert after['head_dim'] == before.get('head_dim') or before['hidden_size'] // before['num_attention_heads']
    np.testing.assert_allclose(hf_logits(out), hf_logits(hf_dir), **TOLERANCE)


def hf_greedy(directory, prompt: str, max_new_tokens: int, **kwargs) -> list[int]:
    """transformers' greedy completion ids of the prompt, tokenized by the directory's tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    ids = tokenizer(prompt, return_tensors='pt').input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    completion = out[0, ids.shape[1]:].tolist()
    return completion[:completion.index(1) + 1] if 1 in completion else completion  # through the EOS


def bam_generate(monkeypatch, capsys, directory, prompt: str, max_new_tokens: int) -> dict:
    """`bam-jax generate --json`'s greedy completion of one prompt (float32)."""
    capsys.readouterr()  # what transformers printed before
    status, out, err = cli_in_process(monkeypatch, capsys, 'generate', f'--workdir={directory}', f'--prompt={prompt}',
                                      f'--max_new_tokens={max_new_tokens}', '--json',
                                      "--gin.ModelConfig.dtype='float32'")
    assert status == 0, err
    (result,) = [json.loads(line) for line in out.splitlines()]
    return result


def bam_greedy(monkeypatch, capsys, directory, prompt: str, max_new_tokens: int) -> list[int]:
    """`bam-jax generate`'s greedy completion ids (the EOS included, where it stopped there)."""
    result = bam_generate(monkeypatch, capsys, directory, prompt, max_new_tokens)
    return result['completion_ids'] + ([1] if result['stop_reason'] == 'eos' else [])


@pytest.mark.parametrize('family', ['mistral', 'qwen3'])
def test_generate_with_the_imported_tokenizer_equals_transformers(models, family, monkeypatch, capsys):
    # mistral: the sliding window (6) over the KV cache; qwen3: q/k norm and an explicit head_dim.
    hf_dir, imported = models[family]
    prompt = 'The court held that'
    expected = hf_greedy(hf_dir, prompt, 16)
    assert len(expected) > 8  # long enough to cross the window
    assert bam_greedy(monkeypatch, capsys, imported, prompt, 16) == expected


def test_sharded_weights_with_an_index_import_and_export(models, tmp_path):
    hf_dir, imported = models['llama']
    out = tmp_path / 'sharded'
    export_hf(imported, out, dtype='float32', max_shard_bytes=64 * 1024, progress=False)
    index = json.loads((out / 'model.safetensors.index.json').read_text())
    shards = sorted(set(index['weight_map'].values()))
    assert len(shards) > 3 and not (out / 'model.safetensors').exists()
    np.testing.assert_allclose(hf_logits(out), hf_logits(hf_dir), **TOLERANCE)
    again = tmp_path / 'again'
    import_hf(out, again, progress=False)
    np.testing.assert_array_equal(bam_logits(again), bam_logits(imported))


@pytest.fixture(scope='module')
def mixed(models, tmp_path_factory):
    """BTX, BAM and BAM shared-KV upcycled from three imported Llamas that share a base."""
    root = tmp_path_factory.mktemp('mixed')
    base, _ = models['llama']
    experts = []
    for seed in (2, 3):
        model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        hf_dir = save_hf(perturb(model, seed=seed, scale=0.05), root / f'expert{seed}')
        import_hf(hf_dir, root / f'expert{seed}_bam', progress=False)
        experts.append(str(root / f'expert{seed}_bam'))
    out = {}
    for method in ('btx', 'bam', 'bam_shared_kv'):
        out[method] = root / method
        upcycle_checkpoints(method, experts, out[method], seed=str(models['llama'][1]), progress=False)
    return out


@pytest.mark.parametrize('routing, expected_format', [
    (['MoEConfig.top_k = 2', "MoEConfig.gate = 'renormalize'"], 'mixtral'),
    (['MoEConfig.top_k = 2', "MoEConfig.gate = 'softmax'"], 'qwen2_moe'),
    (["MoEConfig.routing = 'soft'"], 'mixtral'),
])
def test_btx_exports_to_a_standard_moe_family(mixed, tmp_path, routing, expected_format):
    out = tmp_path / 'btx'
    record = export_hf(mixed['btx'], out, dtype='float32', bindings=routing, progress=False)
    assert record.format == expected_format
    np.testing.assert_allclose(hf_logits(out), bam_logits(mixed['btx'], *routing), **TOLERANCE)
    # The experts' tokenizer travels: upcycled model, its gin file, the export.
    assert f"DataConfig.tokenizer_path = '{mixed['btx'] / 'tokenizer'}'" in (mixed['btx'] / 'model.gin').read_text()
    assert (out / 'tokenizer.json').read_bytes() == (mixed['btx'] / 'tokenizer' / 'tokenizer.json').read_bytes()


@pytest.mark.parametrize('method', ['bam', 'bam_shared_kv'])
def test_bam_exports_to_its_own_hugging_face_model(mixed, method, tmp_path, monkeypatch, capsys):
    out = tmp_path / method
    assert export_hf(mixed[method], out, dtype='float32', progress=False).format == 'bam_jax'
    np.testing.assert_allclose(hf_logits(out, trust_remote_code=True), bam_logits(mixed[method]), **TOLERANCE)
    # transformers' generate() with the model's own cache, against bam-jax generate
    prompt = 'def add(a, b):'
    expected = bam_greedy(monkeypatch, capsys, mixed[method], prompt, 12)
    assert len(expected) > 4 and hf_greedy(out, prompt, 12, trust_remote_code=True) == expected


def test_a_model_trained_here_on_bytes_exports_and_reloads(bam_run, tmp_path, monkeypatch, capsys):
    run, out = bam_run['run'], tmp_path / 'bam'
    status, stdout, err = cli_in_process(monkeypatch, capsys, 'export-hf', f'--workdir={run}', f'--out={out}',
                                         '--dtype=float32')
    assert status == 0, err
    assert 'BamJaxForCausalLM (load with trust_remote_code=True)' in stdout
    assert {'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'export.json',
            'modeling_bam_jax.py', 'configuration_bam_jax.py', 'cache_bam_jax.py'} <= {p.name for p in out.iterdir()}
    tokens = np.asarray(transformers.AutoTokenizer.from_pretrained(out)(['Permission is hereby granted, free'])
                        .input_ids)
    assert tokens[0, 0] == 0  # the start token every bam_jax text begins with
    np.testing.assert_allclose(hf_logits(out, tokens, trust_remote_code=True), bam_logits(run, tokens=tokens),
                               **TOLERANCE)
    expected = bam_generate(monkeypatch, capsys, run, 'The licensor grants', 16)
    ids = hf_greedy(out, 'The licensor grants', 16, trust_remote_code=True)
    assert ids == expected['completion_ids'] + ([1] if expected['stop_reason'] == 'eos' else [])
    assert transformers.AutoTokenizer.from_pretrained(out).decode(ids) == expected['completion']


def test_a_standard_class_never_gets_a_model_it_would_compute_differently(mixed, models, tmp_path, monkeypatch,
                                                                          capsys):
    cases = [
        (mixed['btx'], 'mixtral', 'its top-k gates are not renormalised', 'qwen2_moe'),
        (mixed['bam'], 'mixtral', 'it has attention experts', 'bam_jax'),
        (models['qwen2'][1], 'llama', 'it has q/k/v biases', 'qwen2'),
        (models['mistral'][1], 'qwen2', 'it has a sliding window', 'mistral'),
        (models['llama'][1], 'qwen3', 'qwen3 normalises q and k, the model does not', 'llama'),
    ]
    for run, fmt, reason, fitting in cases:
        out = tmp_path / fmt
        status, _, err = cli_in_process(monkeypatch, capsys, 'export-hf', f'--workdir={run}', f'--out={out}',
                                        f'--format={fmt}')
        assert_one_line_error((status, err), f'--format={fmt} cannot express this model: {reason}',
                              f'; use --format={fitting}')
        assert not out.exists() and not list(tmp_path.glob('.*'))


def test_import_errors_are_one_line_and_write_nothing(models, tmp_path, monkeypatch, capsys):
    hf_dir, _ = models['llama']
    broken = {}
    for name in ('gpt2', 'no_config', 'no_weights', 'missing_tensor', 'yarn'):
        broken[name] = tmp_path / name
        shutil.copytree(hf_dir, broken[name])
    config = json.loads((hf_dir / 'config.json').read_text())
    (broken['gpt2'] / 'config.json').write_text(json.dumps({**config, 'architectures': ['GPT2LMHeadModel']}))
    (broken['no_config'] / 'config.json').unlink()
    (broken['no_weights'] / 'model.safetensors').unlink()
    weights = load_file(hf_dir / 'model.safetensors')
    del weights['model.layers.1.mlp.down_proj.weight']
    save_file(weights, broken['missing_tensor'] / 'model.safetensors', metadata={'format': 'pt'})
    yarn = {**config, 'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}, 'rope_parameters': None}
    (broken['yarn'] / 'config.json').write_text(json.dumps(yarn))
    expected = {
        'gpt2': "unsupported architecture ['GPT2LMHeadModel']: import-hf reads LlamaForCausalLM, "
                'MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM',
        'no_config': 'has no config.json',
        'no_weights': 'no weights in',
        'missing_tensor': 'missing weights: model.layers.1.mlp.down_proj.weight',
        'yarn': "RoPE scaling 'yarn' is not supported (supported: linear, llama3)",
    }
    for name, message in expected.items():
        out = tmp_path / f'{name}_out'
        status, _, err = cli_in_process(monkeypatch, capsys, 'import-hf', f'--hf_dir={broken[name]}', f'--out={out}')
        assert_one_line_error((status, err), message)
        assert not out.exists() and not list(tmp_path.glob(f'.{name}_out*'))


def test_experts_of_other_vocabularies_are_refused(models, tmp_path, monkeypatch, capsys):
    save_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, 'vocab_size': 400})),
            tmp_path / 'vocab400')
    renamed = tmp_path / 'renamed'  # the same shapes, another tokenizer: one token's text differs
    shutil.copytree(models['llama'][0], renamed)
    tokenizer = json.loads((renamed / 'tokenizer.json').read_text())
    tokenizer['added_tokens'][0]['content'] = '<start>'
    (renamed / 'tokenizer.json').write_text(json.dumps(tokenizer))
    for name, message in (('vocab400', 'different vocabularies'), ('renamed', 'different tokenizers')):
        import_hf(tmp_path / name, tmp_path / f'{name}_bam', progress=False)
        out = tmp_path / 'out'
        status, _, err = cli_in_process(monkeypatch, capsys, 'upcycle', '--method=btx',
                                        f'--seed={models["llama"][1]}',
                                        f'--experts={models["llama"][1]},{tmp_path / f"{name}_bam"}', f'--out={out}')
        assert_one_line_error((status, err), message)
        assert not out.exists()
