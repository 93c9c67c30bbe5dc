"""lm.convert against transformers on CPU: logits, bit-exact round trips, shards, errors."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import convert
from lm import data as data_lib
from lm import lora
from lm import model as model_lib
from lm import tokenizer as tokenizer_lib
from requirements import require

TOL = 1e-4  # Max abs logit difference, lm (JAX, fp32) vs transformers (torch, fp32).
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=64)
CASES = {
    'mha': dict(num_key_value_heads=4, tie_word_embeddings=False),
    'gqa_tied': dict(num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5),
    'mqa': dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500_000.0),
    'gqa_bf16': dict(num_key_value_heads=2, tie_word_embeddings=False, dtype='bfloat16'),
}
SENTENCES = ['def read(self, path):\n    """Return the  value of 12345 at path."""\n',
             'Unicode: ünïcödé नमस्ते 😀, tabs\tand  double  spaces.']


def _hf_libs():
  return require('torch'), require('transformers')


@pytest.fixture(scope='module')
def tokens():
  return np.random.default_rng(0).integers(0, BASE['vocab_size'], (2, 32))


@pytest.fixture(scope='module')
def case(tmp_path_factory, tokens):
  """case(name) -> dict(hf=HF dir, lm=hf_to_lm's output, logits=transformers' logits), built once
  per name for the whole module."""

  @functools.cache
  def build(name):
    torch, transformers = _hf_libs()
    directory = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**BASE, **CASES[name])
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # Larger than the 0.02 init, so the logits are O(1) and tell apart.
      for p in model.parameters():
        p.normal_(0, 0.15) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    if CASES[name].get('dtype') == 'bfloat16':
      model = model.to(torch.bfloat16)
    with torch.no_grad():
      logits = model(torch.as_tensor(tokens)).logits.float().numpy()
    model.save_pretrained(directory / 'hf', safe_serialization=True)
    summary = convert.hf_to_lm(str(directory / 'hf'), str(directory / 'lm'))
    return dict(hf=str(directory / 'hf'), lm=str(directory / 'lm'), logits=logits,
                summary=summary, dir=directory)

  return build


def _restore(ckpt):
  config = config_lib.config_from_json(os.path.join(ckpt, 'config.json'))
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  return cfg, checkpoint_lib.restore_params(
      ckpt, jax.eval_shape(lambda: model_lib.init_params(cfg, 0)))


@functools.cache
def _forward(cfg):
  """lm's logits for cfg, jitted: one compile per config instead of one per operation."""
  graphdef = model_lib.graphdef(cfg)
  return jax.jit(lambda params, tokens: model_lib.apply(graphdef, params, tokens))


def _lm_logits(ckpt, tokens):
  cfg, params = _restore(ckpt)
  return np.asarray(_forward(cfg)(params, jnp.asarray(tokens)))


def _hf_logits(hf_dir, tokens):
  torch, transformers = _hf_libs()
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def _tensors(hf_dir) -> dict:
  """Every tensor of a HF directory's safetensors files, as numpy arrays (bf16 ones too)."""
  out = {}
  for file in convert.safetensors_files(hf_dir):
    with safe_open(file, framework='numpy') as f:
      assert f.metadata() == {'format': 'pt'}
      out.update({name: f.get_slice(name)[:] for name in f.keys()})
  return out


def _assert_nothing_written(out):
  assert not os.path.exists(out)
  assert not [n for n in os.listdir(os.path.dirname(out)) if '.tmp-' in n]


@pytest.mark.parametrize('name', ['mha', 'gqa_tied', 'mqa'])
def test_logits_match_transformers(case, tokens, name):
  c = case(name)
  logits = _lm_logits(c['lm'], tokens)
  diff = np.abs(logits - c['logits']).max()
  print(f'{name}: lm vs transformers max |logit diff| = {diff:.2e} '
        f'(logit std {c["logits"].std():.2f})')
  assert c['logits'].std() > 0.5
  assert diff < TOL


