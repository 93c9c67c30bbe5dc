"""The encoder-decoder (model.kind='encoder_decoder' in lm/model.py): bidirectional encoder,
causal decoder with cross-attention, decoding with the KV cache, FLOPs and the memory plan; its
span-corruption training loop (lm/span_corruption.py) on real text."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import flops
from lm import generate
from lm import kv_cache
from lm import model as model_lib
from lm import span_corruption
from lm import train as train_lib

import loop_config

SEQ2SEQ = model_lib.ModelConfig(
    kind='encoder_decoder', vocab_size=97, d_model=32, num_layers=2, encoder_layers=3,
    num_heads=4, num_kv_heads=2, d_ff=48, max_seq_len=32, attention='einsum')


def _tokens(shape, seed):
  return jax.random.randint(jax.random.key(seed), shape, 5, SEQ2SEQ.vocab_size)


def test_encoder_sees_the_whole_input_and_the_decoder_only_its_past():
  graphdef, params = model_lib.init(SEQ2SEQ, 0)
  apply = jax.jit(lambda inputs, targets: model_lib.apply_encoder_decoder(
      graphdef, params, inputs, targets)[0])
  inputs, targets = _tokens((2, 10), 1), _tokens((2, 6), 2)
  logits = apply(inputs, targets)
  # Any input token, the last one included, changes the decoder's very first logits.
  changed = apply(inputs.at[:, -1].add(1), targets)
  assert float(jnp.abs(changed[:, 0] - logits[:, 0]).max()) > 1e-4
  # A decoder token changes only its own and later positions.
  later = apply(inputs, targets.at[:, 3].add(1))
  np.testing.assert_array_equal(later[:, :3], logits[:, :3])
  assert float(jnp.abs(later[:, 3:] - logits[:, 3:]).max()) > 1e-4
  # Padding of the input (segment 0) is not attended to: a padded input decodes the same.
  padded = jnp.concatenate([inputs, jnp.zeros((2, 4), inputs.dtype)], axis=1)
  segments = jnp.concatenate([jnp.ones((2, 10), jnp.int32), jnp.zeros((2, 4), jnp.int32)], 1)
  with_padding, _ = model_lib.apply_encoder_decoder(graphdef, params, padded, targets, segments)
  np.testing.assert_allclose(with_padding, logits, atol=1e-5)


def test_parameters_flops_and_embeddings():
  for shared in (True, False):
    cfg = dataclasses.replace(SEQ2SEQ, shared_embeddings=shared)
    params = model_lib.init_params(cfg, 0)
    assert ('encoder_embed' in params) != shared
    assert set(params['blocks']) == {'attention_norm', 'attention', 'cross_attention_norm',
                                     'cross_attention', 'mlp_norm', 'mlp'}
    assert set(params['encoder_blocks']) == {'attention_norm', 'attention', 'mlp_norm', 'mlp'}
    assert params['encoder_blocks']['mlp']['w_up'].shape[0] == 3
    assert flops.matmul_params(cfg) == flops.matmul_param_counts(params)[0]
    axes = model_lib.logical_axes(cfg)
    assert axes['blocks']['cross_attention']['w_k'] == ('layers', 'embed', 'kv_heads', 'head_dim')
  # Per raw token: the encoder and the cross-attention's keys and values on every input token,
  # the rest of the decoder on every target token, and the attention pairs.
  params = model_lib.init_params(SEQ2SEQ, 0)
  I, O, R = 14, 5, 16
  per_token = flops.encoder_decoder_flops_per_token(SEQ2SEQ, params, raw_len=R, inputs_len=I,
                                                    targets_len=O)
  D, H, K, Q, F, L, Le, V = 32, 4, 2, 8, 48, 2, 3, 97
  attention, mlp = D * Q * (2 * H + 2 * K), 3 * D * F
  encoder, cross_kv = Le * (attention + mlp), L * 2 * D * K * Q
  decoder = L * (2 * attention + mlp) - cross_kv + D * V
  expected = (6 * (I * (encoder + cross_kv) + O * decoder)
              + 12 * H * Q * (Le * I * I + L * (O * O + O * I))) / R
  assert per_token == pytest.approx(expected)


def test_cached_decoding_equals_recomputation_and_generate_uses_it():
  graphdef, params = model_lib.init(SEQ2SEQ, 0)
  model = jax.jit(lambda inputs, targets: model_lib.apply_encoder_decoder(
      graphdef, params, inputs, targets)[0])
  prompts = [[1, 7, 8, 9, 10, 2], [1, 11, 12, 2]]
  completions = generate.sample(graphdef, params, prompts, max_new_tokens=6, temperature=0.0,
                                stop_tokens=[])
  for prompt, completion in zip(prompts, completions):
    decoded = [SEQ2SEQ.decoder_start_id]
    for _ in range(6):  # Greedy, recomputing the whole decoder input at every step.
      logits = model(jnp.array([prompt]), jnp.array([decoded]))
      decoded.append(int(jnp.argmax(logits[0, -1])))
    assert completion.tokens == decoded[1:]  # Left-padded in a batch, as decoded alone.
  beams = generate.beam_search(graphdef, params, prompts, max_new_tokens=4, num_beams=3,
                               num_return=3, stop_tokens=[])
  for prompt, ranked in zip(prompts, beams):
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
    for c in ranked:  # Each beam's log-probabilities are the model's own.
      decoder_in = jnp.array([[SEQ2SEQ.decoder_start_id] + c.tokens[:-1]])
      logprobs = jax.nn.log_softmax(model(jnp.array([prompt]), decoder_in)[0])
      np.testing.assert_allclose(
          [float(logprobs[t, token]) for t, token in enumerate(c.tokens)], c.logprobs, atol=1e-4)
  with pytest.raises(generate.GenerationError, match="more than the model's max_seq_len=32"):
    generate.sample(graphdef, params, [[1] * 33], max_new_tokens=2)
  cache = kv_cache.init(SEQ2SEQ, 2, 4, input_segment_ids_BS=jnp.ones((2, 6), jnp.int32))
  assert cache['cross_k'].shape == (2, 2, 6, 2, 8)


def test_scan_remat_and_moe_layers_compute_the_same():
  inputs, targets = _tokens((2, 9), 3), _tokens((2, 5), 4)
  for cfg in (SEQ2SEQ, dataclasses.replace(SEQ2SEQ, encoder_layers=2, moe_num_experts=4,
                                           moe_top_k=2, moe_capacity_factor=4.0)):
    graphdef, params = model_lib.init(cfg, 0)
    logits, aux = model_lib.apply_encoder_decoder(graphdef, params, inputs, targets)
    scanned = dataclasses.replace(cfg, scan_layers=True, remat=True)
    logits_scanned, aux_scanned = model_lib.apply_encoder_decoder(
        model_lib.graphdef(scanned), params, inputs, targets)
    np.testing.assert_allclose(logits_scanned, logits, atol=2e-5)
    if cfg.moe_num_experts:  # Both stacks' MoE layers, the encoder's first.
      assert aux['load_balance'].shape == (4,)
      np.testing.assert_allclose(aux_scanned['load_balance'], aux['load_balance'], atol=1e-5)


def test_config_errors_name_the_field():
  config = config_lib.load_config('configs/t5_tiny.py')
  config_lib.validate(config)
  tiny = config_lib.load_config('configs/tiny.py')
  tiny.model.kind = 'encoder_decoder'  # What --config.model.kind=encoder_decoder does.
  config_lib.validate(tiny)
  for dotted, value, message in [
      ('mode', 'dpo', "config.mode='dpo': config.model.kind='encoder_decoder' trains"),
      ('model.attention', 'blocked', "config.model.attention='blocked'"),
      ('model.encoder_layers', -1, 'config.model.encoder_layers=-1'),
      ('span_corruption.sentinels', 3, 'config.span_corruption.sentinels=3: a row of '
       'config.data.seq_len=128 tokens has 6 noise spans'),
      ('span_corruption.noise_density', 1.5, 'config.span_corruption with config.data.seq_len')]:
    bad = config_lib.load_config('configs/t5_tiny.py')
    section, field = dotted.rsplit('.', 1) if '.' in dotted else (None, dotted)
    (bad if section is None else bad[section.split('.')[0]])[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(bad)


def test_the_engine_refuses_an_encoder_decoder():
  graphdef, params = model_lib.init(SEQ2SEQ, 0)
  del graphdef
  from lm import engine  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="kind='encoder_decoder' decodes with lm.generate"):
    engine.Engine(SEQ2SEQ, params)


# ---------------------------------------------------------------------------------------------
# Training on real text.


def _loop_config(tokenizer='', **train):
  config = loop_config.small_run(tokenizer, **train)
  config.model.update(kind='encoder_decoder', encoder_layers=2)
  config.span_corruption.sentinels = 8
  return config


@pytest.fixture(scope='module')
def sentinel_tokenizer(tmp_path_factory):
  """The tokenizer the pipeline trains for an encoder_decoder (data.tokenizer empty)."""
  workdir = str(tmp_path_factory.mktemp('seq2seq'))
  data_config = span_corruption.data_config(_loop_config(), workdir)
  assert data_config.tokenizer.startswith(workdir)
  first, eos = span_corruption.sentinel_ids(_loop_config(data_config.tokenizer))
  assert (first, eos) == (span_corruption.FIRST_SENTINEL_ID, 2)
  return data_config.tokenizer


def test_span_corruption_loss_on_real_text_falls(tmp_path, sentinel_tokenizer):
  config = _loop_config(sentinel_tokenizer, steps=200, eval_every=200, checkpoint_every=200,
                        log_every=10, eval_batches=4, batch_size=16, warmup_steps=10)
  _, metrics = train_lib.train(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_rows = [r for r in rows if 'loss' in r]
  assert train_rows[0]['loss'] > 0.95 * np.log(512)  # Starts near uniform.
  assert train_rows[-1]['loss'] < 0.7 * np.log(512), train_rows[-1]
  assert metrics['eval_loss'] < 0.7 * np.log(512), metrics
  assert 0.1 < metrics['eval_target_accuracy'] < 1.0, metrics
  assert 0 < metrics['eval_bits_per_byte'] < metrics['eval_loss'] / np.log(2)
  # Generation reads the checkpoint: the encoder reads the prompt, the decoder writes targets
  # that start with a sentinel, the first thing every training target holds.
  config.sample.update(prompt='def f(x):<extra_id_0> x + 1', temperature=0.0,
                       max_new_tokens=8)
  [(prompt, [completion])] = generate.sample_from_config(config, str(tmp_path))
  assert prompt == config.sample.prompt
  assert completion.tokens[0] == span_corruption.FIRST_SENTINEL_ID, completion
  assert len(completion.tokens) <= 8


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path, sentinel_tokenizer):
  config = _loop_config(sentinel_tokenizer, steps=6, eval_every=6, checkpoint_every=3)
  straight, _ = train_lib.train(config, str(tmp_path / 'straight'))
  config.train.steps_per_run = 3
  first, _ = train_lib.train(config, str(tmp_path / 'resumed'))
  config.train.steps_per_run = 0
  assert int(first.step) == 3
  resumed, _ = train_lib.train(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == int(straight.step) == 6
  for a, b in zip(jax.tree.leaves((straight.params, straight.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('remat', [False, True])
def test_the_memory_plan_is_within_15_percent_of_xla(remat):
  from lm import memory  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config('configs/t5_tiny.py')
  config.model.update(dtype='float32', remat=remat, scan_layers=remat)
  config.train.batch_size = 8
  planned = memory.estimate(config).train_step
  compiled = memory.xla_bytes(config)['total']
  assert 0.85 < planned / compiled < 1.15, (planned, compiled)
