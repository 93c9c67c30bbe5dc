import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import attention

# (B, T, H, K, Q): MHA, GQA and MQA; T = 37 and 100 do not divide by the block sizes used below.
SHAPES = [(2, 37, 4, 4, 8), (2, 37, 4, 2, 8), (1, 100, 6, 1, 16), (3, 64, 2, 2, 4)]


def _inputs(B, T, H, K, Q, seed=0):
  """Random q, k, v and packed segment ids: 1-4 documents per row, of random lengths."""
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, T, H, Q))
  k = jax.random.normal(keys[1], (B, T, K, Q))
  v = jax.random.normal(keys[2], (B, T, K, Q))
  rng = np.random.default_rng(seed)
  segment_ids = np.ones((B, T), np.int32)
  for b in range(B):
    for start in rng.choice(np.arange(1, T), rng.integers(0, 4), replace=False):
      segment_ids[b, start:] += 1
  return q, k, v, jnp.asarray(segment_ids)


def _reference(q, k, v, segment_ids):
  return attention.einsum_attention(q, k, v, attention.segment_causal_mask(segment_ids))


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('block_size', [16, 64])
def test_blocked_equals_einsum_forward_and_gradients(shape, block_size):
  q, k, v, segment_ids = _inputs(*shape)
  blocked = functools.partial(attention.blocked_attention, block_size=block_size)
  np.testing.assert_allclose(jax.jit(blocked)(q, k, v, segment_ids),
                             _reference(q, k, v, segment_ids), atol=1e-5, rtol=1e-5)

  cotangent = jax.random.normal(jax.random.key(1), q.shape)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, segment_ids) * cotangent)

  # Jitted: run op by op, the unrolled blocks' backward compiles hundreds of tiny programs.
  grads = jax.jit(jax.grad(functools.partial(loss, blocked), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(functools.partial(loss, _reference), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('implementation', ['auto', 'xla', 'einsum', 'blocked'])
def test_every_implementation_equals_the_reference(implementation):
  q, k, v, segment_ids = _inputs(2, 37, 4, 2, 8, seed=3)
  out = attention.causal_attention(q, k, v, segment_ids, implementation=implementation)
  np.testing.assert_allclose(out, _reference(q, k, v, segment_ids), atol=1e-5, rtol=1e-5)


def test_blocked_keeps_documents_apart_and_is_causal():
  q, k, v, _ = _inputs(1, 40, 2, 2, 8, seed=4)
  segment_ids = jnp.array([[1] * 25 + [2] * 15])
  out = attention.blocked_attention(q, k, v, segment_ids, block_size=16)
  # The second document alone, from position 0, gives the same outputs.
  alone = attention.blocked_attention(q[:, 25:], k[:, 25:], v[:, 25:], segment_ids[:, 25:] * 0,
                                      block_size=16)
  np.testing.assert_allclose(out[:, 25:], alone, atol=1e-5, rtol=1e-5)
  # Changing a later key or value never changes an earlier output.
  changed = attention.blocked_attention(q, k.at[:, 30].add(1.0), v.at[:, 30].add(1.0),
                                        segment_ids, block_size=16)
  np.testing.assert_array_equal(out[:, :30], changed[:, :30])
  assert not np.allclose(out[:, 30:], changed[:, 30:])


def test_blocked_bf16_close_to_fp32():
  q, k, v, segment_ids = _inputs(2, 37, 4, 2, 8, seed=5)
  fp32 = attention.blocked_attention(q, k, v, segment_ids, block_size=16)
  bf16 = attention.blocked_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                     v.astype(jnp.bfloat16), segment_ids, block_size=16)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf16.astype(jnp.float32), fp32, atol=5e-2, rtol=5e-2)


def _bidirectional_reference(q, k, v, segment_ids):
  """Softmax over every key of the query's document (numpy, fp64, one query at a time)."""
  q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, segment_ids))
  B, T, H, Q = q.shape
  G = H // k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for t in range(T):
      keys = seg[b] == seg[b, t]
      for h in range(H):
        scores = k[b, keys, h // G] @ q[b, t, h] / np.sqrt(Q)
        p = np.exp(scores - scores.max())
        out[b, t, h] = (p / p.sum()) @ v[b, keys, h // G]
  return out


@pytest.mark.parametrize('implementation', ['xla', 'einsum', 'auto'])
def test_bidirectional_attends_to_the_whole_document_only(implementation):
  q, k, v, segment_ids = _inputs(2, 21, 4, 2, 8, seed=3)
  out = jax.jit(functools.partial(attention.causal_attention, implementation=implementation,
                                  causal=False))(q, k, v, segment_ids)
  np.testing.assert_allclose(out, _bidirectional_reference(q, k, v, segment_ids), atol=1e-5)


def test_bidirectional_blocked_is_refused():
  q, k, v, segment_ids = _inputs(1, 8, 2, 2, 4)
  with pytest.raises(ValueError, match="'blocked' computes only the causal"):
    attention.causal_attention(q, k, v, segment_ids, implementation='blocked', causal=False)


def test_cudnn_is_a_choice_that_fails_clearly_where_cudnn_cannot_run():
  """model.attention='cudnn' forces jax.nn.dot_product_attention's cuDNN kernel; off an NVIDIA
  GPU (here) tracing it raises instead of silently running another kernel."""
  from lm import config as config_lib
  config = config_lib.load_config('configs/tiny.py')
  config.model.attention = 'cudnn'
  config_lib.validate(config)
  q = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
  segment_ids = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(RuntimeError, match='cuDNN'):
    attention.causal_attention(q, q, q, segment_ids, implementation='cudnn')
