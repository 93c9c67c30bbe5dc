"""Weight-only quantization: int8 and packed int4 with per-channel or group-wise scales, errors
within half a step, logits close to fp32, fake_quantize as the same quantizer with a straight-
through gradient, a quantized checkpoint that loads everywhere, and errors that name the flag."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import data as data_lib
from lm import engine as engine_lib
from lm import generate
from lm import lora
from lm import model as model_lib
from lm import quantize
from lm import tokenizer as tokenizer_lib
from lm import vocab

import loop_config

SMALL = model_lib.ModelConfig(
    vocab_size=97, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96,
    max_seq_len=64, scan_layers=True)
# The checkpoints' model: 400 pieces for the tokenizer, inputs of 32 (D, H x Q) and 64 (F).
CFG = model_lib.ModelConfig(vocab_size=400, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            d_ff=64, max_seq_len=64, dtype='float32')
_quantize = jax.jit(quantize.quantize, static_argnames=('bits', 'group_size', 'include_embed'))
_dequantize = jax.jit(quantize.dequantize)


def _random_params(cfg, seed=0):
  """Params of cfg drawn from N(0, 0.02^2) as init draws them (ones for vectors), quicker than
  compiling init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (rng.normal(0, 0.02, x.shape) if x.ndim > 1 else np.ones(x.shape)).astype(x.dtype),
      jax.eval_shape(lambda: model_lib.init_params(cfg, 0)))