@pytest.mark.parametrize('name', ['mha', 'gqa_tied', 'mqa', 'gqa_bf16'])
def test_round_trip_is_bit_exact(case, tokens, name):
  c = case(name)
  export = str(c['dir'] / 'export')
  summary = convert.lm_to_hf(c['lm'], export)
  original, exported = _tensors(c['hf']), _tensors(export)
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype, key
    assert exported[key].shape == value.shape, key
    assert exported[key].tobytes() == value.tobytes(), key
  with open(os.path.join(c['hf'], 'config.json')) as f:
    hf_config = json.load(f)
  with open(os.path.join(export, 'config.json')) as f:
    config = json.load(f)
  assert summary['dtype'] == config['dtype'] == hf_config['dtype']  # bfloat16 for gqa_bf16.
  for field in ('bos_token_id', 'eos_token_id', 'pad_token_id', 'num_key_value_heads',
                'tie_word_embeddings', 'rms_norm_eps', 'rope_parameters'):
    assert config[field] == hf_config[field], field
  if name != 'gqa_bf16':  # transformers loads the export and computes what it did before.
    assert np.abs(_hf_logits(export, tokens) - c['logits']).max() == 0


def test_bf16_import_keeps_every_bit(case, tokens):
  c = case('gqa_bf16')
  cfg, params = _restore(c['lm'])
  assert c['summary']['hf_dtype'] == 'bfloat16' and cfg.param_dtype == 'float32'
  embed = _tensors(c['hf'])['model.embed_tokens.weight']
  np.testing.assert_array_equal(params['embed'], embed.astype(np.float32))
  # The fp32 lm model computes what transformers does with the bf16 weights upcast to fp32.
  diff = np.abs(_lm_logits(c['lm'], tokens) - _hf_logits(c['hf'], tokens)).max()
  print(f'gqa_bf16 (weights upcast to fp32): max |logit diff| = {diff:.2e}')
  assert diff < TOL


def test_converted_directory_is_a_run_config(case):
  c = case('mha')
  config = config_lib.load_config(os.path.join(c['lm'], 'config.py'))
  assert config.init_from == c['lm']
  m = config.model
  assert (m.block, m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.d_ff,
          m.max_seq_len, m.tie_embeddings) == ('llama', 128, 64, 2, 4, 4, 96, 64, False)
  assert config.data.seq_len == 64
  config_lib.validate(config)
  shapes = checkpoint_lib.params_shapes(c['lm'])
  assert shapes['blocks']['attention']['w_q'].shape == (2, 64, 4, 16)
  assert shapes['unembed'].shape == (64, 128)
  assert os.path.isfile(os.path.join(c['lm'], 'hf_config.json'))
  with open(os.path.join(c['lm'], 'conversion.json')) as f:
    assert json.load(f)['num_params'] == model_lib.count_params(shapes)
  mqa = config_lib.config_from_json(os.path.join(case('mqa')['lm'], 'config.json')).model
  assert (mqa.num_kv_heads, mqa.rope_theta) == (1, 500_000.0)
  tied = config_lib.config_from_json(os.path.join(case('gqa_tied')['lm'], 'config.json')).model
  assert (tied.tie_embeddings, tied.norm_eps) == (True, 1e-5)
  assert 'unembed' not in checkpoint_lib.params_shapes(case('gqa_tied')['lm'])


def test_sharded_input_with_and_without_index(case, tmp_path):
  torch, transformers = _hf_libs()
  c = case('mha')
  sharded = tmp_path / 'sharded'
  transformers.LlamaForCausalLM.from_pretrained(c['hf'], dtype=torch.float32).save_pretrained(
      sharded, max_shard_size='100KB')
  assert len(list(sharded.glob('*.safetensors'))) > 2
  _, want = _restore(c['lm'])
  convert.hf_to_lm(str(sharded), str(tmp_path / 'with_index'))
  os.remove(sharded / 'model.safetensors.index.json')
  assert convert.hf_to_lm(str(sharded), str(tmp_path / 'no_index'))['files'] > 2
  for out in ('with_index', 'no_index'):
    _, got = _restore(str(tmp_path / out))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_cli_and_sharded_output(case, tokens, tmp_path, capsys):
  c = case('mqa')
  lm_dir, hf_dir = str(tmp_path / 'lm'), str(tmp_path / 'hf')
  convert.main(['hf-to-lm', '--hf', c['hf'], '--out', lm_dir, '--param_dtype', 'float32'])
  assert 'num_params' in capsys.readouterr().out
  convert.main(['lm-to-hf', '--checkpoint', lm_dir, '--out', hf_dir, '--max_shard_size', '60KB'])
  assert 'files' in capsys.readouterr().out
  with open(os.path.join(hf_dir, 'model.safetensors.index.json')) as f:
    index = json.load(f)
  files = sorted(set(index['weight_map'].values()))
  assert len(files) > 3 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  for file in files:  # Only a single tensor over the limit may make a shard larger.
    with safe_open(os.path.join(hf_dir, file), framework='numpy') as f:
      sizes = [f.get_slice(k)[:].nbytes for k in f.keys()]
    assert sum(sizes) <= 60_000 or len(sizes) == 1
  original, exported = _tensors(c['hf']), _tensors(hf_dir)
  assert index['metadata']['total_size'] == sum(x.nbytes for x in original.values())
  assert sorted(index['weight_map']) == sorted(original)
  assert all(exported[k].tobytes() == v.tobytes() for k, v in original.items())
  diff = np.abs(_hf_logits(hf_dir, tokens) - c['logits']).max()
  assert diff == 0
  with pytest.raises(SystemExit, match='already exists and is not empty'):
    convert.main(['hf-to-lm', '--hf', c['hf'], '--out', lm_dir])


