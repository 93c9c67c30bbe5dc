import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import config as config_lib
from lm import model as model_lib
from lm import train as train_lib

CFG = model_lib.ModelConfig(
    vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
    max_seq_len=16)


def _batch(B=8, T=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[:, T // 2:] = 2
  positions = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0)
  loss_mask = np.ones((B, T), np.float32)
  loss_mask[:, T // 2 - 1] = 0  # The target of a document's last input is the next document.
  loss_mask[0, :3] = 0  # Uneven masks across micro-batches.
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segment_ids,
          'positions': positions.astype(np.int32), 'loss_mask': loss_mask}


def _train_config(**overrides):
  t = config_lib.base_config().train
  t.update({'steps': 10, 'warmup_steps': 2, 'learning_rate': 1e-2, 'batch_size': 8, **overrides})
  return t


def _run_steps(t, batches, cfg=CFG):
  optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(cfg))
  graphdef, state = train_lib.init_state(cfg, optimizer, seed=0)
  step = jax.jit(functools.partial(
      train_lib.train_step, graphdef=graphdef, optimizer=optimizer, t=t))
  for batch in batches:
    state, metrics = step(state, batch)
  return state, metrics


@pytest.mark.parametrize('accum', [2, 4])
def test_gradient_accumulation_equals_one_big_batch(accum):
  batches = [_batch(seed=i) for i in range(3)]
  big, big_metrics = _run_steps(_train_config(), batches)
  acc, acc_metrics = _run_steps(_train_config(grad_accum_steps=accum), batches)
  np.testing.assert_allclose(big_metrics['loss'], acc_metrics['loss'], rtol=1e-6)
  np.testing.assert_allclose(big_metrics['grad_norm'], acc_metrics['grad_norm'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               big.params, acc.params)


def test_loss_is_the_mean_nll_over_unmasked_targets():
  batch = _batch()
  graphdef, params = model_lib.init(CFG, 0)
  logits = model_lib.apply(graphdef, params, batch['inputs'], batch['segment_ids'],
                           batch['positions'])
  log_probs = jax.nn.log_softmax(logits)
  nll = -np.take_along_axis(np.asarray(log_probs), batch['targets'][..., None], -1)[..., 0]
  expected = (nll * batch['loss_mask']).sum() / batch['loss_mask'].sum()
  objective, sums = train_lib.loss_sums(params, batch, graphdef=graphdef)
  np.testing.assert_allclose(sums['nll'] / sums['tokens'], expected, rtol=1e-5)
  np.testing.assert_allclose(objective, sums['nll'], rtol=1e-6)
  smoothed, _ = train_lib.loss_sums(params, batch, graphdef=graphdef, label_smoothing=0.1)
  with_z, _ = train_lib.loss_sums(params, batch, graphdef=graphdef, z_loss=1e-3)
  assert smoothed > objective and with_z > objective


def test_weight_decay_skips_norms_and_biases():
  cfg = dataclasses.replace(CFG, block='gpt2')
  t = _train_config(weight_decay=0.5, learning_rate=0.1, grad_clip=0.0)
  optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(cfg))
  _, params = model_lib.init(cfg, 0)
  params = jax.tree.map(jnp.ones_like, params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  state = optimizer.init(params)
  for _ in range(3):  # Past warmup's zero learning rate.
    updates, state = optimizer.update(zero_grads, state, params)
  decayed = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert decayed['blocks']['mlp']['w_up'] and decayed['embed']
  assert not decayed['blocks']['mlp']['b_up']
  assert not decayed['blocks']['attention_norm']['scale']
  assert not decayed['final_norm']['bias']


def test_learning_rate_warms_up_then_decays_to_the_floor():
  t = _train_config(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
  schedule = train_lib.learning_rate_schedule(t)
  assert schedule(0) == 0 and schedule(5) == pytest.approx(0.5)
  assert schedule(10) == pytest.approx(1.0)
  assert schedule(100) == pytest.approx(0.1)
  assert schedule(50) < schedule(20)


def test_train_step_is_deterministic_and_reduces_loss_on_a_repeated_batch():
  batch = _batch()
  t = _train_config(steps=30, warmup_steps=1, learning_rate=3e-3)
  state_a, metrics_a = _run_steps(t, [batch] * 30)
  state_b, _ = _run_steps(t, [batch] * 30)
  jax.tree.map(np.testing.assert_array_equal, state_a.params, state_b.params)
  assert metrics_a['loss'] < 0.7 * np.log(CFG.vocab_size)
