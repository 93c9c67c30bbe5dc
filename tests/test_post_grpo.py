"""mode='grpo': group advantages, the zero-loss invariant, gradient accumulation, a run that
raises its reward with the KL held near its target, and exact resumption."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import post_fixtures
from lm import model as model_lib
from lm import train as train_lib
from lm.post import grpo


def test_group_advantages_are_standardised_within_each_group():
  scores = np.asarray([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
  advantages = grpo.group_advantages(scores, group_size=4)
  first = scores[:4]
  np.testing.assert_allclose(advantages[:4], (first - first.mean()) / (first.std(ddof=1) + 1e-4),
                             rtol=1e-6)
  np.testing.assert_array_equal(advantages[4:], 0)  # No signal in a group that scores alike.


def _rollout(config, params=None):
  """(run, rows of one rollout batch, the state it was drawn from)."""
  run = train_lib.setup(config)
  data = train_lib.make_data(run, '/unused')
  if params is None:
    params = post_fixtures.init_params(run)
  state = run.init_state(params)
  rows, _ = data.rollout(state, next(data.train_iter))
  return run, rows, state


@pytest.fixture(scope='module')
def rollout_batch(tiny_llama):
  """A rollout batch from the init checkpoint, and the run's params, with a KL term."""
  config = post_fixtures.rl_config(tiny_llama.lm, 'grpo', kl_coef=0.1)
  run, rows, state = _rollout(config)
  return config, rows, jax.device_get(state.params)


def test_one_update_without_kl_has_zero_loss_and_a_gradient(tiny_llama):
  config = post_fixtures.rl_config(tiny_llama.lm, 'grpo', kl_coef=0.0,
                                   loss_normalization='sequence')
  run, rows, state = _rollout(config)
  with run.active():
    _, metrics = run.step_fn(state, rows)
  assert abs(float(metrics['loss'])) < 1e-6
  assert float(metrics['grad_norm']) > 1e-3
  assert float(metrics['clip_fraction']) == 0.0  # Every ratio is 1 on the first update.


@pytest.mark.parametrize('normalization', ['token', 'sequence'])
def test_gradient_accumulation_and_minibatch_split_change_nothing(rollout_batch, normalization):
  config, rows, params = rollout_batch
  config = config.copy_and_resolve_references()
  config.post.loss_normalization = normalization
  # Off the rollout's policy, so that the ratios differ from 1 and the loss from 0.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype), params)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  graphdef = model_lib.graphdef(cfg)
  results = []
  for accum in (1, 2):
    t = config.train.copy_and_resolve_references()
    t.update(grad_accum_steps=accum)
    optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(cfg))
    state = train_lib.init_state(cfg, optimizer, 0, params)
    step = jax.jit(functools.partial(train_lib.train_step, objective=grpo.objective(
        graphdef, config.post), optimizer=optimizer, t=t))
    state, metrics = step(state, rows)
    results.append((state.params, metrics))
  (one, m1), (two, m2) = results
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m1['token_kl'], m2['token_kl'], rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_several_updates_per_rollout_move_the_ratio(rollout_batch):
  config, rows, params = rollout_batch
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  t = config.train
  optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(cfg), 4)
  state = train_lib.init_state(cfg, optimizer, 0, params)
  step = jax.jit(functools.partial(train_lib.train_step, objective=grpo.objective(
      model_lib.graphdef(cfg), config.post), optimizer=optimizer, t=t, epochs=2, minibatches=2))
  state, metrics = step(state, rows)
  assert int(state.step) == 1
  assert int(state.opt_state[1][0].count) == 4  # Four AdamW updates in the one step.
  assert float(metrics['clip_fraction']) > 0 or float(metrics['token_kl']) > 0
  assert float(metrics['tokens']) == float(rows['loss_mask'].sum())


def test_grpo_raises_the_reward_with_the_kl_near_its_target(tiny_llama, tmp_path):
  config = post_fixtures.rl_config(tiny_llama.lm, 'grpo', kl_coef=0.1, kl_target=2.0,
                                   kl_horizon=64)
  config.train.update(steps=40, batch_size=64, log_every=10, eval_every=40)
  state, metrics = train_lib.train(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  logged = [r for r in rows if 'reward' in r and 'first_step_seconds' not in r]  # Windows.
  assert logged[-1]['reward'] > logged[0]['reward'] + 0.05, logged
  assert max(r['kl'] for r in logged) < 2 * 2.0, logged
  assert {'eval_reward', 'eval_kl', 'time_rollout', 'time_scoring', 'kl_coef',
          'groups_without_signal'} <= set(metrics)
  assert int(state.step) == 40


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_llama, tmp_path):
  def config(steps_per_run=0):
    c = post_fixtures.rl_config(tiny_llama.lm, 'grpo', kl_coef=0.1, kl_target=1.0,
                                kl_horizon=16)
    c.train.update(steps=4, checkpoint_every=2, steps_per_run=steps_per_run)
    return c

  straight, _ = train_lib.train(config(), str(tmp_path / 'straight'))
  train_lib.train(config(steps_per_run=2), str(tmp_path / 'resumed'))
  resumed, _ = train_lib.train(config(), str(tmp_path / 'resumed'))
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  # The data state saved with step 4: the prompt order and the adapted KL coefficient.
  saved = lambda d: json.load(open(tmp_path / d / 'checkpoints' / '4' / 'data' / 'metadata'))
  assert saved('straight') == saved('resumed')
  assert saved('resumed')['kl_coef'] != 0.1


def test_the_grpo_config_runs_from_the_command_line(tiny_llama, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', os.path.join(root, 'configs', 'post', 'grpo.py'),
       '--workdir', str(tmp_path / 'grpo'), f'--config.init_from={tiny_llama.lm}',
       '--config.post.max_examples=60', '--config.data.seq_len=48', '--config.train.steps=2',
       '--config.train.batch_size=8', '--config.train.warmup_steps=1',
       '--config.post.max_new_tokens=8', '--config.model.dtype=float32'],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isdir(tmp_path / 'grpo' / 'checkpoints' / '2')


def test_an_moe_policy_adds_its_router_losses(rollout_batch):
  config, rows, _ = rollout_batch
  config = config.copy_and_resolve_references()
  config.model.moe.update(num_experts=4, top_k=2, capacity_factor=2.0)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  params = model_lib.init_params(cfg, 0)
  batch = jax.tree.map(np.asarray, rows)
  objective, sums = grpo.loss_sums(params, batch, graphdef=model_lib.graphdef(cfg),
                                   post=config.post)
  assert float(sums['moe_loss']) > 0 and 'moe_router_z' in sums
  np.testing.assert_allclose(float(objective), float(sums['loss'] + sums['moe_loss']), rtol=1e-6)
