import glob
import json
import os
import subprocess
import sys

import jax
import pytest

from lm import config as config_lib
from lm import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/from_checkpoint.py takes a checkpoint (test_a_saved_config_json_runs_as_data).
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 + glob.glob(os.path.join(ROOT, 'configs', 'post', '*.py'))
                 if not p.endswith('from_checkpoint.py'))


def _load(path):
  return config_lib.load_config(path)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_shipped_config_validates(path, tmp_path):
  config = _load(path)
  if config.model_from_init:  # As it would continue a Llama-2-7B-shaped checkpoint.
    (tmp_path / 'config.json').write_text(_load(os.path.join(
        ROOT, 'configs', 'llama_7b.py')).to_json_best_effort())
    config.init_from = str(tmp_path)
    config = config_lib.resolve_model_from_init(config)
  config_lib.validate(config)


@pytest.mark.parametrize('name, low, high', [
    ('llama_125m', 110e6, 140e6), ('llama_1b', 1.0e9, 1.2e9), ('llama_7b', 6.5e9, 7.0e9),
    ('moe_8x1b', 6.3e9, 6.5e9)])
def test_real_size_configs_have_their_advertised_size(name, low, high):
  config = _load(os.path.join(ROOT, 'configs', f'{name}.py'))
  cfg = model_lib.ModelConfig.from_config(config, 'bfloat16')
  params = jax.eval_shape(lambda: model_lib.init(cfg, 0)[1])
  assert low < model_lib.count_params(params) < high


def test_the_contract_fields_exist():
  config = config_lib.base_config()
  for name in ('d_model', 'num_layers', 'num_heads', 'num_kv_heads', 'd_ff', 'vocab_size',
               'max_seq_len', 'block'):
    assert name in config.model
  for name in ('steps', 'batch_size', 'learning_rate', 'warmup_steps', 'seed',
               'grad_accum_steps', 'eval_every', 'checkpoint_every'):
    assert name in config.train
  assert 'source' in config.data and 'seq_len' in config.data and config.mode == 'train'


@pytest.mark.parametrize('field, value, message', [
    ('model.d_model', 100, 'config.model.d_model=100 is not divisible by config.model.num_heads=8'),
    ('model.num_kv_heads', 3, 'config.model.num_heads=8 is not divisible by config.model.num_kv_heads=3'),
    ('model.block', 'bert', "config.model.block='bert'"),
    ('model.dtype', 'float16', "config.model.dtype='float16'"),
    ('train.steps', 0, 'config.train.steps=0: must be positive'),
    ('train.grad_accum_steps', 5, 'config.train.batch_size=32 is not divisible by config.train.grad_accum_steps=5'),
    ('data.seq_len', 4096, 'config.data.seq_len=4096 exceeds config.model.max_seq_len=1024'),
    ('train.learning_rate', -1.0, 'config.train.learning_rate=-1.0: must be >= 0'),
    ('mode', 'serve', "config.mode='serve'"),
    ('train.trainable', 'embeddings,norms', "config.train.trainable='embeddings,norms': ['norms']"),
    ('init_from', '/no/such/run', "config.init_from='/no/such/run': no such directory"),
])
def test_invalid_values_name_the_field(field, value, message):
  config = config_lib.base_config()
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value)