def test_permute_rotary_maps_meta_interleaved_to_rotate_half():
  """A head's q from Meta-layout weights, rotated Meta's way (pairs 2i, 2i+1 as complex numbers),
  equals lm's rotate-half rotary of q from permute_rotary's weights, up to the same reordering of
  the head dimension (which q.k products do not see)."""
  rng = np.random.default_rng(0)
  heads, Q, D, T, theta = 2, 8, 16, 5, 10_000.0
  w_meta = rng.standard_normal((heads * Q, D)).astype(np.float32)
  x_TD = rng.standard_normal((T, D)).astype(np.float32)
  np.testing.assert_array_equal(
      convert.unpermute_rotary(convert.permute_rotary(w_meta, heads), heads), w_meta)

  q_meta = (x_TD @ w_meta.T).reshape(T, heads, Q // 2, 2)
  freqs = theta ** (-np.arange(0, Q, 2) / Q)
  angle = np.arange(T)[:, None, None] * freqs
  rotated = (q_meta[..., 0] + 1j * q_meta[..., 1]) * np.exp(1j * angle)  # Meta's apply_rotary_emb
  q_meta_THQ = np.stack([rotated.real, rotated.imag], -1).reshape(T, heads, Q)

  q = (x_TD @ convert.permute_rotary(w_meta, heads).T).reshape(1, T, heads, Q)
  q_lm_THQ = np.asarray(model_lib.rotary(jnp.asarray(q), jnp.arange(T)[None], theta))[0]
  halves = np.concatenate([np.arange(0, Q, 2), np.arange(1, Q, 2)])  # 2i -> i, 2i+1 -> i + Q/2
  np.testing.assert_allclose(q_lm_THQ, q_meta_THQ[..., halves], atol=1e-5)


def test_meta_rotary_layout_gives_the_same_logits(case, tokens, tmp_path):
  c = case('gqa_tied')
  tensors = _tensors(c['hf'])
  for name in tensors:
    if name.endswith(('q_proj.weight', 'k_proj.weight')):
      heads = BASE['num_attention_heads'] if 'q_proj' in name else 2
      tensors[name] = convert.unpermute_rotary(tensors[name], heads)
  meta = _hf_copy(c['hf'], tmp_path / 'meta', tensors=tensors)
  convert.hf_to_lm(meta, str(tmp_path / 'lm'), rotary_layout='meta')
  _, want = _restore(c['lm'])
  _, got = _restore(str(tmp_path / 'lm'))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  diff = np.abs(_lm_logits(str(tmp_path / 'lm'), tokens) - c['logits']).max()
  print(f'meta rotary layout: max |logit diff| = {diff:.2e}')
  assert diff < TOL


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  directory = tmp_path_factory.mktemp('tokenizer')
  texts = list(data_lib.iter_documents('stdlib', max_chars=100_000))
  path = str(directory / 'spm.model')
  tokenizer_lib.train_tokenizer(texts, 400, path, max_chars=100_000, seed=0)
  return path


def _lm_run(directory, tokenizer, params=None, trainable='all', **lora):
  """A checkpoint directory as lm itself makes them (not from HF): params/ and config.json."""
  config = config_lib.base_config()
  config.model.update(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      d_ff=64, max_seq_len=64)
  config.data.tokenizer = tokenizer
  config.lora.update(lora)
  config.train.trainable = trainable
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  # Random values of init_params' shapes (init_params itself compiles for seconds); LoRA's B
  # nonzero too, so merging changes the weights.
  rng = np.random.default_rng(0)
  if params is None:
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (path[-1].key == 'scale') + rng.normal(0, 0.2, x.shape).astype(x.dtype),
        jax.eval_shape(lambda: model_lib.init_params(cfg, 0)))
  os.makedirs(directory)
  checkpoint_lib.save_params(str(directory), params)
  (directory / 'config.json').write_text(config.to_json_best_effort())
  return cfg, params