def _relative(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# The quantizer.


def test_scales_are_per_output_channel_or_group_and_round_trip_within_half_a_step():
  w_LDHQ = jax.random.normal(jax.random.key(0), (2, 8, 3, 4))
  for bits, group_size, scale_shape, values_shape in [
      (8, 0, (2, 1, 3, 4), (2, 8, 3, 4)),  # One scale per (L, H, Q).
      (8, 4, (2, 2, 3, 4), (2, 8, 3, 4)),  # Two groups of 4 of the 8 inputs.
      (4, 0, (2, 1, 3, 4), (2, 8, 3, 2)),  # Two values per byte along Q.
      (4, 2, (2, 4, 3, 4), (2, 8, 3, 2))]:
    tree = quantize.quantize({'blocks': {'attention': {'w_q': w_LDHQ}}}, bits, group_size)
    q = tree['blocks']['attention']['w_q']
    values = q[f'int{bits}']
    assert values.dtype == jnp.int8 and values.shape == values_shape
    assert q['scale'].shape == scale_shape
    unpacked = values if bits == 8 else quantize.unpack_int4(values, 3, 4)
    qmax = quantize.QMAX[bits]
    blocks = np.abs(np.asarray(unpacked)).reshape(2, scale_shape[1], -1, 3, 4)
    assert (blocks.max(2) == qmax).all()  # Each block's largest weight maps to qmax.
    deq = quantize.dequantize(q)
    expanded = np.repeat(np.asarray(q['scale']), 8 // scale_shape[1], axis=1)
    assert bool(jnp.all(jnp.abs(deq - w_LDHQ) <= expanded / 2 + 1e-7)), (bits, group_size)
    np.testing.assert_array_equal(quantize.dequantize(tree)['blocks']['attention']['w_q'], deq)


def test_groups_are_consecutive_inputs_and_a_group_that_does_not_fit_names_the_weight():
  w_LHQD = np.random.default_rng(0).normal(size=(1, 4, 8, 16)).astype(np.float32)
  inputs_LID = w_LHQD.reshape(1, 32, 16)  # w_o contracts H x Q = 32 inputs, in this order.
  for group_size, scale_shape in [(4, (1, 4, 2, 16)), (16, (1, 2, 1, 16)), (32, (1, 1, 1, 16))]:
    q = quantize.quantize({'blocks': {'attention': {'w_o': w_LHQD}}}, 4, group_size)
    scale = q['blocks']['attention']['w_o']['scale']
    assert scale.shape == scale_shape
    absmax = np.abs(inputs_LID.reshape(1, 32 // group_size, group_size, 16)).max(2)
    np.testing.assert_allclose(np.asarray(scale).reshape(1, -1, 16), absmax / 7, rtol=1e-6)
  with pytest.raises(ValueError, match=r"group_size=12: params\['blocks'\]\['attention'\]"
                                       r"\['w_o'\] contracts 32 inputs per output"):
    quantize.quantize({'blocks': {'attention': {'w_o': w_LHQD}}}, 8, 12)
  with pytest.raises(ValueError, match=r"group_size=4: .*'w_o'\] contracts 4 x 6 inputs .*"
                                       r'straddle its axis of 6'):
    quantize.quantize({'blocks': {'attention': {'w_o': np.ones((1, 4, 6, 8))}}}, 8, 4)
  with pytest.raises(ValueError, match=r'bits=3: expected one of \(8, 4\)'):
    quantize.quantize({}, bits=3)


def test_int4_packs_two_values_per_byte_and_unpacks_them_exactly():
  values = np.tile(np.arange(-8, 8, dtype=np.int8), 3)[:45].reshape(3, 15)  # Odd: padded.
  for axis in (0, 1):
    packed = jax.jit(quantize.pack_int4, static_argnums=1)(values, axis)
    assert packed.dtype == jnp.int8 and packed.shape[axis] == (values.shape[axis] + 1) // 2
    unpacked = jax.jit(quantize.unpack_int4, static_argnums=(1, 2))(packed, axis,
                                                                    values.shape[axis])
    np.testing.assert_array_equal(unpacked, values)
  np.testing.assert_array_equal(quantize.pack_int4(np.array([[-7], [7]], np.int8), 0),
                                [[0x79]])  # 7 << 4 | (-7 & 0xF) = 0x79.


def test_quantized_matrices_take_a_quarter_or_an_eighth_of_the_bytes_and_the_rest_is_untouched():
  params = _random_params(SMALL)
  qparams = _quantize(params)
  blocks = qparams['blocks']
  assert blocks['mlp']['w_down']['scale'].shape == (2, 1, 64)  # [L, F, D]: one per (L, D).
  assert blocks['attention']['w_o']['scale'].shape == (2, 1, 1, 64)  # [L, H, Q, D].
  # Embeddings only with include_embed=True; norms never.
  np.testing.assert_array_equal(qparams['embed'], params['embed'])
  np.testing.assert_array_equal(qparams['final_norm']['scale'], params['final_norm']['scale'])
  names = [('attention', 'w_q'), ('attention', 'w_k'), ('attention', 'w_v'), ('attention', 'w_o'),
           ('mlp', 'w_up'), ('mlp', 'w_gate'), ('mlp', 'w_down')]
  fp32 = sum(quantize.num_bytes(params['blocks'][m][w]) for m, w in names)
  fp32 += quantize.num_bytes(params['unembed'])

  def matrix_bytes(q):
    return (sum(quantize.num_bytes(q['blocks'][m][w]) for m, w in names)
            + quantize.num_bytes(q['unembed']))
  assert 0.25 <= matrix_bytes(qparams) / fp32 < 0.27  # int8 values plus fp32 per-channel scales.
  int4 = _quantize(params, bits=4)
  assert int4['blocks']['mlp']['w_up']['int4'].shape == (2, 64, 48)  # [L, D, F / 2] bytes.
  assert int4['unembed']['int4'].shape == (64, 49)  # V = 97: padded to 98, 49 bytes.
  assert 0.125 <= matrix_bytes(int4) / fp32 < 0.145
  assert 0.125 + 1 / 32 <= matrix_bytes(_quantize(params, bits=4, group_size=32)) / fp32 < 0.175
  with_embed = _quantize(params, include_embed=True)
  assert with_embed['embed']['scale'].shape == (97, 1)  # One per vocabulary row.
  assert quantize.num_bytes(with_embed) < 0.3 * quantize.num_bytes(params)


def test_quantized_logits_are_close_to_fp32_and_equal_the_dequantized_models():
  """Relative logit error ||q - fp32|| / ||fp32|| of a random model: int8 < 2%, int4 < 20%
  (about 13% at these widths), and int4's groups of 16 closer than one scale per channel. Tied
  embeddings quantize per vocabulary row, which serves the lookup and the unembedding."""
  for tie_embeddings, variants in ((False, [(8, 0)]), (True, [(8, 0), (4, 0), (4, 16)])):
    cfg = dataclasses.replace(SMALL, tie_embeddings=tie_embeddings)
    graphdef, params = model_lib.graphdef(cfg), _random_params(cfg)
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    forward = jax.jit(model_lib.apply, static_argnums=0)
    fp32_BTV = forward(graphdef, params, tokens_BT)
    errors = {}
    for bits, group_size in variants:
      qparams = _quantize(params, bits=bits, group_size=group_size, include_embed=True)
      logits_BTV = jax.jit(quantize.apply, static_argnums=0)(graphdef, qparams, tokens_BT)
      errors[bits, group_size] = _relative(logits_BTV, fp32_BTV)
      if bits == 4 and group_size:
        np.testing.assert_array_equal(logits_BTV,
                                      forward(graphdef, _dequantize(qparams), tokens_BT))
    assert errors[8, 0] < 0.02, errors
    if tie_embeddings:
      assert errors[4, 0] < 0.2 and errors[4, 16] < errors[4, 0], errors


def test_fake_quantize_is_the_same_quantizer_with_a_straight_through_gradient():
  w_DF = jax.random.normal(jax.random.key(2), (16, 6))
  cotangent_DF = jax.random.normal(jax.random.key(3), (16, 6))
  for bits, group_size in [(8, 0), (4, 0), (4, 8)]:
    fake = jax.jit(quantize.fake_quantize, static_argnums=(1, 2, 3))(w_DF, bits, group_size, (0,))
    stored = quantize.quantize_array(w_DF, (0,), bits, group_size)
    np.testing.assert_array_equal(fake, quantize.dequantize_array(stored))
    assert not np.array_equal(fake, w_DF)
    grad = jax.grad(lambda w, b=bits, g=group_size: jnp.sum(
        quantize.fake_quantize(w, b, g, (0,)) * cotangent_DF))(w_DF)
    np.testing.assert_array_equal(grad, cotangent_DF)  # d fake / d w = 1.


# ---------------------------------------------------------------------------------------------
# Checkpoints and the command.


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tokenizer') / 'spm.model')
  texts = list(data_lib.iter_documents('stdlib', max_chars=60_000))
  tokenizer_lib.train_tokenizer(texts, CFG.vocab_size, path, max_chars=60_000, seed=0)
  return path


def _save_checkpoint(directory, cfg, params, tokenizer_path, **config_overrides):
  """A checkpoint as lm.vocab and lm.convert write one: params/, config.json, tokenizer.model."""
  config = config_lib.base_config()
  config.model.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                       if f.name in config.model})
  config.data.seq_len = 16
  for field, value in config_overrides.items():
    section, key = field.split('.')
    config[section][key] = value
  config.init_from = str(directory)
  config.data.tokenizer = os.path.join(directory, 'tokenizer.model')
  checkpoint_lib.save_params(str(directory), params)
  vocab.write_checkpoint_config(str(directory), config)
  with open(tokenizer_path, 'rb') as src, open(config.data.tokenizer, 'wb') as dst:
    dst.write(src.read())
  return str(directory)


@pytest.fixture(scope='module')
def source(tokenizer_path, tmp_path_factory):
  """(checkpoint directory, its params)."""
  params = _random_params(CFG)
  return _save_checkpoint(tmp_path_factory.mktemp('source'), CFG, params, tokenizer_path), params


@pytest.fixture(scope='module')
def quantized(source, tmp_path_factory):
  """`python -m lm.quantize --bits 4 --group_size 16` of source: (its directory, the params)."""
  out = tmp_path_factory.mktemp('quantized') / 'int4'
  quantize.main(['--checkpoint', source[0], '--bits', '4', '--group_size', '16',
                 '--out', str(out)])
  return str(out), _quantize(source[1], bits=4, group_size=16)


def test_the_command_writes_int4_weights_that_round_trip_and_halve_the_int8_bytes(
    source, quantized):
  out, expected = quantized
  assert sorted(os.listdir(out)) == ['checkpoints', 'config.json', 'config.py',
                                     'quantize_report.json', 'tokenizer.model']
  stored = checkpoint_lib.params_shapes(out, keep_quantized=True)
  assert stored['blocks']['mlp']['w_up']['int4'].shape == (1, 32, 32)  # [L, D, F / 2] bytes.
  assert stored['blocks']['mlp']['w_up']['scale'].shape == (1, 2, 64)  # Groups of 16 of D = 32.
  assert checkpoint_lib.params_shapes(out)['blocks']['mlp']['w_up'].shape == (1, 32, 64)
  report = json.loads(open(os.path.join(out, 'quantize_report.json')).read())
  assert report['bits'] == 4 and report['group_size'] == 16 and not report['lora_merged']
  leaves = report['report']['leaves']
  assert sorted(leaves) == sorted([f'blocks/{m}/{w}' for m, w in [
      ('attention', 'w_q'), ('attention', 'w_k'), ('attention', 'w_v'), ('attention', 'w_o'),
      ('mlp', 'w_up'), ('mlp', 'w_gate'), ('mlp', 'w_down')]] + ['unembed'])
  w_up = leaves['blocks/mlp/w_up']
  assert w_up['bytes_before'] == 32 * 64 * 4 and w_up['bytes_after'] == 32 * 32 + 2 * 64 * 4
  error = np.abs(source[1]['blocks']['mlp']['w_up'] - quantize.dequantize(
      expected['blocks']['mlp']['w_up']))
  assert w_up['max_abs_error'] == pytest.approx(float(error.max()), rel=1e-5)
  assert 0 < w_up['max_abs_error'] <= w_up['max_half_step'] + 1e-6
  assert report['matrix_bytes_after'] < 0.2 * report['matrix_bytes_before']
  # The stored bytes: int4 takes half of int8's for the values.
  int8 = os.path.join(os.path.dirname(out), 'int8')
  quantize.main(['--checkpoint', source[0], '--bits', '8', '--group_size', '16', '--out', int8])
  int8_bytes = checkpoint_lib.params_shapes(int8, keep_quantized=True)['blocks']['mlp']['w_up']
  assert int8_bytes['int8'].shape == (1, 32, 64)
  assert json.loads(open(os.path.join(int8, 'quantize_report.json')).read())[
      'matrix_bytes_after'] > report['matrix_bytes_after'] * 1.5


def test_a_quantized_checkpoint_samples_serves_scores_and_starts_runs(source, quantized):
  out, expected = quantized
  dequantized = _dequantize(expected)
  graphdef, loaded, tokenizer, config = generate.load_checkpoint(out, dtype='float32',
                                                                 keep_quantized=True)
  w_q = loaded['blocks']['attention']['w_q']
  assert isinstance(w_q, quantize.QuantizedArray) and w_q.values.dtype == jnp.int8
  assert config.init_from == out and tokenizer.path == os.path.join(out, 'tokenizer.model')
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(quantize.dequantize(loaded)),
               dequantized)
  tokens_BT = np.array([[1, 5, 9, 14, 3, 7]], np.int32)
  forward = jax.jit(model_lib.apply, static_argnums=0)
  logits_BTV = forward(graphdef, loaded, tokens_BT)
  assert _relative(logits_BTV, forward(graphdef, source[1], tokens_BT)) < 0.2
  np.testing.assert_array_equal(logits_BTV, forward(graphdef, dequantized, tokens_BT))

  # --config OUT/config.json --config.mode=sample --workdir OUT: greedy, as the float weights.
  sample_config = config_lib.config_from_json(os.path.join(out, 'config.json'))
  sample_config.mode = 'sample'
  sample_config.sample.update(prompt='def read', temperature=0.0, max_new_tokens=8)
  config_lib.validate(sample_config)
  [(_, [completion])] = generate.sample_from_config(sample_config, out)
  [float_completion] = generate.sample(graphdef, dequantized, ['def read'], tokenizer=tokenizer,
                                       max_new_tokens=8, temperature=0.0)
  assert completion.tokens == float_completion.tokens
  np.testing.assert_allclose(completion.logprobs, float_completion.logprobs, atol=1e-5)
  _, sampled, _ = generate.load(config_lib.base_config(), out, keep_quantized=True)
  assert isinstance(sampled['unembed'], quantize.QuantizedArray)

  # lm.engine on the quantized params: what generate.sample gives on the float weights.
  cfg = quantize.config_of(graphdef, loaded)
  prompt = [tokenizer.bos_id] + tokenizer.encode('def read')
  [served] = engine_lib.Engine(cfg, loaded, slots=2, block_size=8).run(
      [engine_lib.Request(prompt=prompt, max_new_tokens=8)])
  assert served.tokens[:len(completion.tokens)] == float_completion.tokens
  np.testing.assert_allclose(served.logprobs[:len(completion.tokens)], float_completion.logprobs,
                             atol=1e-5)

  # lm.eval's checkpoint=OUT.
  from lm.eval import scoring  # pylint: disable=g-import-not-at-top
  scorer = scoring.Scorer.load(out, dtype='float32', progress=False)
  assert isinstance(scorer.params['blocks']['mlp']['w_down'], quantize.QuantizedArray)
  [(loglikelihood, _)] = scorer.loglikelihood([([1, 5, 9, 14], [3, 7])])
  logprobs_TV = jax.nn.log_softmax(forward(graphdef, dequantized, tokens_BT)[0])
  np.testing.assert_allclose(loglikelihood, logprobs_TV[3, 3] + logprobs_TV[4, 7], rtol=1e-5)

  # config.init_from=OUT: lm.train restores the float weights the quantized ones stand for.
  from lm import train  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(lambda: model_lib.init_params(CFG, 0))
  restored = checkpoint_lib.restore_params(out, train.init_from_target(out, abstract))
  assert restored['blocks']['attention']['w_o'].dtype == np.float32
  jax.tree.map(np.testing.assert_array_equal, restored, dequantized)


def test_a_lora_checkpoint_is_merged_before_quantizing(tokenizer_path, tmp_path):
  cfg = dataclasses.replace(CFG, lora_rank=2, lora_targets=('w_q', 'w_up'))
  params = _random_params(cfg)
  checkpoint = _save_checkpoint(tmp_path / 'lora', cfg, params, tokenizer_path,
                                **{'lora.rank': 2, 'lora.targets': 'q,up',
                                   'train.trainable': 'lora'})
  out = tmp_path / 'quantized'
  quantize.main(['--checkpoint', checkpoint, '--bits', '8', '--out', str(out)])
  stored = checkpoint_lib.restore_params(
      str(out), checkpoint_lib.params_shapes(str(out)), keep_quantized=True)
  assert 'w_q_lora_a' not in stored['blocks']['attention']
  jax.tree.map(np.testing.assert_array_equal, stored,
               jax.device_get(_quantize(lora.merge(params, cfg))))
  config = config_lib.config_from_json(str(out / 'config.json'))
  assert config.lora.rank == 0 and config.train.trainable == 'all'
  assert json.loads((out / 'quantize_report.json').read_text())['lora_merged']


@pytest.mark.parametrize('flags, message', [
    (['--bits', '3'], r'--bits=3: expected 8 or 4'),
    (['--group_size', '-1'], r'--group_size=-1: must be >= 0'),
    (['--checkpoint', 'MISSING'], r'--checkpoint=.*MISSING: no such directory'),
    (['--group_size', '24'],
     r"group_size=24: params\['blocks'\]\['attention'\]\['w_k'\] contracts 32 inputs"),
    (['--checkpoint', 'QUANTIZED'], r'--checkpoint=.* holds quantized weights already'),
    (['--out', 'FULL'], r'.*FULL already exists and is not empty'),
])
def test_bad_input_fails_clearly_naming_the_flag(flags, message, source, quantized, tmp_path):
  flags = flags if '--checkpoint' in flags else flags + ['--checkpoint', source[0]]
  flags = flags if '--out' in flags else flags + ['--out', str(tmp_path / 'out')]
  (tmp_path / 'FULL').mkdir()
  (tmp_path / 'FULL' / 'file').write_text('')
  paths = {'MISSING': str(tmp_path / 'MISSING'), 'QUANTIZED': quantized[0],
           'FULL': str(tmp_path / 'FULL')}
  with pytest.raises(SystemExit, match=f'^python -m lm.quantize: error: {message}'):
    quantize.main([paths.get(f, f) for f in flags])
  assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------
# Quantization-aware training (config.qat).


def test_qat_trains_through_the_quantizer_and_evaluates_what_ptq_of_its_weights_computes(
    tmp_path, stdlib_tokenizer):
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  config = loop_config.small_run(stdlib_tokenizer, steps=8, eval_every=8, checkpoint_every=8)
  config.qat.update(bits=4, group_size=32)
  state, metrics = train_lib.train(config, str(tmp_path))
  run = train_lib.setup(config)
  # The gradient is straight-through: the float model's gradient at the quantized weights.
  batch = jax.tree.map(jnp.asarray, next(iter(train_lib.make_data(run, str(tmp_path)).train_iter)))
  float_objective = train_lib.mode_objective(config, run.graphdef)
  fake = quantize.fake_quantize_params(state.params, bits=4, group_size=32)
  qat_grads = jax.grad(lambda p: run.objective.sums(p, batch, None)[0])(state.params)
  direct = jax.grad(lambda p: float_objective.sums(p, batch, None)[0])(fake)
  for a, b in zip(jax.tree.leaves(qat_grads), jax.tree.leaves(direct)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Its held-out loss is that of its weights quantized after training, as lm.quantize does.
  data = train_lib.make_data(run, str(tmp_path))
  ptq = quantize.dequantize(quantize.quantize(state.params, bits=4, group_size=32))
  held_out = train_lib.evaluate(jax.jit(float_objective.eval_sums), ptq,
                                data.eval_batches(config.train.eval_batches), data.token_bytes)
  np.testing.assert_allclose(held_out['eval_loss'], metrics['eval_loss'], rtol=1e-5)
  bad = loop_config.small_run(stdlib_tokenizer)
  bad.qat.update(bits=4, group_size=48)
  with pytest.raises(config_lib.ConfigError, match=r"config.qat: group_size=48: "
                     r"params\['blocks'\]\['attention'\]\['w_k'\] contracts 64 inputs"):
    train_lib.setup(bad)
  bad.qat.update(bits=3, group_size=0)
  with pytest.raises(config_lib.ConfigError, match='config.qat.bits=3'):
    config_lib.validate(bad)
