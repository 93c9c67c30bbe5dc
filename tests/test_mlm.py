"""The encoder and its masked-LM objective (lm/mlm.py, model.kind='encoder' in lm/model.py)."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import mlm
from lm import model as model_lib
from lm import tokenizer as tokenizer_lib
from lm import train as train_lib

import loop_config

DECODER = model_lib.ModelConfig(
    vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
    max_seq_len=32, attention='einsum')
ENCODER = dataclasses.replace(DECODER, kind='encoder')
RATES = dict(mask_rate=0.15, mask_token_rate=0.8, random_token_rate=0.1)


@functools.cache
def _params():
  """Fresh parameters, the same for every kind and attention kernel (neither adds any)."""
  return jax.jit(model_lib.init_params, static_argnums=(0, 1))(DECODER, 0)


@functools.cache
def _model(cfg):
  """(jitted apply(params, tokens, segment_ids=None, positions=None), params) of cfg's model."""
  return jax.jit(functools.partial(model_lib.apply, model_lib.graphdef(cfg))), _params()


def _rows(B, T, vocab_size, seed=0):
  """Random tokens in [5, vocab_size) and segment ids: two documents per row, then padding (0)
  over a random tail."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, vocab_size, (B, T)).astype(np.int32)
  segment_ids = np.ones((B, T), np.int32)
  for b in range(B):
    split, end = rng.integers(1, T // 2), rng.integers(T // 2, T + 1)
    segment_ids[b, split:] = 2
    segment_ids[b, end:] = 0
  return jnp.asarray(tokens), jnp.asarray(segment_ids)


# ---------------------------------------------------------------------------------------------
# Masking.


def test_masking_fractions_padding_and_determinism():
  V, mask_id = 1000, 4
  tokens, segment_ids = _rows(256, 256, V)
  candidates = segment_ids > 0
  corrupt = jax.jit(lambda rng, tokens, candidates: mlm.mask_tokens(
      rng, tokens, candidates, mask_id=mask_id, vocab_size=V, **RATES))
  inputs, selected = map(np.asarray, corrupt(jax.random.key(3), tokens, candidates))
  tokens, candidates = np.asarray(tokens), np.asarray(candidates)

  assert not (selected & ~candidates).any()  # Padding is never selected...
  np.testing.assert_array_equal(inputs[~selected], tokens[~selected])  # ...nor anything unselected.
  n, k = candidates.sum(), selected.sum()
  assert abs(k / n - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n), (k, n)
  masked = (inputs == mask_id) & selected
  randomised = (inputs != mask_id) & (inputs != tokens) & selected
  kept = (inputs == tokens) & selected
  assert masked.sum() + randomised.sum() + kept.sum() == k
  # A random id equals the original with probability 1 / V, and is the mask id with 1 / V.
  for count, share in [(masked.sum(), 0.8 + 0.1 / V), (randomised.sum(), 0.1 * (1 - 2 / V)),
                       (kept.sum(), 0.1 + 0.1 / V)]:
    assert abs(count / k - share) < 4 * np.sqrt(share * (1 - share) / k), (count, k, share)
  assert (inputs[randomised] < V).all() and (inputs[randomised] >= 0).all()

  # Deterministic for a key; another key masks elsewhere; a row's masks do not depend on the
  # rows after it (each row's draws come from its own index).
  again = map(np.asarray, corrupt(jax.random.key(3), tokens, candidates))
  for a, b in zip(again, (inputs, selected)):
    np.testing.assert_array_equal(a, b)
  other = np.asarray(corrupt(jax.random.key(4), tokens, candidates)[1])
  assert (other != selected).mean() > 0.1
  head_inputs, head_selected = corrupt(jax.random.key(3), tokens[:5], candidates[:5])
  np.testing.assert_array_equal(head_inputs, inputs[:5])
  np.testing.assert_array_equal(head_selected, selected[:5])


def test_mlm_loss_equals_a_direct_computation_on_constructed_logits(monkeypatch):
  B, T, V = 4, 64, 50
  tokens, segment_ids = _rows(B, T, V, seed=1)
  logits = jax.random.normal(jax.random.key(7), (B, T, V)) * 3
  seen = {}

  def fake_apply(graphdef, params, inputs_BT, segment_ids_BT, positions_BT, dropout_rng=None):
    seen['inputs'] = inputs_BT
    return logits, {}

  monkeypatch.setattr(model_lib, 'apply_with_aux', fake_apply)
  config = config_lib.base_config()
  batch = dict(inputs=tokens, segment_ids=segment_ids, positions=jnp.zeros_like(tokens))
  rng = jax.random.key(11)
  objective, sums, _ = mlm.loss_sums(None, batch, rng, graphdef=None, mask_id=4, vocab_size=V,
                                     mlm=config.mlm)

  inputs, selected = mlm.mask_tokens(
      jax.random.fold_in(rng, mlm._MASK_STREAM), tokens, segment_ids > 0, mask_id=4,
      vocab_size=V, **RATES)
  np.testing.assert_array_equal(seen['inputs'], inputs)  # The model reads the corrupted row.
  logits_np, tokens_np, selected = np.asarray(logits, np.float64), np.asarray(tokens), np.asarray(selected)
  log_z = np.log(np.exp(logits_np).sum(-1))
  nll = log_z - np.take_along_axis(logits_np, tokens_np[..., None], -1)[..., 0]
  assert sums['tokens'] == selected.sum() > 0
  np.testing.assert_allclose(sums['nll'], nll[selected].sum(), rtol=1e-5)
  np.testing.assert_allclose(objective, nll[selected].sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['mlm_accuracy'],
                             (logits_np.argmax(-1) == tokens_np)[selected].sum())
  report = mlm.report({**jax.device_get(sums), 'bytes': 100.0}, 'eval')
  np.testing.assert_allclose(report['eval_loss'], nll[selected].mean(), rtol=1e-5)
  np.testing.assert_allclose(report['eval_bits_per_byte'],
                             nll[selected].sum() / np.log(2) / 100.0, rtol=1e-5)
  np.testing.assert_allclose(report['eval_mlm_accuracy'],
                             (logits_np.argmax(-1) == tokens_np)[selected].mean())


# ---------------------------------------------------------------------------------------------
# The encoder: bidirectional within a document.


@pytest.mark.parametrize('cfg', [ENCODER, dataclasses.replace(ENCODER, attention='xla'),
                                 dataclasses.replace(DECODER, attention='auto')],
                         ids=['encoder-einsum', 'encoder-xla', 'decoder-auto'])
def test_encoder_sees_later_tokens_and_the_decoder_never_does(cfg):
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 5, 97)
  later = tokens.at[:, 10].set((tokens[:, 10] + 1) % 97)
  apply, params = _model(cfg)
  before, after = apply(params, tokens), apply(params, later)
  earlier_diff = float(jnp.abs(before[:, :10] - after[:, :10]).max())
  if cfg.kind == 'encoder':
    assert earlier_diff > 1e-4, earlier_diff
  else:
    assert earlier_diff == 0.0, earlier_diff
  assert float(jnp.abs(before[:, 10:] - after[:, 10:]).max()) > 1e-4  # Both see token 10 itself.


def test_packed_documents_do_not_see_each_other_in_the_encoder():
  apply, params = _model(ENCODER)
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 5, 97)
  segment_ids = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  packed = apply(params, tokens, segment_ids, positions)
  first, second = apply(params, tokens[:, :6]), apply(params, tokens[:, 6:])
  np.testing.assert_allclose(packed[:, :6], first, atol=1e-5)
  np.testing.assert_allclose(packed[:, 6:], second, atol=1e-5)
  # The second document's first token does see its last one.
  changed = tokens.at[0, 15].set((tokens[0, 15] + 1) % 97)
  assert float(jnp.abs(apply(params, changed, segment_ids, positions)[0, 6]
                       - packed[0, 6]).max()) > 1e-4


def test_encoder_refuses_a_kv_cache():
  from lm import kv_cache
  graphdef, params = model_lib.graphdef(ENCODER), _model(ENCODER)[1]
  cache = kv_cache.init(ENCODER, batch_size=1, length=8)
  with pytest.raises(ValueError, match="kind='encoder'.*no KV cache"):
    model_lib.apply(graphdef, params, jnp.ones((1, 4), jnp.int32), cache=cache)


# ---------------------------------------------------------------------------------------------
# Config and tokenizer.


def test_config_errors_name_the_field(tmp_path):
  encoder = config_lib.load_config('configs/encoder_tiny.py')
  config_lib.validate(encoder)
  tiny = config_lib.load_config('configs/tiny.py')
  tiny.model.kind = 'encoder'  # What --config.model.kind=encoder does.
  config_lib.validate(tiny)
  assert train_lib.mode_objective(tiny, None).report is mlm.report
  assert mlm.mask_id(tiny) == tokenizer_lib.MASK_ID

  for mode in config_lib.DECODER_MODES:
    bad = config_lib.load_config('configs/encoder_tiny.py')
    bad.mode = mode
    with pytest.raises(config_lib.ConfigError, match=f"config.mode='{mode}' needs a decoder"):
      config_lib.validate(bad)
  for section, field, value, message in [
      ('model', 'kind', 'seq2seq', "config.model.kind='seq2seq'"),
      ('model', 'attention', 'blocked', "config.model.attention='blocked'"),
      ('mlm', 'mask_rate', 0.0, 'config.mlm.mask_rate=0.0'),
      ('mlm', 'random_token_rate', 0.3, 'must sum to at most 1')]:
    bad = config_lib.load_config('configs/encoder_tiny.py')
    bad[section][field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(bad)

  # A given tokenizer without [MASK] is refused, naming it and how to add the piece.
  texts = ['def f(x):\n    return x + 1\n' * 50, 'class A:\n    pass\n' * 50]
  plain = tokenizer_lib.train_tokenizer(texts, 300, str(tmp_path / 'plain.model'),
                                        max_chars=0, seed=0)
  assert plain.piece_id(tokenizer_lib.MASK_PIECE) == -1
  tiny.data.tokenizer = plain.path
  with pytest.raises(config_lib.ConfigError,
                     match=r"plain.model' has none: .*--user_defined_symbols='\[MASK\]'"):
    mlm.mask_id(tiny)
  masked = tokenizer_lib.train_tokenizer(texts, 300, str(tmp_path / 'mask.model'), max_chars=0,
                                         seed=0, user_symbols=(tokenizer_lib.MASK_PIECE,))
  tiny.data.tokenizer = masked.path
  assert mlm.mask_id(tiny) == masked.piece_id('[MASK]') == tokenizer_lib.MASK_ID
  assert masked.encode('a [MASK] b').count(tokenizer_lib.MASK_ID) == 1


# ---------------------------------------------------------------------------------------------
# Training on real text.


def _loop_config(tokenizer='', **train):
  config = loop_config.small_run(tokenizer, **{'checkpoint_every': 6, **train})
  config.model.kind = 'encoder'
  return config


@pytest.fixture(scope='module')
def mask_tokenizer(tmp_path_factory):
  """The tokenizer the pipeline trains for an encoder (data.tokenizer empty): with [MASK]."""
  workdir = str(tmp_path_factory.mktemp('encoder'))
  data_config = mlm.data_config(_loop_config(), workdir)
  tokenizer = tokenizer_lib.Tokenizer(data_config.tokenizer)
  assert data_config.tokenizer.startswith(workdir)
  assert tokenizer.piece_id(tokenizer_lib.MASK_PIECE) == tokenizer_lib.MASK_ID
  return data_config.tokenizer


def test_encoder_masked_loss_on_real_text_falls(tmp_path, mask_tokenizer):
  config = _loop_config(mask_tokenizer, steps=300, eval_every=300, checkpoint_every=300,
                        log_every=10, eval_batches=4, batch_size=16, warmup_steps=10)
  _, metrics = train_lib.train(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_rows = [r for r in rows if 'loss' in r]
  assert train_rows[0]['loss'] > 0.95 * np.log(512)  # Starts near uniform; predicting the
  # unigram distribution alone plateaus near 0.79 log(512) (4.9 nats), so context is used below.
  assert train_rows[-1]['loss'] < 0.7 * np.log(512), train_rows[-1]
  assert 0.1 < train_rows[-1]['mlm_accuracy'] < 1.0, train_rows[-1]
  assert metrics['eval_loss'] < 0.7 * np.log(512), metrics
  assert metrics['eval_mlm_accuracy'] > 0.15, metrics
  assert 0 < metrics['eval_bits_per_byte'] < metrics['eval_loss'] / np.log(2)
