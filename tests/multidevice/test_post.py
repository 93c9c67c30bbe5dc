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