def test_lm_run_with_tokenizer_loads_in_transformers(tokenizer, tmp_path):
  torch, transformers = _hf_libs()
  cfg, params = _lm_run(tmp_path / 'run', tokenizer)
  out = str(tmp_path / 'hf')
  summary = convert.lm_to_hf(str(tmp_path / 'run'), out)  # Tokenizer from config.data.
  assert summary['dtype'] == 'float32' and summary['tokenizer'] == tokenizer
  with open(os.path.join(out, 'config.json')) as f:
    config = json.load(f)
  assert (config['bos_token_id'], config['eos_token_id'], config['pad_token_id']) == (1, 2, 3)

  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  sp = tokenizer_lib.Tokenizer(tokenizer)
  for sentence in SENTENCES:
    ids = hf_tokenizer(sentence)['input_ids']
    assert ids[0] == tokenizer_lib.BOS_ID and ids[1:] == sp.encode(sentence)

  tokens = np.random.default_rng(1).integers(0, 400, (2, 24))
  want = np.asarray(_forward(cfg)(params, jnp.asarray(tokens)))
  diff = np.abs(_hf_logits(out, tokens) - want).max()
  print(f'lm run -> transformers: max |logit diff| = {diff:.2e} (logit std {want.std():.2f})')
  assert want.std() > 0.5 and diff < TOL

  # And back: the same parameters bit for bit, the tokenizer copied and named in the config.
  back = str(tmp_path / 'back')
  assert convert.hf_to_lm(out, back)['tokenizer'] == os.path.join(out, 'tokenizer.model')
  config = config_lib.load_config(os.path.join(back, 'config.py'))
  assert config.data.tokenizer == os.path.join(back, 'tokenizer.model')
  with open(config.data.tokenizer, 'rb') as f, open(tokenizer, 'rb') as g:
    assert f.read() == g.read()
  jax.tree.map(np.testing.assert_array_equal, _restore(back)[1], params)


def test_lora_adapters_are_merged(tokenizer, tmp_path):
  cfg, params = _lm_run(tmp_path / 'run', tokenizer, rank=2, alpha=4.0, targets='all')
  assert 'w_q_lora_a' in params['blocks']['attention']
  summary = convert.lm_to_hf(str(tmp_path / 'run'), str(tmp_path / 'hf'), dtype='float32')
  assert summary['lora_merged']
  tokens = np.random.default_rng(2).integers(0, 400, (2, 24))
  want = np.asarray(_forward(cfg)(params, jnp.asarray(tokens)))
  diff = np.abs(_hf_logits(str(tmp_path / 'hf'), tokens) - want).max()
  print(f'lm LoRA run -> transformers: max |logit diff| = {diff:.2e}')
  assert diff < TOL


