"""Gin set-up: overrides that define a macro nothing reads are refused; routing is written once per
method (gin/routing/) and an upcycled model.gin carries the architecture only; settings that no
longer exist, in an older run's config.gin and checkpoint record, are skipped."""

import dataclasses
import re

import pytest

from bam_jax.errors import BamJaxError
from bam_jax.gin_config import parse_gin
from bam_jax.models import ModelConfig
from bam_jax.models.config import LoryConfig, MoAConfig, MoEConfig
from bam_jax.train import TrainConfig
from bam_jax.upcycle import UpcycleSpec, model_config
from bam_jax.upcycle.gin_file import model_gin

from helpers import REPO, assert_one_line_error, cli_in_process

TINY = ['gin/models/tiny.gin', 'gin/seed.gin']


def test_override_of_a_macro_nothing_reads_is_refused_with_the_closest_name():
    with pytest.raises(BamJaxError, match=r'--gin.TRAIN_STEP sets a macro that no gin file reads '
                                          r'\(did you mean TRAIN_STEPS\?\)'):
        parse_gin(TINY, ['TRAIN_STEP = 3'])
    with pytest.raises(BamJaxError, match=r'did you mean SEQ_LEN\?'):
        parse_gin(TINY, ['seq_len = 64'])
    with pytest.raises(BamJaxError, match=r'--gin.DOMAIN sets a macro .* \(the gin files read BATCH_SIZE, '
                                          r'LEARNING_RATE, SEQ_LEN, TRAIN_STEPS\)'):
        parse_gin(TINY, ["DOMAIN = 'code'"])  # seed.gin has no DOMAIN: that is branch.gin's


def test_overrides_of_read_macros_and_of_parameters_are_taken():
    configs = parse_gin(TINY, ['TRAIN_STEPS = 3', 'STEPS_HERE = 7', 'TrainConfig.eval_every = %STEPS_HERE',
                               'ModelConfig.d_model = 64'])
    assert (configs.train.train_steps, configs.train.eval_every) == (3, 7)
    assert configs.model.d_model == 64
    assert configs.train == TrainConfig() and configs.model == ModelConfig()  # gin's bindings, as bound
    assert 'TrainConfig.eval_every = %STEPS_HERE' in configs.operative  # what config.gin records


def test_the_model_length_is_its_own_setting_else_the_training_length():
    assert parse_gin(TINY, ['SEQ_LEN = 64']).max_length == 64  # unset: a run from before the setting
    configs = parse_gin(TINY, ['SEQ_LEN = 64', 'ModelConfig.max_length = 512'])
    assert (configs.max_length, configs.train.seq_len) == (512, 64)
    assert 'max_length' in configs.model.settings()  # a setting: any length reads the same checkpoint
    with pytest.raises(BamJaxError, match='ModelConfig.max_length must be >= 0'):
        parse_gin(TINY, ['ModelConfig.max_length = -1'])


def test_cli_refuses_a_misspelt_macro_and_writes_nothing(tmp_path, monkeypatch, capsys):
    workdir = tmp_path / 'run'
    status, _, err = cli_in_process(monkeypatch, capsys, 'train', '--gin_file=gin/models/tiny.gin',
                                    '--gin_file=gin/seed.gin', '--gin.TRAIN_STEP=3', f'--workdir={workdir}')
    assert_one_line_error((status, err), '--gin.TRAIN_STEP sets a macro that no gin file reads',
                          'did you mean TRAIN_STEPS?')
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------
# Routing lives in gin/routing/

ROUTING_FIELDS = {
    'MoEConfig': ('routing', 'top_k', 'gate', 'load_balance_weight', 'z_loss_weight',
                  'capacity_factor_train'),
    'MoAConfig': ('routing', 'top_k', 'gate', 'load_balance_weight', 'z_loss_weight'),
    'LoryConfig': ('segment_len', 'z_loss_weight'),
}


def test_routing_is_bound_only_in_gin_routing():
    pattern = re.compile(r'^\s*(' + '|'.join(ROUTING_FIELDS) + r')\.(\w+)\s*=', re.MULTILINE)
    for path in sorted((REPO / 'gin').rglob('*.gin')):
        bound = {f'{kind}.{field}' for kind, field in pattern.findall(path.read_text())
                 if field in ROUTING_FIELDS[kind]}
        if path.parent.name == 'routing':
            assert bound, path
        else:
            assert not bound, f'{path.relative_to(REPO)} binds routing: {sorted(bound)}'


def dense_tiny() -> ModelConfig:
    parse_gin(['gin/models/tiny.gin'], [])
    return ModelConfig()


# (upcycle method, its mix file, the arch file of the same model trained from scratch)
METHODS = [('btx', 'mix_btx.gin', 'arch/btx.gin'), ('bam', 'mix_bam.gin', 'arch/bam.gin'),
           ('bam_shared_kv', 'mix_bam_shared_kv.gin', 'arch/bam_shared_kv.gin'),
           ('lory', 'mix_lory.gin', 'arch/lory.gin')]