def _cli(*args, workdir):
  return subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
       '--workdir', str(workdir), *args],
      capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_misspelled_override_fails_fast_naming_the_field(tmp_path):
  result = _cli('--config.model.d_modle=64', workdir=tmp_path)
  assert result.returncode != 0
  assert 'd_modle' in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_cli_invalid_value_fails_before_compiling(tmp_path):
  result = _cli('--config.model.num_heads=3', workdir=tmp_path)
  assert result.returncode != 0
  assert 'config.model.d_model=128 is not divisible by config.model.num_heads=3' in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_load_config_finds_repo_configs_from_anywhere_and_applies_overrides(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_lib.load_config('configs/tiny.py', train={'steps': 7}, mode='train')
  assert config.train.steps == 7 and config.model.d_model == 128
  with pytest.raises(KeyError, match='Did you mean "steps"'):
    config_lib.load_config('configs/tiny.py', train={'stepz': 7})
  with pytest.raises(FileNotFoundError, match='configs/nope.py'):
    config_lib.load_config('configs/nope.py')


def test_a_saved_config_json_loads_back_with_fields_added_since_at_their_defaults(tmp_path):
  config = config_lib.base_config()
  config.model.vocab_size = 320
  values = json.loads(config.to_json_best_effort())
  del values['train']['trainable']  # Saved before the field existed.
  (tmp_path / 'config.json').write_text(json.dumps(values))
  assert config_lib.config_from_json(str(tmp_path / 'config.json')).to_dict() == config.to_dict()
  values['model']['vocab'] = 320
  (tmp_path / 'config.json').write_text(json.dumps(values))
  with pytest.raises(config_lib.ConfigError, match='config.model.vocab is not a field'):
    config_lib.config_from_json(str(tmp_path / 'config.json'))


def test_model_from_init_takes_the_shape_and_tokenizer_of_the_checkpoint(tmp_path):
  source = config_lib.load_config('configs/tiny.py')
  source.data.tokenizer = str(tmp_path / 'ckpt' / 'tokenizer.model')
  os.makedirs(tmp_path / 'ckpt' / 'params')
  (tmp_path / 'ckpt' / 'config.json').write_text(source.to_json_best_effort())
  config = config_lib.load_config('configs/adapt_lora.py')
  config.init_from = str(tmp_path / 'ckpt')
  resolved = config_lib.resolve_model_from_init(config)
  for field in config_lib.MODEL_SHAPE_FIELDS:
    assert resolved.model[field] == source.model[field], field
  assert resolved.model.remat and resolved.model.scan_layers  # Compute settings stay the run's.
  assert resolved.data.tokenizer == source.data.tokenizer
  assert config.model.d_model == config_lib.base_config().model.d_model  # Not modified.
  resolved.data.seq_len = 128  # The run's own choice, at most the model's max_seq_len.
  config_lib.validate(resolved)

  # A tokenizer trained on first use is not in the config, but in the run's workdir.
  source.data.tokenizer = ''
  (tmp_path / 'ckpt' / 'config.json').write_text(source.to_json_best_effort())
  os.makedirs(tmp_path / 'ckpt' / 'tokenizer')
  (tmp_path / 'ckpt' / 'tokenizer' / 'spm.model').write_bytes(b'')
  resolved = config_lib.resolve_model_from_init(config)
  assert resolved.data.tokenizer == str(tmp_path / 'ckpt' / 'tokenizer' / 'spm.model')

  config.init_from = str(tmp_path)  # No config.json there or above within two levels.
  with pytest.raises(config_lib.ConfigError, match='no config.json'):
    config_lib.resolve_model_from_init(config)
  config.init_from = ''
  with pytest.raises(config_lib.ConfigError, match='needs config.init_from'):
    config_lib.resolve_model_from_init(config)


def test_a_bad_mixture_is_a_config_error():
  config = config_lib.base_config()
  config.data.mixture = 'hi=stdlib'
  with pytest.raises(config_lib.ConfigError, match='config.data.mixture'):
    config_lib.validate(config)


def test_a_saved_config_json_runs_as_data(tmp_path):
  saved = config_lib.base_config()
  saved.model.d_model = 48
  (tmp_path / 'config.json').write_text(saved.to_json())
  (tmp_path / 'tokenizer.model').write_bytes(b'')
  argv = config_lib._config_json_as_file(['lm', '--config', str(tmp_path / 'config.json'), '-x'])
  assert argv == ['lm', '--config', f'{config_lib._FROM_CHECKPOINT}:{tmp_path}/config.json', '-x']
  assert config_lib._config_json_as_file(['lm', f'--config={tmp_path}'])[1].endswith(
      f'from_checkpoint.py:{tmp_path}')
  assert config_lib._config_json_as_file(['lm', '--config=configs/tiny.py']) == [
      'lm', '--config=configs/tiny.py']
  config = config_lib.config_from_checkpoint(str(tmp_path / 'config.json'))
  assert (config.model.d_model, config.init_from) == (48, str(tmp_path))
  assert config.data.tokenizer == str(tmp_path / 'tokenizer.model')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    config_lib.config_from_checkpoint(str(tmp_path / 'missing'))
