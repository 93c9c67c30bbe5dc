"""The post-training losses and steps on 8 fake devices (data x fsdp x tensor) equal one device."""

import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm import train as train_lib
from lm.post import data as post_data
from lm.post import dpo
from lm.post import reward

VOCAB, SEQ_LEN, BATCH = 64, 16, 8


def _config(mode, mesh, reference):
  config = config_lib.base_config()
  config.mode = mode
  config.model.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      d_ff=64, max_seq_len=SEQ_LEN, dtype='float32', reward_head=mode == 'reward')
  config.post.update(data='stdlib:function_pairs', reference=reference)  # Logps given below.
  config.data.seq_len = SEQ_LEN
  config.train.update(batch_size=BATCH, steps=10, warmup_steps=1, learning_rate=1e-2)
  config.mesh.update(mesh)
  return config


def _example(rng, prompt_len, response_len):
  tokens = np.concatenate([[1], rng.integers(4, VOCAB, prompt_len + response_len), [2]])
  trained = np.arange(len(tokens) - 1) >= prompt_len
  return post_data.Example(tokens.astype(np.int32), trained)


def _batch(mode):
  rng = np.random.default_rng(0)
  examples = [_example(rng, int(rng.integers(1, 6)), int(rng.integers(1, 8)))
              for _ in range(2 * BATCH)]
  if mode == 'sft':
    return post_data.PackedRows(examples, SEQ_LEN, True, 0)[:BATCH]
  pairs = list(zip(examples[:BATCH], examples[BATCH:]))
  if mode == 'reward':
    pairs = [tuple(reward.through_eos(e, 0) for e in pair) for pair in pairs]
  rows = dpo.PairRows(pairs, SEQ_LEN, 0)
  for side in dpo.SIDES:
    rows.arrays[f'{side}_ref_logp'] = -rng.uniform(0, 3, (BATCH, SEQ_LEN)).astype(np.float32) * (
        rows.arrays[f'{side}_loss_mask'])
  return rows[:BATCH]


def _step(mode, mesh, devices, reference):
  run = train_lib.setup(_config(mode, mesh, reference), jax.devices()[:devices])
  batch = jax.device_put(_batch(mode), run.batch_sharding)
  state = run.init_state()
  with run.active():
    state, metrics = run.step_fn(state, batch)
  return jax.device_get(metrics), jax.device_get(state.params)


# SFT's objective is the language model's, which test_sharding.py checks on every mesh.
@pytest.mark.parametrize('mode', ['reward', 'dpo'])
def test_a_step_on_8_devices_equals_one(mode, tmp_path):
  one_metrics, one_params = _step(mode, dict(data=1, fsdp=1, tensor=1), 1, str(tmp_path))
  many_metrics, many_params = _step(mode, dict(data=2, fsdp=2, tensor=2), 8, str(tmp_path))
  assert set(one_metrics) == set(many_metrics)
  for name, value in one_metrics.items():
    np.testing.assert_allclose(many_metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               many_params, one_params)


def _rl_batch(mode):
  """Rollout rows as lm.post.rollout lays them out, with made-up log-probs and advantages."""
  rng = np.random.default_rng(1)
  examples = [_example(rng, int(rng.integers(1, 6)), int(rng.integers(1, 8))) for _ in range(BATCH)]
  rows = post_data.PackedRows(examples, SEQ_LEN, False, 0).arrays
  mask = rows['loss_mask']
  noise = lambda low, high: rng.uniform(low, high, mask.shape).astype(np.float32) * mask
  rows.update(old_logp=-noise(1, 4), ref_logp=-noise(1, 4), advantages=noise(-1, 1))
  if mode == 'ppo':
    rows.update(old_values=noise(-0.1, 0.1), returns=noise(-1, 1))
  else:
    rows['kl_coef'] = np.full((BATCH, 1), 0.05, np.float32)
  return rows


def _rl_step(mode, mesh, devices):
  config = _config('sft', mesh, '')
  config.mode = mode
  config.model.value_head = mode == 'ppo'
  config.post.update(update_epochs=2, minibatches=2, reward_function='lm.post.rewards:vowel_share',
                     data='stdlib:functions', max_new_tokens=4, group_size=2, kl_coef=0.0)
  config.model.max_seq_len = SEQ_LEN + 1
  run = train_lib.setup(config, jax.devices()[:devices])
  batch = jax.device_put(_rl_batch(mode), run.batch_sharding)
  state = run.init_state()
  with run.active():
    state, metrics = run.step_fn(state, batch)
  return jax.device_get(metrics), jax.device_get(state.params)


@pytest.mark.parametrize('mode', ['ppo', 'grpo'])
def test_an_rl_step_of_several_updates_on_8_devices_equals_one(mode):
  one_metrics, one_params = _rl_step(mode, dict(data=1, fsdp=1, tensor=1), 1)
  many_metrics, many_params = _rl_step(mode, dict(data=2, fsdp=2, tensor=2), 8)
  for name, value in one_metrics.items():
    np.testing.assert_allclose(many_metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               many_params, one_params)


def test_rollouts_on_8_devices_equal_one(tiny_llama):
  """lm.engine decodes with the policy sharded over the mesh: the same completions and scores."""
  import post_fixtures  # pylint: disable=g-import-not-at-top
  results = []
  for mesh, devices in ((dict(data=1, fsdp=1, tensor=1), 1), (dict(data=2, fsdp=2, tensor=2), 8)):
    config = post_fixtures.rl_config(tiny_llama.lm, 'grpo', group_size=2)
    config.train.batch_size = 8
    config.mesh.update(mesh)
    run = train_lib.setup(config, jax.devices()[:devices])
    data = train_lib.make_data(run, '/unused')
    state = run.init_state(post_fixtures.init_params(run))
    results.append(data.rollout(state, next(data.train_iter)))
  (one, one_metrics), (many, many_metrics) = results
  np.testing.assert_array_equal(one['targets'], many['targets'])
  for name in ('old_logp', 'ref_logp', 'advantages'):
    np.testing.assert_allclose(one[name], many[name], rtol=1e-4, atol=1e-5, err_msg=name)
  assert one_metrics['reward'] == many_metrics['reward']