def test_lora_adapters_export_unmerged_for_peft(tokenizer, tmp_path):
  torch, transformers = _hf_libs()
  cfg, params = _lm_run(tmp_path / 'run', tokenizer, trainable='lora', rank=2, alpha=4.0,
                        dropout=0.1, targets='all')
  summary = convert.lm_to_peft(str(tmp_path / 'run'), str(tmp_path / 'adapter'), base='tiny')
  assert summary['tensors'] == 2 * 7 * 2  # Layers x projections x (A, B).
  with open(tmp_path / 'adapter' / 'adapter_config.json') as f:
    adapter_config = json.load(f)
  assert adapter_config['r'] == 2 and adapter_config['lora_alpha'] == 4.0
  assert adapter_config['lora_dropout'] == 0.1
  assert adapter_config['base_model_name_or_path'] == 'tiny'
  assert adapter_config['target_modules'] == sorted(
      ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])

  # The model the adapters apply to: the same weights without them, exported to HF.
  base_params = {**params, 'blocks': {
      module: {name: v for name, v in leaves.items() if not lora.is_adapter(name)}
      for module, leaves in params['blocks'].items()}}
  _lm_run(tmp_path / 'base', tokenizer, params=base_params)
  convert.lm_to_hf(str(tmp_path / 'base'), str(tmp_path / 'hf_base'))
  convert.lm_to_hf(str(tmp_path / 'run'), str(tmp_path / 'hf_merged'))
  base, merged = _tensors(tmp_path / 'hf_base'), _tensors(tmp_path / 'hf_merged')
  adapter = _tensors(tmp_path / 'adapter')
  for name in [n for n in base if n.endswith('_proj.weight')]:
    prefix = 'base_model.model.' + name.removesuffix('.weight')
    update = adapter[prefix + '.lora_B.weight'] @ adapter[prefix + '.lora_A.weight']
    np.testing.assert_allclose(merged[name], base[name] + 2.0 * update, atol=1e-6, err_msg=name)

  peft = require('peft')
  model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / 'hf_base'))
  model = peft.PeftModel.from_pretrained(model, str(tmp_path / 'adapter')).eval()
  tokens = np.random.default_rng(3).integers(0, 400, (2, 24))
  with torch.no_grad():
    got = model(torch.from_numpy(tokens)).logits.numpy()
  want = np.asarray(_forward(cfg)(params, jnp.asarray(tokens)))
  diff = np.abs(got - want).max()
  print(f'lm LoRA adapters -> PEFT, not merged: max |logit diff| = {diff:.2e}')
  assert diff < TOL


@pytest.mark.parametrize('trainable, lora_settings, message', [
    ('lora,embeddings', dict(rank=2, targets='q'), 'trained more than the LoRA adapters'),
    ('all', {}, 'no adapters to export'),
])
def test_peft_export_refuses_what_adapters_cannot_carry(tokenizer, tmp_path, trainable,
                                                        lora_settings, message):
  _lm_run(tmp_path / 'run', tokenizer, trainable=trainable, **lora_settings)
  with pytest.raises(ValueError, match=message):
    convert.lm_to_peft(str(tmp_path / 'run'), str(tmp_path / 'adapter'))
  _assert_nothing_written(str(tmp_path / 'adapter'))


# ---------------------------------------------------------------------------------------------
# Errors: each names what is wrong, and nothing is written.


def _hf_copy(src, dst, config=None, tensors=None) -> str:
  """A copy of an HF directory with config.json fields and the tensors replaced."""
  os.makedirs(dst)
  with open(os.path.join(src, 'config.json')) as f:
    values = {**json.load(f), **(config or {})}
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(values, f)
  save_file(_tensors(src) if tensors is None else tensors, os.path.join(dst, 'model.safetensors'),
            metadata={'format': 'pt'})
  return str(dst)


