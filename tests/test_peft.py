"""Adapters and prompt tuning (lm/peft.py): exact start, frozen base, decoding with a KV cache and
continuous batching, lm.eval's scoring, a training run, config checks."""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest

import loop_config
from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import engine as engine_lib
from lm import generate
from lm import model as model_lib
from lm import peft
from lm import pytree
from lm import sharding
from lm import train as train_lib
from lm.eval import scoring

BASE = model_lib.ModelConfig(
    vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
    max_seq_len=32)
ADAPTER = dataclasses.replace(BASE, adapter_dim=4)
PROMPT = dataclasses.replace(BASE, prompt_tokens=3)  # prompt_init='normal': no prompt_ids.
KINDS = {
    'decoder': BASE,
    'encoder_decoder': dataclasses.replace(BASE, kind='encoder_decoder'),
    'moe': dataclasses.replace(BASE, moe_num_experts=4, moe_every_n_layers=2),
    'gpt2': dataclasses.replace(BASE, block='gpt2'),
}


def _tokens(B=2, T=8, seed=0):
  return np.random.default_rng(seed).integers(0, BASE.vocab_size, (B, T)).astype(np.int32)


def _batch(B=8, T=16, seed=0):
  tokens = np.random.default_rng(seed).integers(0, BASE.vocab_size, (B, T + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'segment_ids': np.ones((B, T), np.int32),
          'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          'loss_mask': np.ones((B, T), np.float32)}


def _peft_leaves(params):
  return {path: x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if peft.is_peft(path[-1].key)}


def _with_random_adapters(params, seed=1):
  """Adapters with nonzero up projections, as after training."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: rng.normal(0, 0.3, x.shape).astype(x.dtype)
      if peft.is_peft(path[-1].key) else x, jax.tree.map(np.asarray, params))


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens, segment_ids=None, positions=None):
  if cfg.kind == 'encoder_decoder':
    return model_lib.apply_encoder_decoder(model_lib.graphdef(cfg), params, tokens, tokens)[0]
  return model_lib.apply(model_lib.graphdef(cfg), params, tokens, segment_ids, positions)


def _recomputed_greedy(cfg, params, prompt, num_tokens):
  """Greedy decoding without a cache: the whole sequence through the model at every step (right
  padded to one length, which causal attention never reads)."""
  tokens = list(prompt)
  for _ in range(num_tokens):
    padded = np.zeros((1, 16), np.int32)
    padded[0, :len(tokens)] = tokens
    tokens.append(int(np.argmax(_logits(cfg, params, padded)[0, len(tokens) - 1])))
  return tokens


PROMPTS = [[1, 4, 6], [2, 3, 8, 9], [5]]  # Of different lengths, in one block of lm.engine's.


def _engine_matches_one_by_one(cfg, params):
  requests = [engine_lib.Request(p, max_new_tokens=5, temperature=t, seed=i)
              for i, (p, t) in enumerate(zip(PROMPTS, (0.5, 1.0, 0.7)))]  # Sampled, seeded.
  results = engine_lib.Engine(cfg, params, slots=2, block_size=4, steps_per_call=2).run(requests)
  graphdef = model_lib.graphdef(cfg)
  for request, result in zip(requests, results):
    [alone] = generate.sample(graphdef, params, [request.prompt],
                              max_new_tokens=request.max_new_tokens,
                              temperature=request.temperature, seed=[request.seed],
                              stop_tokens=[])
    assert result.tokens == alone.tokens
    np.testing.assert_allclose(result.logprobs, alone.logprobs, atol=1e-5)


# -------------------------------------------------------------------------------------------
# Adapters.


def test_adapters_sit_in_every_block_with_logical_axes():
  params = jax.eval_shape(lambda: model_lib.init_params(
      dataclasses.replace(KINDS['encoder_decoder'], adapter_dim=4), 0))
  L, D, r = 2, 32, 4
  for stack in ('blocks', 'encoder_blocks'):
    assert params[stack]['attention_adapter']['adapter_down'].shape == (L, D, r)
    assert params[stack]['mlp_adapter']['adapter_up'].shape == (L, r, D)
  assert 'cross_attention_adapter' in params['blocks']
  assert 'cross_attention_adapter' not in params['encoder_blocks']
  axes = model_lib.logical_axes(ADAPTER)['blocks']['mlp_adapter']
  assert axes == {'adapter_down': ('layers', 'embed', 'adapter_dim'),
                  'adapter_down_bias': ('layers', 'adapter_dim'),
                  'adapter_up': ('layers', 'adapter_dim', 'embed')}
  moe = jax.eval_shape(lambda: model_lib.init_params(
      dataclasses.replace(KINDS['moe'], adapter_dim=4), 0))
  assert moe['moe_blocks']['mlp_adapter']['adapter_up'].shape == (1, r, D)


# Compiled, XLA fuses gpt2's graph with adapters differently from the one without (logits within
# 5e-8); op by op (as test_lora.py runs LoRA's) it is exact too.
@pytest.mark.parametrize('kind,compiled', [('decoder', True), ('encoder_decoder', True),
                                           ('gpt2', False)])
def test_fresh_adapters_give_the_base_model_outputs_exactly(kind, compiled):
  base = KINDS[kind]
  cfg = dataclasses.replace(base, adapter_dim=4)
  base_params, params = model_lib.init_params(base, 0), model_lib.init_params(cfg, 0)
  # The base weights do not depend on whether adapters exist (a stream of their own).
  jax.tree.map(np.testing.assert_array_equal, base_params,
               pytree.subtree(params, pytree.leaf_paths(base_params)))
  logits = _logits if compiled else _logits.__wrapped__
  np.testing.assert_array_equal(logits(base, base_params, _tokens()),
                                logits(cfg, params, _tokens()))
  trained = _with_random_adapters(params)
  assert np.abs(logits(cfg, trained, _tokens()) - logits(base, base_params, _tokens())).max() > 1e-2


def _train(t, batches, params, cfg):
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


@pytest.mark.parametrize('cfg,trainable', [(ADAPTER, 'adapter'), (PROMPT, 'prompt'),
                                           (ADAPTER, 'adapter,embeddings')])
def test_training_moves_only_the_trained_group_and_keeps_state_only_for_it(cfg, trainable):
  start = jax.tree.map(np.asarray, model_lib.init_params(cfg, 0))
  # Three steps: the first has learning rate 0 (warmup), and the adapters' down projections get
  # gradients only once their up projections have moved off zero.
  state, metrics = _train(_train_config(trainable=trainable), [_batch(seed=i) for i in range(3)],
                          start, cfg)
  assert np.isfinite(metrics['loss'])
  embeddings = 'embeddings' in trainable
  flat_start = dict(jax.tree_util.tree_flatten_with_path(start)[0])
  moving = []
  for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    name = path[-1].key
    if peft.is_peft(name) or (embeddings and name in ('embed', 'unembed')):
      assert not np.array_equal(x, flat_start[path]), path
      moving.append(x.shape)
    else:
      np.testing.assert_array_equal(x, flat_start[path])  # Bit for bit, weight decay too.
  moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == sorted(moving * 2)


def test_cached_decoding_with_adapters_equals_recomputation():
  params = _with_random_adapters(model_lib.init_params(ADAPTER, 0))
  completions = generate.sample(model_lib.graphdef(ADAPTER), params, PROMPTS, max_new_tokens=6,
                                temperature=0.0, stop_tokens=[])
  for prompt, completion in zip(PROMPTS, completions):
    assert prompt + completion.tokens == _recomputed_greedy(ADAPTER, params, prompt, 6)


def test_engine_with_adapters_equals_one_by_one_decoding():
  _engine_matches_one_by_one(ADAPTER, _with_random_adapters(model_lib.init_params(ADAPTER, 0)))


def _adapter_run(tokenizer, init_from, **train):
  config = loop_config.small_run(tokenizer, trainable='adapter', eval_every=12,
                                 checkpoint_every=6, learning_rate=3e-2, **train)
  config.peft.update(kind='adapter', adapter_dim=8)
  config.init_from = init_from
  return config


def test_an_adapter_run_lowers_the_loss_and_keeps_the_base_bit_for_bit(tmp_path,
                                                                       stdlib_tokenizer):
  base_config = loop_config.small_run(stdlib_tokenizer)
  base_cfg = model_lib.ModelConfig.from_config(base_config, 'float32')
  base_params = jax.tree.map(np.asarray, model_lib.init_params(base_cfg, 0))
  checkpoint_lib.save_params(str(tmp_path / 'base'), base_params)  # No adapters in it.
  config = _adapter_run(stdlib_tokenizer, str(tmp_path / 'base'))
  config_lib.validate(config)
  state, _ = train_lib.train(config, str(tmp_path / 'run'))
  rows = [r for r in map(json.loads, open(tmp_path / 'run' / 'metrics.jsonl')) if 'loss' in r]
  # Adapters alone, on a random frozen base with tied embeddings: 6.26 -> 6.12 in 12 steps.
  assert rows[-1]['loss'] < rows[0]['loss'] - 0.1, rows
  params = jax.tree.map(np.asarray, state.params)
  jax.tree.map(np.testing.assert_array_equal, base_params,
               pytree.subtree(params, pytree.leaf_paths(base_params)))
  assert all(np.any(x != 0) for path, x in _peft_leaves(params).items()
             if path[-1].key == 'adapter_up')  # Moved off zero.
  stored = checkpoint_lib._item_shapes(  # pylint: disable=protected-access
      os.path.join(tmp_path / 'run' / 'checkpoints' / '12', 'state'), 'params')
  assert {p[-1] for p in pytree.leaf_paths(stored)} == set(peft.ADAPTER_PARAMS)

  # Generation loads the adapters with the base and runs them (nothing to merge).
  graphdef, loaded, _ = generate.load(config, str(tmp_path / 'run'))
  tokens = _tokens(T=12) % 512
  np.testing.assert_allclose(model_lib.apply(graphdef, loaded, tokens),
                             model_lib.apply(model_lib.graphdef(
                                 model_lib.ModelConfig.from_config(config, 'float32')),
                                 params, tokens), atol=1e-6)


# -------------------------------------------------------------------------------------------
# Prompt tuning.


def _prompted(cfg, base_params, prompt_ND):
  """The base model's weights with a soft prompt set to prompt_ND."""
  params = {**base_params, peft.SOFT_PROMPT: model_lib.init_params(cfg, 0)[peft.SOFT_PROMPT]}
  return peft.set_prompt(params, cfg, prompt_ND)


@pytest.mark.parametrize('block', ['llama', 'gpt2'])
def test_a_soft_prompt_of_real_embeddings_is_that_text_before_the_input(block):
  base = dataclasses.replace(BASE, block=block)
  cfg = dataclasses.replace(base, prompt_tokens=3)
  base_params = jax.tree.map(np.asarray, model_lib.init_params(base, 0))
  p = np.asarray([5, 9, 17], np.int32)
  params = _prompted(cfg, base_params, base_params['embed'][p])
  x = _tokens()
  px = np.concatenate([np.broadcast_to(p, (2, 3)), x], axis=1)
  expected = model_lib.apply(model_lib.graphdef(base), base_params, px)[:, 3:]
  np.testing.assert_allclose(model_lib.apply(model_lib.graphdef(cfg), params, x), expected,
                             atol=1e-6)
  # prompt_init='vocab' starts as exactly the embeddings of its prompt_ids, whatever embed holds.
  vocab = dataclasses.replace(cfg, prompt_ids=(5, 9, 17))
  fresh = {**base_params, peft.SOFT_PROMPT: model_lib.init_params(vocab, 0)[peft.SOFT_PROMPT]}
  np.testing.assert_array_equal(model_lib.apply(model_lib.graphdef(vocab), fresh, x),
                                model_lib.apply(model_lib.graphdef(cfg), params, x))


def test_every_packed_document_reads_the_soft_prompt():
  params = _prompted(PROMPT, jax.tree.map(np.asarray, model_lib.init_params(BASE, 0)),
                     np.random.default_rng(2).normal(0, 0.5, (3, 32)))
  a, b = _tokens(1, 5, seed=1), _tokens(1, 5, seed=2)
  packed = _logits(PROMPT, params, np.concatenate([a, b], 1),
                   np.asarray([[1] * 5 + [2] * 5], np.int32), np.asarray([list(range(5)) * 2]))
  np.testing.assert_allclose(packed[:, :5], _logits(PROMPT, params, a), atol=1e-6)
  np.testing.assert_allclose(packed[:, 5:], _logits(PROMPT, params, b), atol=1e-6)
  no_prompt = _logits(BASE, {k: v for k, v in params.items() if k != peft.SOFT_PROMPT}, b)
  assert np.abs(packed[:, 5:] - no_prompt).max() > 1e-2  # The second document does read it.


def _random_prompt_params():
  base = jax.tree.map(np.asarray, model_lib.init_params(BASE, 0))
  return _prompted(PROMPT, base, np.random.default_rng(3).normal(0, 0.5, (3, 32)))


def test_cached_decoding_with_a_soft_prompt_equals_recomputation():
  params, graphdef = _random_prompt_params(), model_lib.graphdef(PROMPT)
  completions = generate.sample(graphdef, params, PROMPTS, max_new_tokens=6, temperature=0.0,
                                stop_tokens=[])  # Left-padded to one batch.
  for prompt, completion in zip(PROMPTS, completions):
    assert prompt + completion.tokens == _recomputed_greedy(PROMPT, params, prompt, 6)
  with pytest.raises(generate.GenerationError, match='3 soft-prompt positions'):
    generate.sample(graphdef, params, [[1] * 20], max_new_tokens=10)  # 3 + 20 + 10 > 32.


def test_engine_with_a_soft_prompt_equals_one_by_one_decoding():
  _engine_matches_one_by_one(PROMPT, _random_prompt_params())
  with pytest.raises(ValueError, match='soft-prompt positions'):
    engine_lib.Engine(PROMPT, _random_prompt_params()).run(
        [engine_lib.Request([1] * 20, max_new_tokens=10)])


def test_eval_loglikelihood_with_a_soft_prompt_equals_a_direct_computation():
  params, graphdef = _random_prompt_params(), model_lib.graphdef(PROMPT)
  mesh = jax.make_mesh((1,) * len(sharding.MESH_AXES), sharding.MESH_AXES,
                       devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))
  scorer = scoring.Scorer(graphdef, params, None, mesh=mesh, rules=sharding.RULES,
                          batch_size=2, progress=False)
  assert scorer.max_length == PROMPT.max_seq_len - 3
  context = [1, 7, 8, 9]
  requests = [(context, [10, 11]), (context, [12]), ([2, 3], [4, 5, 6])]  # Two share a context.

  def direct(context, continuation):
    whole = np.asarray([context + continuation], np.int32)
    logp = jax.nn.log_softmax(model_lib.apply(graphdef, params, whole[:, :-1])[0])
    return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))

  scored = [lp for lp, _ in scorer.loglikelihood(requests)]
  np.testing.assert_allclose(scored, [direct(*r) for r in requests], rtol=1e-5)