@pytest.mark.parametrize('method, mix, arch', METHODS, ids=[m[0] for m in METHODS])
def test_mix_of_an_upcycled_model_equals_the_arch_file(tmp_path, method, mix, arch):
    """The upcycled model.gin + the method's mix file builds the model that gin/arch/ builds:
    the same architecture (4 experts) and the same routing, both written once."""
    dense = dense_tiny()
    upcycled = model_config(dense, UpcycleSpec(method, 4, (0, 1, 2, 3)))
    (tmp_path / 'model.gin').write_text(model_gin(upcycled, tmp_path, 'test'))
    parse_gin([str(tmp_path / 'model.gin'), f'gin/{mix}'], [])
    mixed = ModelConfig()
    parse_gin(['gin/models/tiny.gin', f'gin/{arch}', 'gin/seed.gin'], [])
    assert ModelConfig() == mixed


def test_upcycled_model_gin_binds_the_architecture_only(tmp_path):
    """Routing is the mix stage's: model.gin holds no routing, so a run file's routing is the one used."""
    dense = dense_tiny()
    upcycled = model_config(dense, UpcycleSpec('bam', 3, (0, 1, 2), expert_split=2))
    text = model_gin(upcycled, tmp_path, 'test')
    bound = set(re.findall(r'^(\w+Config\.\w+) =', text, re.MULTILINE))
    assert {'MoEConfig.num_experts', 'MoEConfig.expert_split', 'MoAConfig.num_experts',
            'MoAConfig.shared_kv'} <= bound
    assert not {b for b in bound if b.split('.')[0] in ROUTING_FIELDS
                and b.split('.')[1] in ROUTING_FIELDS[b.split('.')[0]]}
    (tmp_path / 'model.gin').write_text(text)
    parse_gin([str(tmp_path / 'model.gin')], ['MoEConfig.top_k = 2'])
    built = ModelConfig()
    assert built.architecture() == upcycled.architecture()
    assert built.moe.top_k == 2


def test_architecture_and_settings_split_every_field():
    model = ModelConfig(moe=MoEConfig(num_experts=4, top_k=2, expert_split=2),
                        moa=MoAConfig(num_experts=3, shared_kv=True), dtype='float32')
    arch, settings = model.architecture(), model.settings()
    assert arch['moe'] == {'num_experts': 4, 'expert_split': 2}
    assert arch['moa'] == {'num_experts': 3, 'shared_kv': True}
    assert arch['lory'] is None and arch['d_model'] == 128 and 'dtype' not in arch
    assert settings['moe.top_k'] == 2 and settings['dtype'] == 'float32'
    assert settings['moa.routing'] == 'soft' and 'moe.num_experts' not in settings
    # Every field is exactly one of the two.
    for name, layer in (('moe', model.moe), ('moa', model.moa), ('lory', LoryConfig())):
        fields = {f.name for f in dataclasses.fields(layer)}
        assert set(layer.ARCHITECTURE) | {k.split('.', 1)[1] for k in ModelConfig(
            **{name: layer}).settings() if k.startswith(name + '.')} == fields
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    assert (set(arch) | {k for k in settings if '.' not in k}) == top


def test_no_gin_file_is_left_out(tmp_path):
    """Every gin file parses on the tiny model (the mix files with an upcycled model.gin)."""
    for path in sorted((REPO / 'gin').rglob('*.gin')):
        name = str(path.relative_to(REPO))
        if name.startswith('gin/models/'):
            files = [name]
        elif name.startswith('gin/mix'):
            (tmp_path / 'model.gin').write_text(model_gin(dense_tiny(), tmp_path, 'test'))
            files = [str(tmp_path / 'model.gin'), name]
        else:
            files = ['gin/models/tiny.gin', name]
        parse_gin(files, [])  # each parse starts from empty bindings


def test_older_runs_retired_settings_are_skipped(tmp_path):
    """An older run's operative config.gin and checkpoint model record bind
    MoEConfig.capacity_factor_eval (inference now has no capacity): both still read."""
    config = tmp_path / 'config.gin'
    config.write_text("ModelConfig.moe = @MoEConfig()\nMoEConfig.num_experts = 3\n"
                      "MoEConfig.capacity_factor_eval = 2.0\nMoEConfig.top_k = 2\n")
    parse_gin([str(config)], [])
    assert ModelConfig().moe == MoEConfig(num_experts=3, top_k=2)
    record = ModelConfig(moe=MoEConfig(num_experts=3)).to_dict()
    record['moe']['capacity_factor_eval'] = 2.0
    assert ModelConfig.from_dict(record) == ModelConfig(moe=MoEConfig(num_experts=3))
    assert config.read_text().count('capacity_factor_eval') == 1  # the run's file is left as it was
