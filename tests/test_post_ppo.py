"""mode='ppo': GAE, the clipped losses against a direct computation, gradient accumulation, LoRA
(adapters and the value head train, the reference is the base), and a run that raises its
reward with the KL held near its target."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import post_fixtures
from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import model as model_lib
from lm import pytree
from lm import train as train_lib
from lm.post import ppo


def test_gae_equals_its_definition():
  rng = np.random.default_rng(0)
  T = 7
  mask = np.zeros((2, T), np.float32)
  mask[0, 2:6] = 1
  mask[1, 1:3] = 1
  rewards, values = rng.normal(size=(2, T)).astype(np.float32), rng.normal(size=(2, T)).astype(
      np.float32)
  gamma, lam = 0.9, 0.8
  advantages, returns = ppo.advantages_and_returns(rewards, values, mask, gamma, lam)
  for b in range(2):
    steps = np.flatnonzero(mask[b])
    v = np.append(values[b, steps], 0.0)  # The episode ends after the completion.
    deltas = rewards[b, steps] + gamma * v[1:] - v[:-1]
    for i, t in enumerate(steps):
      expected = sum((gamma * lam) ** k * d for k, d in enumerate(deltas[i:]))
      np.testing.assert_allclose(advantages[b, t], expected, rtol=1e-5)
      np.testing.assert_allclose(returns[b, t], expected + values[b, t], rtol=1e-5)
  assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_the_score_lands_on_the_last_completion_token_and_kl_on_every_one():
  post = config_lib.base_config().post
  post.update(gamma=1.0, gae_lambda=1.0, whiten_advantages=False)
  mask = np.asarray([[0, 1, 1, 1, 0]], np.float32)
  rows = {'loss_mask': mask, 'old_logp': -np.asarray([[0, 1, 2, 3, 0]], np.float32) * mask,
          'ref_logp': -np.asarray([[0, 2, 2, 2, 0]], np.float32) * mask,
          'old_values': np.zeros_like(mask)}
  rows, metrics = ppo.finish(rows, np.asarray([5.0]), kl_coef=0.5, post=post)
  # Per-token rewards -0.5 * (old - ref) = [-0.5, 0, 0.5], plus 5 at the end; returns-to-go:
  np.testing.assert_allclose(rows['returns'][0], [0, 5.0, 5.5, 5.5, 0], rtol=1e-6)
  assert metrics['non_score_reward'] == pytest.approx(0.0)


def _reference_loss(batch, logp, values, post):
  """PPO's per-token losses, directly in numpy (TRL's formulas)."""
  mask = batch['loss_mask']
  ratio = np.exp(logp - batch['old_logp'])
  adv = batch['advantages']
  pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - post.clip_epsilon, 1 + post.clip_epsilon))
  clipped = batch['old_values'] + np.clip(values - batch['old_values'], -post.value_clip,
                                          post.value_clip)
  vf = 0.5 * np.maximum((values - batch['returns']) ** 2, (clipped - batch['returns']) ** 2)
  n = mask.sum()
  return (pg * mask).sum() / n, (vf * mask).sum() / n


@pytest.fixture(scope='module')
def ppo_rollout(tiny_llama):
  config = post_fixtures.rl_config(tiny_llama.lm, 'ppo')
  run = train_lib.setup(config)
  data = train_lib.make_data(run, '/unused')
  params = post_fixtures.init_params(run)
  state = run.init_state(params)
  rows, metrics = data.rollout(state, next(data.train_iter))
  return config, rows, jax.device_get(state.params), metrics


def test_the_losses_equal_a_direct_computation(ppo_rollout):
  config, rows, params, _ = ppo_rollout
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  graphdef = model_lib.graphdef(cfg)
  # Move the policy off the rollout's so that ratios and values clip.
  rng = np.random.default_rng(1)
  moved = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype), params)
  post = config.post
  _, sums = ppo.loss_sums(moved, rows, graphdef=graphdef, post=post)
  logits, values, _ = model_lib.apply_with_values(graphdef, moved, rows['inputs'],
                                               rows['segment_ids'], rows['positions'])
  logits = np.asarray(logits, np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logp = np.take_along_axis(logits, rows['targets'][..., None], -1)[..., 0] - log_z
  policy, value = _reference_loss(rows, logp * rows['loss_mask'], np.asarray(values), post)
  n = float(sums['tokens'])
  np.testing.assert_allclose(float(sums['policy_loss']) / n, policy, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(sums['value_loss']) / n, value, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(sums['loss']) / n, policy + post.value_coef * value,
                             rtol=1e-4, atol=1e-6)
  assert 0 < float(sums['clip_fraction']) / n < 1


def test_at_the_rollout_the_ratio_is_one_and_values_start_at_zero(ppo_rollout):
  config, rows, params, metrics = ppo_rollout
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  _, sums = ppo.loss_sums(params, rows, graphdef=model_lib.graphdef(cfg), post=config.post)
  assert float(sums['clip_fraction']) == 0 and float(sums['approx_kl']) < 1e-8
  np.testing.assert_array_equal(rows['old_values'], 0)  # The fresh value head is zero.
  assert abs(metrics['kl']) < 1e-4  # The policy is the reference.
  whitened = rows['advantages'][rows['loss_mask'] > 0]
  assert abs(whitened.mean()) < 1e-5 and abs(whitened.std() - 1) < 1e-3


def test_gradient_accumulation_changes_nothing(ppo_rollout):
  config, rows, params, _ = ppo_rollout
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  results = []
  for accum in (1, 4):
    t = config.train.copy_and_resolve_references()
    t.grad_accum_steps = accum
    optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(cfg), 2)
    state = train_lib.init_state(cfg, optimizer, 0, params)
    step = jax.jit(functools.partial(train_lib.train_step, objective=ppo.objective(
        model_lib.graphdef(cfg), config.post), optimizer=optimizer, t=t, epochs=1, minibatches=2))
    results.append(step(state, rows))
  (one, m1), (four, m4) = results
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_lora_trains_the_adapters_and_the_value_head_against_the_base(tiny_llama, tmp_path):
  config = post_fixtures.rl_config(tiny_llama.lm, 'ppo', update_epochs=2)
  config.lora.update(rank=4, targets='all')
  config.train.update(trainable='lora', steps=2, learning_rate=1e-2)
  run = train_lib.setup(config)
  data = train_lib.make_data(run, '/unused')
  assert data.train_iter.reference_params is None  # No second copy: the base is the reference.
  state = run.init_state(post_fixtures.init_params(run))
  _, metrics = data.rollout(state, next(data.train_iter))
  assert abs(metrics['kl']) < 1e-4  # Fresh adapters (B = 0) are the base.
  state, _ = train_lib.train(config, str(tmp_path))
  base = checkpoint_lib.restore_params(tiny_llama.lm, checkpoint_lib.params_shapes(tiny_llama.lm))
  trained = jax.device_get(state.params)
  frozen = pytree.subtree(trained, pytree.leaf_paths(base))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)
  assert np.abs(trained['value_head']).max() > 0
  assert np.abs(trained['blocks']['attention']['w_q_lora_b']).max() > 0


def test_ppo_raises_the_reward_with_the_kl_near_its_target(tiny_llama, tmp_path):
  config = post_fixtures.rl_config(tiny_llama.lm, 'ppo', kl_coef=0.1, kl_target=2.0,
                                   kl_horizon=64, update_epochs=2)
  config.train.update(steps=40, batch_size=64, log_every=10, eval_every=40)
  _, metrics = train_lib.train(config, str(tmp_path))
  logged = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"reward"' in l]
  assert logged[-1]['reward'] > logged[0]['reward'] + 0.05, logged
  assert max(r['kl'] for r in logged) < 2 * 2.0, logged
  assert {'policy_loss', 'value_loss', 'clip_fraction', 'entropy', 'approx_kl', 'kl_coef',
          'time_rollout', 'time_scoring', 'eval_reward'} <= set(metrics)


def test_the_ppo_config_runs_from_the_command_line(tiny_llama, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', os.path.join(root, 'configs', 'post', 'ppo.py'),
       '--workdir', str(tmp_path / 'ppo'), f'--config.init_from={tiny_llama.lm}',
       '--config.post.max_examples=60', '--config.data.seq_len=48', '--config.train.steps=2',
       '--config.train.batch_size=8', '--config.train.warmup_steps=1',
       '--config.post.max_new_tokens=8', '--config.model.dtype=float32'],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isdir(tmp_path / 'ppo' / 'checkpoints' / '2')


def test_an_moe_policy_adds_its_router_losses(ppo_rollout):
  config, rows, _, _ = ppo_rollout
  config = config.copy_and_resolve_references()
  config.model.moe.update(num_experts=4, top_k=2, capacity_factor=2.0)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  objective, sums = ppo.loss_sums(model_lib.init_params(cfg, 0), rows,
                                  graphdef=model_lib.graphdef(cfg), post=config.post)
  assert float(sums['moe_loss']) > 0 and 'moe_router_z' in sums and 'moe_max_load_0' in sums
  np.testing.assert_allclose(float(objective), float(sums['loss'] + sums['moe_loss']), rtol=1e-6)