# -------------------------------------------------------------------------------------------
# Config.


def test_peft_config_is_validated_and_errors_name_the_field():
  config = config_lib.base_config()
  config.peft.kind = 'prefix'
  with pytest.raises(config_lib.ConfigError, match='config.peft.kind'):
    config_lib.validate(config)
  config.peft.kind = 'adapter'
  with pytest.raises(config_lib.ConfigError, match="'adapter,embeddings'"):
    config_lib.validate(config)  # trainable='all' would train the base too.
  config.train.trainable = 'adapter'
  config_lib.validate(config)
  assert model_lib.ModelConfig.from_config(config, 'float32').adapter_dim == 16
  config.peft.adapter_dim = 0
  with pytest.raises(config_lib.ConfigError, match='config.peft.adapter_dim'):
    config_lib.validate(config)
  config.peft.adapter_dim, config.lora.rank = 8, 4
  with pytest.raises(config_lib.ConfigError, match='config.lora.rank'):
    config_lib.validate(config)
  config.lora.rank, config.train.trainable = 0, 'prompt'
  with pytest.raises(config_lib.ConfigError, match='names prompt'):
    config_lib.validate(config)
  config.peft.kind = 'prompt'
  config.data.seq_len = config.model.max_seq_len
  with pytest.raises(config_lib.ConfigError, match='config.peft.prompt_tokens'):
    config_lib.validate(config)
  config.data.seq_len = config.model.max_seq_len - config.peft.prompt_tokens
  config_lib.validate(config)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  assert cfg.prompt_tokens == 20 and len(set(cfg.prompt_ids)) == 20
  assert cfg.prompt_ids == model_lib.ModelConfig.from_config(config, 'float32').prompt_ids
  config.peft.prompt_init = 'text'
  with pytest.raises(config_lib.ConfigError, match='config.peft.prompt_init'):
    config_lib.validate(config)
  config.peft.prompt_init, config.model.kind = 'normal', 'encoder_decoder'
  with pytest.raises(config_lib.ConfigError, match='config.model.kind'):
    config_lib.validate(config)