@pytest.mark.parametrize('field, value', [
    ('hidden_act', 'gelu'), ('rope_scaling', {'rope_type': 'linear', 'factor': 2.0}),
    ('rope_parameters', {'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0}),
    ('attention_bias', True), ('mlp_bias', True), ('head_dim', 32), ('model_type', 'gpt2'),
    ('sliding_window', 4096)])
def test_unsupported_config_is_refused(case, tmp_path, field, value):
  hf = _hf_copy(case('mha')['hf'], tmp_path / 'hf', config={field: value})
  with pytest.raises(ValueError, match=f'config.json: {field}='):
    convert.hf_to_lm(hf, str(tmp_path / 'out'))
  _assert_nothing_written(str(tmp_path / 'out'))


def _edited(case, edit):
  tensors = _tensors(case('mha')['hf'])
  edit(tensors)
  return tensors


@pytest.mark.parametrize('edit, message', [
    (lambda t: t.pop('model.layers.1.mlp.up_proj.weight'),
     r'tensor model.layers.1.mlp.up_proj.weight \(and 0 more\) is missing'),
    (lambda t: t.update({'model.layers.0.self_attn.k_proj.weight': np.zeros((16, 64), np.float32)}),
     r'model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape \(16, 64\), '
     r'expected \(64, 64\)'),
    (lambda t: t.update({'model.layers.0.self_attn.q_proj.bias': np.zeros(64, np.float32)}),
     'unexpected tensor model.layers.0.self_attn.q_proj.bias'),
])
def test_bad_tensors_are_refused(case, tmp_path, edit, message):
  hf = _hf_copy(case('mha')['hf'], tmp_path / 'hf', tensors=_edited(case, edit))
  with pytest.raises(ValueError, match=message):
    convert.hf_to_lm(hf, str(tmp_path / 'out'))
  _assert_nothing_written(str(tmp_path / 'out'))


def test_rotary_buffers_are_ignored(case, tmp_path):
  extra = {'model.layers.0.self_attn.rotary_emb.inv_freq': np.ones(8, np.float32)}
  hf = _hf_copy(case('mha')['hf'], tmp_path / 'hf',
                tensors=_edited(case, lambda t: t.update(extra)))
  assert convert.hf_to_lm(hf, str(tmp_path / 'out'))['num_params'] == (
      case('mha')['summary']['num_params'])


@pytest.mark.parametrize('scale, error', [(1.0, None), (2.0, 'lm_head.weight differs')])
def test_tied_model_with_a_stored_lm_head(case, tmp_path, scale, error):
  """Some tied checkpoints store lm_head.weight anyway: taken if it equals the embedding."""
  head = {'lm_head.weight': scale * _tensors(case('gqa_tied')['hf'])['model.embed_tokens.weight']}
  tensors = {**_tensors(case('gqa_tied')['hf']), **head}
  hf = _hf_copy(case('gqa_tied')['hf'], tmp_path / 'hf', tensors=tensors)
  if error:
    with pytest.raises(ValueError, match=error):
      convert.hf_to_lm(hf, str(tmp_path / 'out'))
    _assert_nothing_written(str(tmp_path / 'out'))
  else:
    convert.hf_to_lm(hf, str(tmp_path / 'out'))
    assert 'unembed' not in checkpoint_lib.params_shapes(str(tmp_path / 'out'))


def test_parse_size():
  assert convert.parse_size('5GB') == 5 * 10**9
  assert convert.parse_size('2GiB') == 2 * 2**30
  assert convert.parse_size('1.5MB') == 1_500_000
  assert convert.parse_size(1000) == convert.parse_size('1000') == 1000
  with pytest.raises(ValueError, match='max_shard_size=.5 parsecs'):
    convert.parse_size('5 parsecs')


def test_missing_files_and_nonempty_out_are_refused(case, tmp_path):
  c = case('mha')
  with pytest.raises(ValueError, match='has no config.json'):
    convert.hf_to_lm(str(tmp_path), str(tmp_path / 'out'))
  os.makedirs(tmp_path / 'empty')
  shutil.copyfile(os.path.join(c['hf'], 'config.json'), tmp_path / 'empty' / 'config.json')
  with pytest.raises(ValueError, match=r'holds no \*.safetensors'):
    convert.hf_to_lm(str(tmp_path / 'empty'), str(tmp_path / 'out'))
  _assert_nothing_written(str(tmp_path / 'out'))
  for out in ('full_lm', 'full_hf'):
    os.makedirs(tmp_path / out)
    (tmp_path / out / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='full_lm already exists and is not empty'):
    convert.hf_to_lm(c['hf'], str(tmp_path / 'full_lm'))
  with pytest.raises(FileExistsError, match='full_hf already exists and is not empty'):
    convert.lm_to_hf(c['lm'], str(tmp_path / 'full_hf'))
  assert os.listdir(tmp_path / 'full_lm') == os.listdir(tmp_path / 'full_hf') == ['keep.txt']


def test_a_tokenizer_model_that_is_not_sentencepiece_is_left_out(tmp_path):
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  (hf_dir / 'tokenizer.model').write_text('IQ== 0\nIg== 1\n')  # Llama-3's tiktoken format.
  assert convert._sentencepiece_model(str(hf_dir / 'tokenizer.model')) is None
  assert convert._sentencepiece_model(str(hf_dir / 'absent.model')) is None
