"""int8 weight-only quantization: close logits, a quarter of the bytes, the engine serves it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lm import engine as engine_lib
from lm import model as model_lib
from lm import quantize

SMALL = model_lib.ModelConfig(
    vocab_size=97, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96,
    max_seq_len=64, scan_layers=True)
_quantize = jax.jit(quantize.quantize, static_argnames='include_embed')


def test_scales_are_per_output_channel_and_round_trip_within_half_a_step():
  w_LDHQ = jax.random.normal(jax.random.key(0), (2, 8, 3, 4))
  q = quantize.quantize({'blocks': {'attention': {'w_q': w_LDHQ}}})['blocks']['attention']['w_q']
  assert q['int8'].dtype == jnp.int8 and q['scale'].shape == (2, 1, 3, 4)  # One per (L, H, Q).
  assert int(jnp.max(jnp.abs(q['int8']))) == 127  # Each channel's largest weight maps to 127.
  error = jnp.abs(quantize.dequantize(q) - w_LDHQ)
  assert bool(jnp.all(error <= q['scale'] / 2 + 1e-7))


def test_int8_matrices_take_a_quarter_of_the_bytes_and_the_rest_is_untouched():
  params = jax.jit(model_lib.init_params, static_argnums=(0, 1))(SMALL, 0)
  qparams = _quantize(params)
  blocks = qparams['blocks']
  assert blocks['mlp']['w_down']['scale'].shape == (2, 1, 64)  # [L, F, D]: one per (L, D).
  assert blocks['attention']['w_o']['scale'].shape == (2, 1, 1, 64)  # [L, H, Q, D].
  # Embeddings only with include_embed=True; norms never.
  np.testing.assert_array_equal(qparams['embed'], params['embed'])
  np.testing.assert_array_equal(qparams['final_norm']['scale'], params['final_norm']['scale'])
  matrices = [(params['blocks'][m][w], blocks[m][w]) for m, w in [
      ('attention', 'w_q'), ('attention', 'w_k'), ('attention', 'w_v'), ('attention', 'w_o'),
      ('mlp', 'w_up'), ('mlp', 'w_gate'), ('mlp', 'w_down')]]
  matrices.append((params['unembed'], qparams['unembed']))
  fp32 = sum(quantize.num_bytes(w) for w, _ in matrices)
  int8 = sum(quantize.num_bytes(q) for _, q in matrices)
  assert 0.25 <= int8 / fp32 < 0.27  # int8 values plus fp32 per-channel scales.
  with_embed = _quantize(params, include_embed=True)
  assert with_embed['embed']['scale'].shape == (97, 1)  # One per vocabulary row.
  assert quantize.num_bytes(with_embed) < 0.3 * quantize.num_bytes(params)


def test_int8_logits_are_close_to_fp32():
  for tie_embeddings in (False, True):
    cfg = dataclasses.replace(SMALL, tie_embeddings=tie_embeddings)
    graphdef, params = model_lib.init(cfg, 0)
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    fp32_BTV = jax.jit(model_lib.apply, static_argnums=0)(graphdef, params, tokens_BT)
    qparams = quantize.quantize(params, include_embed=True)
    int8_BTV = jax.jit(quantize.apply, static_argnums=0)(graphdef, qparams, tokens_BT)
    relative = jnp.linalg.norm(int8_BTV - fp32_BTV) / jnp.linalg.norm(fp32_BTV)
    assert float(relative) < 0.02


def test_the_engine_serves_int8_params_like_their_dequantized_fp32():
  params = model_lib.init_params(SMALL, 0)
  qparams = quantize.quantize(params)
  requests = [engine_lib.Request(prompt=[3, 1, 4, 1, 5], max_new_tokens=6),
              engine_lib.Request(prompt=[2, 7], max_new_tokens=4)]
  int8 = engine_lib.Engine(SMALL, qparams, slots=2, block_size=8).run(requests)
  dequantized = engine_lib.Engine(SMALL, quantize.dequantize(qparams), slots=2,
                                  block_size=8).run(requests)
  assert [c.tokens for c in int8] == [c.tokens for c in dequantized]
  np.testing.assert_allclose([c.logprobs for c in int8[:1]], [c.logprobs for c in
                                                               dequantized[:1]], atol=1e-5)
