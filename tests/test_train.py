import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import model as model_lib
from lm import train as train_lib

import loop_config

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


def _run_steps(t, batches, cfg=CFG, params=None):
  optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(cfg))
  trained = train_lib.trained_paths(t, model_lib.logical_axes(cfg))
  graphdef = model_lib.graphdef(cfg)
  state = train_lib.init_state(cfg, optimizer, 0, params, trained=trained)
  step = jax.jit(functools.partial(
      train_lib.train_step, objective=train_lib.language_model_objective(graphdef, t),
      optimizer=optimizer, t=t, trained=trained))
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
  # Every bias, the two-axis attention biases (heads, head_dim) included, and every norm: none.
  flat = {path[-1].key: value for path, value in jax.tree_util.tree_leaves_with_path(decayed)}
  for name in ('b_q', 'b_k', 'b_v', 'b_o', 'b_up', 'b_down', 'scale', 'bias'):
    assert not flat[name], name
  for name in ('w_q', 'w_k', 'w_v', 'w_o', 'w_up', 'w_down', 'embed', 'pos_embed'):
    assert flat[name], name


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


def test_training_only_the_embeddings_leaves_every_other_parameter_bit_identical(tmp_path):
  t = _train_config(trainable='embeddings', weight_decay=0.5)
  rng = np.random.default_rng(0)  # Quicker than compiling init.
  start = jax.tree.map(lambda x: rng.normal(0, 0.02, x.shape).astype(x.dtype),
                       jax.eval_shape(lambda: model_lib.init_params(CFG, 0)))
  state, _ = _run_steps(t, [_batch(seed=i) for i in range(3)], params=start)
  for name in ('embed', 'unembed'):
    assert not np.array_equal(state.params[name], start[name])
  frozen = lambda params: {k: v for k, v in params.items() if k not in ('embed', 'unembed')}
  jax.tree.map(np.testing.assert_array_equal, frozen(state.params), frozen(start))
  moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]  # Adam's mu and nu.
  assert sorted(moments) == sorted([start['embed'].shape, start['unembed'].shape] * 2)

  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(3, state, {})  # A state without moments for the frozen parameters...
  restored, _ = checkpointer.restore_latest(state)  # ...resumes as it was.
  checkpointer.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert _leaves_equal(restored, state)


def test_trainable_all_keeps_the_optimizer_state_of_every_parameter():
  params = jax.eval_shape(lambda: model_lib.init_params(CFG, 0))
  states = [train_lib.make_optimizer(_train_config(trainable=trainable),
                                     model_lib.logical_axes(CFG)).init(params)
            for trainable in ('all', 'embeddings, all')]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  assert len([x for x in jax.tree.leaves(states[0]) if x.ndim]) == 2 * len(jax.tree.leaves(params))


# -------------------------------------------------------------------------------------------
# The loop: real text, checkpoints, resume, failures.


_loop_config = loop_config.small_run


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_loss_on_real_text_falls_well_below_log_vocab(tmp_path, stdlib_tokenizer):
  config = _loop_config(stdlib_tokenizer, steps=300, eval_every=300, checkpoint_every=300,
                        log_every=10, eval_batches=8, learning_rate=1e-2, warmup_steps=20)
  _, metrics = train_lib.train(config, str(tmp_path))
  assert metrics['eval_loss'] < 0.65 * np.log(512), metrics  # Uniform guessing: log(512).
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_rows = [r for r in rows if 'loss' in r]
  assert train_rows[-1]['loss'] < 0.7 * train_rows[0]['loss']
  assert rows[0]['step'] == 1 and 'first_step_seconds' in rows[0]  # The starting loss.
  assert 'tokens_per_sec' not in rows[0] and rows[0]['loss'] > 0.95 * np.log(512)
  assert {'step', 'loss', 'tokens_per_sec', 'mfu', 'grad_norm', 'learning_rate'} <= set(rows[1])
  assert train_rows[-1]['mfu'] > 0 and train_rows[-1]['tokens_per_sec'] > 0
  assert any('eval_bits_per_byte' in r for r in rows)


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path, stdlib_tokenizer):
  config = _loop_config(stdlib_tokenizer)
  straight, _ = train_lib.train(config, str(tmp_path / 'straight'))
  config.train.steps_per_run = 5
  first, _ = train_lib.train(config, str(tmp_path / 'resumed'))
  config.train.steps_per_run = 0
  assert int(first.step) == 5
  resumed, _ = train_lib.train(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == int(straight.step) == 12
  assert _leaves_equal(straight.params, resumed.params)
  assert _leaves_equal(straight.opt_state, resumed.opt_state)
  steps = sorted(int(p.name) for p in (tmp_path / 'resumed' / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert steps == [5, 8, 12]  # keep_checkpoints=3; the stop saved step 5.


def _checkpoint_files(directory):
  return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob('*')
          if p.is_file()}


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, stdlib_tokenizer):
  train_lib.train(_loop_config(stdlib_tokenizer, steps=4), str(tmp_path))
  before = _checkpoint_files(tmp_path / 'checkpoints')
  saved_config = (tmp_path / 'config.json').read_text()
  # Resuming on a different schedule is refused, naming the fields, before anything changes.
  with pytest.raises(config_lib.ConfigError, match=r'config.train.steps 4 -> 12.*'
                     r'config.train.learning_rate 0.003 -> 1e\+30.*allow_schedule_change'):
    train_lib.train(_loop_config(stdlib_tokenizer, steps=12, learning_rate=1e30), str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == saved_config
  exploding = _loop_config(stdlib_tokenizer, steps=12, learning_rate=1e30, grad_clip=0.0,
                           warmup_steps=0, allow_schedule_change=True)
  with pytest.raises(train_lib.NonFiniteLossError) as e:
    train_lib.train(exploding, str(tmp_path))
  message = str(e.value)
  assert 'last good checkpoint is step 4' in message and 'learning_rate' in message
  assert _checkpoint_files(tmp_path / 'checkpoints') == before


def test_a_run_killed_mid_save_restarts_from_a_complete_checkpoint(tmp_path, stdlib_tokenizer):
  workdir = tmp_path / 'run'

  def command(steps):
    return [sys.executable, '-m', 'lm.main', '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
            '--workdir', str(workdir), *_TINY_CLI_OVERRIDES,
            f'--config.data.tokenizer={stdlib_tokenizer}', '--config.train.checkpoint_every=1',
            f'--config.train.steps={steps}', '--config.train.warmup_steps=2',
            '--config.train.eval_every=1000', '--config.train.allow_schedule_change=True']

  process = subprocess.Popen(command(1000), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and len(_saved_steps(workdir)) < 3:
      time.sleep(0.05)
    time.sleep(0.13)  # Saves run every step, so the kill very likely lands inside one.
  finally:
    process.kill()
    process.wait()
  saved = _saved_steps(workdir)
  assert len(saved) >= 3, 'the run never saved three checkpoints'
  result = subprocess.run(command(max(saved) + 3), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resumed from step {max(saved)}' in result.stderr
  assert max(_saved_steps(workdir)) == max(saved) + 3
  assert not [p for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name]


def _saved_steps(workdir):
  directory = workdir / 'checkpoints'
  return [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shrinks configs/tiny.py for tests that run it as a subprocess.
_TINY_CLI_OVERRIDES = ['--config.model.vocab_size=512', '--config.model.d_model=64',
                       '--config.model.d_ff=128', '--config.model.num_layers=2',
                       '--config.data.max_chars=300000', '--config.data.seq_len=64',
                       '--config.train.batch_size=8', '--config.model.dtype=float32']
