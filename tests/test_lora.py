"""LoRA adapters: exact start, merge, frozen base, trainable counts, and a LoRA training run."""

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import generate
from lm import lora
from lm import model as model_lib
from lm import pytree
from lm import train as train_lib

BASE = model_lib.ModelConfig(
    vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
    max_seq_len=16)
LORA = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, lora_targets=lora.lora_targets(
    'all', 'llama'))


def _tokens(B=4, T=16, seed=0):
  return np.random.default_rng(seed).integers(0, BASE.vocab_size, (B, T)).astype(np.int32)


def _batch(B=8, T=16, seed=0):
  tokens = np.random.default_rng(seed).integers(0, BASE.vocab_size, (B, T + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'segment_ids': np.ones((B, T), np.int32),
          'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          'loss_mask': np.ones((B, T), np.float32)}


def _adapters(params):
  return {path: x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if lora.is_adapter(path[-1].key)}


def _with_random_b(params, seed=1):
  """Adapters with a nonzero B, as after training."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: rng.normal(0, 0.1, x.shape).astype(x.dtype)
      if path[-1].key.endswith('_lora_b') else x, params)


def test_adapters_sit_beside_every_target_with_the_documented_shapes():
  params = jax.eval_shape(lambda: model_lib.init_params(LORA, 0))
  attention, mlp = params['blocks']['attention'], params['blocks']['mlp']
  L, D, H, K, Q, F, r = 2, 32, 4, 2, 8, 48, 4
  assert attention['w_q_lora_a'].shape == (L, D, r)
  assert attention['w_q_lora_b'].shape == (L, r, H, Q)
  assert attention['w_k_lora_b'].shape == (L, r, K, Q)
  assert attention['w_o_lora_a'].shape == (L, H, Q, r)
  assert attention['w_o_lora_b'].shape == (L, r, D)
  assert mlp['w_down_lora_a'].shape == (L, F, r)
  assert mlp['w_gate_lora_b'].shape == (L, r, F)
  assert len(_adapters(params)) == 2 * 7
  axes = model_lib.logical_axes(LORA)['blocks']['attention']
  assert axes['w_q_lora_a'] == ('layers', 'embed', 'lora_rank')
  assert axes['w_q_lora_b'] == ('layers', 'lora_rank', 'heads', 'head_dim')


def test_base_weights_do_not_depend_on_whether_adapters_exist():
  base, with_lora = model_lib.init_params(BASE, 3), model_lib.init_params(LORA, 3)
  jax.tree.map(np.testing.assert_array_equal, base, lora.merge(
      jax.tree.map(np.asarray, with_lora), dataclasses.replace(LORA, lora_alpha=0.0)))


def test_fresh_adapters_give_the_base_model_outputs_exactly():
  base_params = model_lib.init_params(BASE, 0)
  params = model_lib.init_params(LORA, 0)
  assert all(np.any(x != 0) for path, x in _adapters(params).items()
             if path[-1].key.endswith('_lora_a'))  # A is random, B = 0.
  tokens = _tokens()
  base_logits = model_lib.apply(model_lib.graphdef(BASE), base_params, tokens)
  lora_logits = model_lib.apply(model_lib.graphdef(LORA), params, tokens)
  np.testing.assert_array_equal(base_logits, lora_logits)


@pytest.mark.parametrize('targets', ['all', 'q,v', 'o,down'])
def test_merged_weights_give_the_unmerged_outputs(targets):
  cfg = dataclasses.replace(LORA, lora_targets=lora.lora_targets(targets, 'llama'))
  params = _with_random_b(jax.tree.map(np.asarray, model_lib.init_params(cfg, 0)))
  tokens = _tokens()
  unmerged = model_lib.apply(model_lib.graphdef(cfg), params, tokens)
  merged = model_lib.apply(model_lib.graphdef(BASE), lora.merge(params, cfg), tokens)
  base = model_lib.apply(model_lib.graphdef(BASE), lora.merge(params, dataclasses.replace(
      cfg, lora_alpha=0.0)), tokens)
  np.testing.assert_allclose(merged, unmerged, atol=2e-5)
  assert np.abs(unmerged - base).max() > 1e-2  # The adapters do change the outputs.


def test_trainable_parameter_count_matches_the_formula():
  # One kv head of size 64 on a 512-wide model: w_k is a 512 x 64 projection.
  cfg = model_lib.ModelConfig(vocab_size=128, d_model=512, num_layers=3, num_heads=8,
                              num_kv_heads=1, d_ff=256, max_seq_len=16, lora_rank=8,
                              lora_targets=('w_k',))
  assert lora.trainable_count((512, 1, 64), 'w_k', 8) == 4_608
  params = jax.eval_shape(lambda: model_lib.init_params(cfg, 0))
  t = config_lib.base_config().train
  t.trainable = 'lora'
  trained, frozen = train_lib.split_trained(
      params, train_lib.trained_paths(t, model_lib.logical_axes(cfg)))
  assert model_lib.count_params(trained) == 3 * 4_608  # Instead of 3 * 32,768.
  assert model_lib.count_params(frozen) == model_lib.count_params(
      jax.eval_shape(lambda: model_lib.init_params(BASE.__class__(**{
          **dataclasses.asdict(cfg), 'lora_rank': 0, 'lora_targets': ()}), 0)))


def _train(t, batches, params, cfg=LORA):
  optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(cfg))
  trained = train_lib.trained_paths(t, model_lib.logical_axes(cfg))
  state = train_lib.init_state(cfg, optimizer, 0, params, trained=trained)
  objective = train_lib.language_model_objective(model_lib.graphdef(cfg), t)
  step = jax.jit(functools.partial(train_lib.train_step, objective=objective,
                                   optimizer=optimizer, t=t, trained=trained))
  for batch in batches:
    state, metrics = step(state, batch)
  return state, metrics


def _train_config(**overrides):
  t = config_lib.base_config().train
  t.update({'steps': 10, 'warmup_steps': 1, 'learning_rate': 1e-2, 'batch_size': 8,
            'weight_decay': 0.5, **overrides})
  return t


def test_lora_training_changes_only_the_adapters_and_keeps_state_only_for_them():
  start = jax.tree.map(np.asarray, model_lib.init_params(LORA, 0))
  state, metrics = _train(_train_config(trainable='lora'),
                          [_batch(seed=i) for i in range(3)], start)
  assert np.isfinite(metrics['loss'])
  flat_start = dict(jax.tree_util.tree_flatten_with_path(start)[0])
  for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    if lora.is_adapter(path[-1].key):
      assert not np.array_equal(x, flat_start[path]), path  # B moved off zero, A moved.
    else:
      np.testing.assert_array_equal(x, flat_start[path])  # Bit for bit, weight decay too.
  moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == sorted([x.shape for x in _adapters(start).values()] * 2)


def test_lora_with_embeddings_trains_both_and_nothing_else():
  start = jax.tree.map(np.asarray, model_lib.init_params(LORA, 0))
  state, _ = _train(_train_config(trainable='lora,embeddings'), [_batch(), _batch(seed=1)], start)
  assert not np.array_equal(state.params['embed'], start['embed'])
  assert not np.array_equal(state.params['unembed'], start['unembed'])
  np.testing.assert_array_equal(state.params['blocks']['mlp']['w_up'],
                                start['blocks']['mlp']['w_up'])
  np.testing.assert_array_equal(state.params['final_norm']['scale'],
                                start['final_norm']['scale'])


def test_dropout_is_used_in_training_only():
  cfg = dataclasses.replace(LORA, lora_dropout=0.5)
  params = _with_random_b(jax.tree.map(np.asarray, model_lib.init_params(cfg, 0)))
  tokens, graphdef = _tokens(), model_lib.graphdef(cfg)
  no_dropout = model_lib.apply(model_lib.graphdef(LORA), params, tokens)
  evaluation = model_lib.apply(graphdef, params, tokens)
  np.testing.assert_array_equal(evaluation, no_dropout)
  key = jax.random.key(0)
  dropped = model_lib.apply(graphdef, params, tokens, dropout_rng=key)
  assert np.abs(dropped - evaluation).max() > 1e-3
  np.testing.assert_array_equal(dropped, model_lib.apply(graphdef, params, tokens,
                                                         dropout_rng=key))


def test_lora_config_is_validated():
  config = config_lib.base_config()
  config.lora.rank = 8
  with pytest.raises(config_lib.ConfigError, match='lora,embeddings'):
    config_lib.validate(config)  # trainable='all' would train the base too.
  config.train.trainable = 'lora'
  config_lib.validate(config)
  config.lora.targets = 'q,qkv'
  with pytest.raises(config_lib.ConfigError, match="'qkv' is not one of"):
    config_lib.validate(config)
  config.lora.targets, config.model.block = 'gate', 'gpt2'
  with pytest.raises(config_lib.ConfigError, match='no gate'):
    config_lib.validate(config)
  config.lora.targets = 'all'  # The group skips gpt2's missing gate.
  config_lib.validate(config)
  assert lora.lora_targets('all', 'gpt2') == ('w_q', 'w_k', 'w_v', 'w_o', 'w_up', 'w_down')
  config.lora.rank = 0
  with pytest.raises(config_lib.ConfigError, match='adds no adapters'):
    config_lib.validate(config)


# -------------------------------------------------------------------------------------------
# A LoRA run: init from a base checkpoint, small checkpoints, exact resume, merged generation.


def _run_config(init_from, tokenizer, **train):
  config = config_lib.base_config()
  config.model.update(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      d_ff=128, max_seq_len=64, dtype='float32')
  config.train.update({
      'steps': 6, 'batch_size': 8, 'learning_rate': 3e-3, 'warmup_steps': 1, 'log_every': 2,
      'eval_every': 6, 'eval_batches': 1, 'checkpoint_every': 3, 'trainable': 'lora',
      **train})
  config.data.update(seq_len=64, max_chars=200_000, tokenizer_train_chars=200_000,
                     tokenizer=tokenizer)
  config.lora.update(rank=4, alpha=8.0, targets='q,v,down')
  config.init_from = init_from
  return config


@pytest.fixture(scope='module')
def base_checkpoint(tmp_path_factory):
  """A base model's parameters (random, saved as lm.vocab does) and a tokenizer for the runs."""
  from lm import data as data_lib
  root = tmp_path_factory.mktemp('base')
  config = _run_config('', '')
  data = data_lib.make_data(config.data, vocab_size=512, batch_size=8, seed=0,
                            workdir=str(root / 'tokenizer_run'))
  cfg = model_lib.ModelConfig.from_config(config_lib.base_config(), 'float32')
  cfg = dataclasses.replace(cfg, **{k: config.model[k] for k in (
      'vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'd_ff', 'max_seq_len')})
  params = model_lib.init_params(cfg, 0)
  checkpoint_lib.save_params(str(root / 'base'), params)
  return str(root / 'base'), data.tokenizer.path, jax.tree.map(np.asarray, params)


def test_a_lora_run_resumes_exactly_and_checkpoints_only_what_it_trains(tmp_path,
                                                                         base_checkpoint):
  base, tokenizer, base_params = base_checkpoint
  straight, _ = train_lib.train(_run_config(base, tokenizer), str(tmp_path / 'straight'))
  train_lib.train(_run_config(base, tokenizer, steps_per_run=3), str(tmp_path / 'split'))
  resumed, _ = train_lib.train(_run_config(base, tokenizer, steps_per_run=3),
                               str(tmp_path / 'split'))
  assert int(resumed.step) == 6
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)

  # The base weights are stored once and untouched; the checkpoints hold only the adapters.
  frozen = checkpoint_lib.params_shapes(str(tmp_path / 'straight' / checkpoint_lib.FROZEN))
  assert 'w_q_lora_a' not in frozen['blocks']['attention']
  step_state = str(tmp_path / 'straight' / 'checkpoints' / '6')
  stored = checkpoint_lib._item_shapes(os.path.join(step_state, 'state'), 'params')
  assert {p[-1] for p in pytree.leaf_paths(stored)} == {
      'w_q_lora_a', 'w_q_lora_b', 'w_v_lora_a', 'w_v_lora_b', 'w_down_lora_a', 'w_down_lora_b'}
  merged_base = lora.merge(jax.tree.map(np.asarray, straight.params), dataclasses.replace(
      model_lib.ModelConfig.from_config(_run_config(base, tokenizer), 'float32'),
      lora_alpha=0.0))
  jax.tree.map(np.testing.assert_array_equal, merged_base, base_params)

  # restore_params puts frozen and trained parameters back together, for export and sampling.
  config = _run_config(base, tokenizer)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  target = jax.eval_shape(lambda: model_lib.init_params(cfg, 0))
  restored = checkpoint_lib.restore_params(str(tmp_path / 'straight'), target)
  jax.tree.map(np.testing.assert_array_equal, restored, straight.params)

  # Generation folds the adapters in and matches the unmerged model's logits.
  graphdef, params, _ = generate.load(config, str(tmp_path / 'straight'))
  assert 'w_q_lora_a' not in params['blocks']['attention']
  tokens = _tokens(T=12) % 512
  np.testing.assert_allclose(
      model_lib.apply(graphdef, params, tokens),
      model_lib.apply(model_lib.graphdef(cfg), straight.params, tokens), atol=2e-5)

  # Without the frozen weights a checkpoint cannot resume, and the error says why.
  shutil.rmtree(tmp_path / 'split' / checkpoint_lib.FROZEN)
  with pytest.raises(checkpoint_lib.CheckpointError, match='frozen'):
    train_lib.train(_run_config(base, tokenizer, steps_per_run=3), str(tmp_path / 'split'))
