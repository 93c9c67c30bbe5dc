"""Mixture of Experts (lm/moe.py and its blocks in lm/model.py): equivalences, capacity, losses."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import model as model_lib
from lm import moe as moe_lib
from lm import train as train_lib

import loop_config

DENSE = model_lib.ModelConfig(
    vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
    max_seq_len=32)
MOE = dataclasses.replace(DENSE, moe_num_experts=4, moe_top_k=2, moe_capacity_factor=1.25)


def _tokens(B=2, T=16, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, DENSE.vocab_size)


def _dense_as_one_expert(dense_params):
  """The dense model's parameters laid out as a one-expert MoE model's (router [D, 1] zeros)."""
  params = dict(dense_params)
  blocks = dict(params.pop('blocks'))
  mlp = {name: w[:, None] for name, w in blocks['mlp'].items()}  # [L, 1, ...]: one expert.
  mlp['w_router'] = jnp.zeros((DENSE.num_layers, DENSE.d_model, 1))
  params['moe_blocks'] = {**blocks, 'mlp': mlp}
  return params


@pytest.mark.parametrize('block, capacity_factor', [('llama', 1.0), ('llama', 0.0), ('gpt2', 1.0)])
def test_one_expert_top1_equals_the_dense_mlp(block, capacity_factor):
  dense = dataclasses.replace(DENSE, block=block)
  moe = dataclasses.replace(dense, moe_num_experts=1, moe_top_k=1,
                            moe_capacity_factor=capacity_factor)
  graphdef, params = model_lib.init(dense, 0)
  tokens = _tokens()
  moe_params = _dense_as_one_expert(params)
  assert jax.tree.structure(moe_params) == jax.tree.structure(model_lib.init_params(moe, 0))
  logits, aux = model_lib.apply_with_aux(model_lib.graphdef(moe), moe_params, tokens)
  np.testing.assert_allclose(logits, model_lib.apply(graphdef, params, tokens), atol=2e-6)
  np.testing.assert_array_equal(aux['dropped'], 0.0)  # Capacity C = S at factor 1.
  np.testing.assert_allclose(aux['load_balance'], 1.0, rtol=1e-6)


def test_capacity_large_enough_equals_dropless_and_small_capacity_drops():
  _, params = model_lib.init(MOE, 0)
  tokens = _tokens()
  outputs = {}
  for factor in (0.0, 2.0, 0.5):  # 2.0: C = S (every token fits); 0.5: C = S / 4.
    cfg = dataclasses.replace(MOE, moe_capacity_factor=factor)
    outputs[factor] = model_lib.apply_with_aux(model_lib.graphdef(cfg), params, tokens)
  np.testing.assert_allclose(outputs[2.0][0], outputs[0.0][0], atol=2e-6)
  np.testing.assert_array_equal(outputs[2.0][1]['dropped'], 0.0)
  assert np.all(outputs[0.5][1]['dropped'] >= 0.5)  # At most half the assignments fit.
  assert np.abs(outputs[0.5][0] - outputs[0.0][0]).max() > 1e-3


def _scaled_experts(x_EGCD):
  """Expert e multiplies its tokens by e + 1, so outputs show which expert ran."""
  return x_EGCD * (1.0 + jnp.arange(x_EGCD.shape[0]))[:, None, None, None]


def test_assignments_over_capacity_are_dropped_first_choices_first():
  S, D = 6, 3
  x_GSD = jnp.arange(1.0, 1.0 + S * D).reshape(1, S, D)
  # Tokens 0-3 choose expert 0 then expert 1; tokens 4-5 choose expert 1 then expert 0.
  experts_GSK = jnp.array([[[0, 1]] * 4 + [[1, 0]] * 2])
  weights_GSK = jnp.array([[[0.75, 0.25]] * S])
  mask_GS = jnp.ones((1, S), bool)
  # C = ceil(capacity_factor * top_k * S / E) = ceil(2/3 * 2 * 6 / 2) = 4 slots per expert.
  assert moe_lib.capacity(2 / 3, 2, S, 2) == 4
  out_GSD, kept_GSK = moe_lib.capacity_moe(
      x_GSD, weights_GSK, experts_GSK, mask_GS, _scaled_experts, num_experts=2,
      capacity_factor=2 / 3, dtype=jnp.float32)
  # Expert 0: first choices of tokens 0-3 fill its 4 slots; tokens 4-5's second choices drop.
  # Expert 1: first choices of tokens 4-5, then second choices of tokens 0-1; 2-3's drop.
  np.testing.assert_array_equal(kept_GSK[0], [[1, 1], [1, 1], [1, 0], [1, 0], [1, 0], [1, 0]])
  expected = np.asarray(x_GSD[0]) * np.array(
      [[0.75 * 1 + 0.25 * 2]] * 2 + [[0.75 * 1]] * 2 + [[0.75 * 2]] * 2)
  np.testing.assert_allclose(out_GSD[0], expected, rtol=1e-6)


def test_padding_takes_no_capacity_and_no_share_of_the_statistics():
  S, D = 4, 2
  x_GSD = jnp.ones((1, S, D))
  experts_GSK = jnp.zeros((1, S, 1), jnp.int32)
  weights_GSK = jnp.ones((1, S, 1))
  mask_GS = jnp.array([[False, True, True, True]])
  out_GSD, kept_GSK = moe_lib.capacity_moe(  # C = ceil(1.5 * 4 / 2) = 3.
      x_GSD, weights_GSK, experts_GSK, mask_GS, _scaled_experts, num_experts=2,
      capacity_factor=1.5, dtype=jnp.float32)
  np.testing.assert_array_equal(kept_GSK[0, :, 0], [False, True, True, True])
  np.testing.assert_array_equal(out_GSD[0, :, 0], [0, 1, 1, 1])
  x_BTD = jax.random.normal(jax.random.key(0), (1, S, D))
  w_DE = jax.random.normal(jax.random.key(1), (D, 2))
  _, _, aux = moe_lib.route(x_BTD, w_DE, 1, mask_GS)
  _, _, aux_real = moe_lib.route(x_BTD[:, 1:], w_DE, 1, mask_GS[:, 1:])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), aux, aux_real)


@pytest.mark.parametrize('top_k, capacity_factor', [(1, 1.25), (2, 0.0)])
def test_the_router_gets_gradients(top_k, capacity_factor):
  cfg = dataclasses.replace(MOE, moe_top_k=top_k, moe_capacity_factor=capacity_factor,
                            moe_load_balance_loss=0.0, moe_router_z_loss=0.0)
  graphdef, params = model_lib.init(cfg, 0)
  tokens = _tokens()
  grads = jax.grad(lambda p: jnp.mean(model_lib.apply(graphdef, p, tokens) ** 2))(params)
  router = grads['moe_blocks']['mlp']['w_router']
  assert np.all(np.abs(router).reshape(cfg.num_layers, -1).max(-1) > 1e-7)


def test_load_balance_loss_is_one_when_uniform_and_num_experts_when_collapsed():
  E, D, N = 4, 8, 64
  x_BTD = jax.nn.one_hot(jnp.arange(N) % E, D)[None] * 20.0  # Token n strongly prefers n % E.
  w_DE = jnp.eye(D, E)
  mask = jnp.ones((1, N), bool)
  _, experts, aux = moe_lib.route(x_BTD, w_DE, 1, mask)
  np.testing.assert_allclose(aux['expert_share'], 0.25)
  np.testing.assert_allclose(aux['load_balance'], 1.0, atol=1e-6)
  _, _, collapsed = moe_lib.route(jnp.zeros_like(x_BTD).at[..., 0].set(20.0), w_DE, 1, mask)
  np.testing.assert_allclose(collapsed['load_balance'], E, rtol=1e-6)
  # Against the formula written out: E * sum_e f_e * P_e, and mean logsumexp^2.
  x = jax.random.normal(jax.random.key(2), (2, 16, D))
  w = jax.random.normal(jax.random.key(3), (D, E))
  _, experts, aux = moe_lib.route(x, w, 2, jnp.ones((2, 16), bool))
  logits = np.einsum('btd,de->bte', np.asarray(x, np.float64), np.asarray(w, np.float64))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  share = np.array([(np.asarray(experts) == e).sum() for e in range(E)]) / (32 * 2)
  np.testing.assert_allclose(aux['load_balance'], E * np.sum(share * probs.mean((0, 1))),
                             rtol=1e-5)
  log_z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(aux['router_z'], np.mean(log_z ** 2), rtol=1e-5)


@pytest.mark.parametrize('variant', [{'remat': True}, {'scan_layers': True, 'remat': True}])
def test_execution_variants_match(variant):
  cfg = dataclasses.replace(MOE, num_layers=4, moe_every_n_layers=2)
  graphdef, params = model_lib.init(cfg, 0)
  assert set(params) >= {'blocks', 'moe_blocks'}
  assert params['blocks']['mlp']['w_up'].shape[0] == 2  # Layers 0 and 2 dense, 1 and 3 MoE.
  other = model_lib.graphdef(dataclasses.replace(cfg, **variant))
  tokens = _tokens()

  def loss(graphdef, params):
    logits, aux = model_lib.apply_with_aux(graphdef, params, tokens)
    return jnp.mean(logits ** 2) + aux['loss'].mean()

  np.testing.assert_allclose(loss(graphdef, params), loss(other, params), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
               jax.grad(loss, argnums=1)(graphdef, params),
               jax.grad(loss, argnums=1)(other, params))


def test_layer_order_interleaves_dense_and_moe_blocks():
  cfg = dataclasses.replace(MOE, num_layers=4, moe_every_n_layers=2)
  assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
  graphdef, params = model_lib.init(cfg, 0)
  tokens = _tokens()
  # Zeroing the MoE blocks' output projections leaves them as identity MLPs: the result is then
  # the dense blocks' alone, in order, which a dense model with those blocks reproduces.
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed['moe_blocks']['mlp']['w_down'] = jnp.zeros_like(params['moe_blocks']['mlp']['w_down'])
  dense = dataclasses.replace(DENSE, num_layers=4)
  interleave = lambda d, m: jnp.stack([d[0], m[0], d[1], m[1]])
  blocks = jax.tree.map(interleave, {k: v for k, v in params['blocks'].items() if k != 'mlp'},
                        {k: v for k, v in params['moe_blocks'].items() if k != 'mlp'})
  blocks['mlp'] = jax.tree.map(lambda d: interleave(d, jnp.zeros_like(d)), params['blocks']['mlp'])
  dense_params = {**{k: v for k, v in params.items() if k not in ('blocks', 'moe_blocks')},
                  'blocks': blocks}
  np.testing.assert_allclose(
      model_lib.apply(graphdef, zeroed, tokens),
      model_lib.apply(model_lib.graphdef(dense), dense_params, tokens), atol=2e-6)


def test_kv_cache_decoding_matches_the_full_forward_pass():
  from lm import generate
  cfg = dataclasses.replace(MOE, moe_capacity_factor=0.0)  # Dropless: no grouping effects.
  graphdef, params = model_lib.init(cfg, 0)
  out = generate.greedy(graphdef, params, [5, 7, 11], num_tokens=6)
  logits = model_lib.apply(graphdef, params, jnp.array([out]))
  np.testing.assert_array_equal(np.argmax(logits[0, 2:-1], -1), out[3:])


def test_config_errors_name_the_field():
  config = config_lib.load_config('configs/moe_tiny.py')
  for field, value, message in [
      ('top_k', 9, 'config.model.moe.top_k=9'),
      ('every_n_layers', 3, 'config.model.moe.every_n_layers=3'),
      ('capacity_factor', -1.0, 'config.model.moe.capacity_factor=-1.0')]:
    bad = config_lib.load_config('configs/moe_tiny.py')
    bad.model.moe[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(bad)
  config.mesh.expert = 3
  with pytest.raises(config_lib.ConfigError, match='config.mesh.expert=3 does not divide'):
    config_lib.validate(config)
  dense = config_lib.load_config('configs/tiny.py')
  dense.mesh.expert = 2
  with pytest.raises(config_lib.ConfigError, match='num_experts=0'):
    config_lib.validate(dense)


# ---------------------------------------------------------------------------------------------
# The training loop: real text, router metrics, resume.


def _loop_config(tokenizer='', **train):
  config = loop_config.small_run(tokenizer, **train)
  config.model.d_ff = 64
  config.model.moe.update(num_experts=4, top_k=2, capacity_factor=1.25)
  return config


def test_moe_loss_on_real_text_falls_and_router_metrics_are_logged(tmp_path, stdlib_tokenizer):
  config = _loop_config(stdlib_tokenizer, steps=150, eval_every=150, checkpoint_every=150,
                        log_every=10, eval_batches=4, learning_rate=1e-2, warmup_steps=10)
  _, metrics = train_lib.train(config, str(tmp_path))
  assert metrics['eval_loss'] < 0.7 * np.log(512), metrics
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_rows = [r for r in rows if 'loss' in r]
  assert train_rows[-1]['loss'] < 0.75 * np.log(512)
  last = train_rows[-1]
  assert {'moe_loss', 'moe_load_balance', 'moe_router_z', 'moe_dropped', 'moe_max_load_0',
          'moe_max_load_1', 'moe_dropped_1'} <= set(last)
  assert 1.0 <= last['moe_load_balance'] < 4.0 and 0.0 <= last['moe_dropped'] < 1.0
  assert 1.0 <= last['moe_max_load_0'] <= 4.0
  # The objective is the mean NLL plus the weighted auxiliary losses.
  np.testing.assert_allclose(
      last['moe_loss'], 0.01 * last['moe_load_balance'] + 0.001 * last['moe_router_z'],
      rtol=1e-4)


def test_moe_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path, stdlib_tokenizer):
  config = _loop_config(stdlib_tokenizer, steps=6, checkpoint_every=3, eval_every=6,
                        eval_batches=1)
  straight, _ = train_lib.train(config, str(tmp_path / 'straight'))
  config.train.steps_per_run = 3
  first, _ = train_lib.train(config, str(tmp_path / 'resumed'))
  config.train.steps_per_run = 0
  assert int(first.step) == 3
  resumed, _ = train_lib.train(config, str(tmp_path / 'resumed'))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(straight.params),
                                                  jax.tree.leaves(resumed.params)))


def test_quantized_and_lora_merged_moe_models_keep_their_outputs():
  from lm import lora as lora_lib
  from lm import quantize
  cfg = dataclasses.replace(MOE, num_layers=2, moe_every_n_layers=2, lora_rank=4,
                            lora_targets=('w_q', 'w_v', 'w_up'))
  graphdef, params = model_lib.init(cfg, 0)
  # Non-zero B everywhere, so merging changes every adapted weight, in both stacks.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.05 if path[-1].key.endswith('_lora_b') else x, params)
  tokens = _tokens()
  logits = model_lib.apply(graphdef, params, tokens)
  merged = lora_lib.merge(params, cfg)
  plain = dataclasses.replace(cfg, lora_rank=0, lora_targets=())
  np.testing.assert_allclose(model_lib.apply(model_lib.graphdef(plain), merged, tokens), logits,
                             atol=1e-5)
  qparams = quantize.quantize(merged)
  scale = qparams['moe_blocks']['mlp']['w_up']['scale']
  assert scale.shape == (1, 4, 1, 48)  # [L, E, D, F]: a scale per layer, expert and column.
  dequantized = model_lib.apply(model_lib.graphdef(plain), quantize.dequantize(qparams), tokens)
  assert np.abs(dequantized - logits).max() < 0.02 * np.abs(logits).max()
