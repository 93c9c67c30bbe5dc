import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import flops
from lm import model as model_lib

SMALL = model_lib.ModelConfig(
    vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
    max_seq_len=32)


def _tokens(B=2, T=16, seed=0, vocab=97):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab)


def _logits(cfg, tokens, segment_ids=None, positions=None, seed=0):
  graphdef, params = model_lib.init(cfg, seed)
  return model_lib.apply(graphdef, params, tokens, segment_ids, positions)


@pytest.mark.parametrize('block', ['llama', 'gpt2'])
@pytest.mark.parametrize('tie', [False, True])
def test_shapes_and_dtypes(block, tie):
  cfg = dataclasses.replace(SMALL, block=block, tie_embeddings=tie)
  graphdef, params = model_lib.init(cfg, 0)
  logits = model_lib.apply(graphdef, params, _tokens())
  assert logits.shape == (2, 16, 97) and logits.dtype == jnp.float32
  assert ('unembed' in params) == (not tie)
  assert ('pos_embed' in params) == (block == 'gpt2')
  assert params['blocks']['mlp']['w_up'].shape == (2, 32, 48)  # Stacked over layers.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize('block', ['llama', 'gpt2'])
def test_every_param_has_logical_axes_of_its_rank(block):
  cfg = dataclasses.replace(SMALL, block=block)
  _, params = model_lib.init(cfg, 0)
  axes = model_lib.logical_axes(cfg)
  shapes = jax.tree.map(lambda x: x.ndim, params)
  ranks = jax.tree.map(len, axes, is_leaf=lambda x: isinstance(x, tuple))
  assert shapes == ranks
  assert axes['blocks']['attention']['w_k'] == ('layers', 'embed', 'kv_heads', 'head_dim')
  assert axes['embed'] == ('vocab', 'embed')


@pytest.mark.parametrize('block', ['llama', 'gpt2'])
@pytest.mark.parametrize('attention', ['xla', 'einsum'])
def test_causal_changing_a_token_never_changes_earlier_logits(block, attention):
  cfg = dataclasses.replace(SMALL, block=block, attention=attention)
  tokens = _tokens(B=1)
  t = 9
  changed = tokens.at[0, t].set((tokens[0, t] + 1) % 97)
  a, b = _logits(cfg, tokens), _logits(cfg, changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize('block', ['llama', 'gpt2'])
@pytest.mark.parametrize('attention', ['xla', 'einsum'])
def test_packed_documents_equal_documents_run_alone(block, attention):
  cfg = dataclasses.replace(SMALL, block=block, attention=attention)
  doc_a, doc_b = _tokens(B=1, T=6, seed=1), _tokens(B=1, T=10, seed=2)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segment_ids = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  out = _logits(cfg, packed, segment_ids, positions)
  np.testing.assert_allclose(out[:, :6], _logits(cfg, doc_a), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[:, 6:], _logits(cfg, doc_b), atol=1e-5, rtol=1e-5)


def test_gqa_with_kv_heads_repeated_equals_mha():
  gqa = SMALL  # 4 query heads, 2 kv heads.
  mha = dataclasses.replace(SMALL, num_kv_heads=4)
  graphdef, params = model_lib.init(gqa, 0)
  mha_graphdef, mha_params = model_lib.init(mha, 0)
  # Query head h uses kv head h // G (G = 2): repeat each kv head G times along the head axis.
  attn = dict(params['blocks']['attention'])
  for name in ('w_k', 'w_v'):
    attn[name] = jnp.repeat(attn[name], 2, axis=2)
  mha_params = jax.tree.map(lambda x: x, params)
  mha_params['blocks']['attention'] = attn
  tokens = _tokens()
  np.testing.assert_allclose(
      model_lib.apply(graphdef, params, tokens),
      model_lib.apply(mha_graphdef, mha_params, tokens), atol=1e-5, rtol=1e-5)


def test_mqa_runs():
  cfg = dataclasses.replace(SMALL, num_kv_heads=1)
  _, params = model_lib.init(cfg, 0)
  assert params['blocks']['attention']['w_k'].shape == (2, 32, 1, 8)
  assert _logits(cfg, _tokens()).shape == (2, 16, 97)


@pytest.mark.parametrize('block', ['llama', 'gpt2'])
def test_bf16_compute_close_to_fp32(block):
  cfg = dataclasses.replace(SMALL, block=block)
  fp32 = _logits(cfg, _tokens())
  bf16 = _logits(dataclasses.replace(cfg, dtype='bfloat16'), _tokens())
  assert bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(fp32 - bf16))) < 0.05 * float(jnp.max(jnp.abs(fp32)))
  np.testing.assert_array_equal(jnp.argmax(fp32[..., :5], -1), jnp.argmax(bf16[..., :5], -1))


@pytest.mark.parametrize('variant', [
    {'scan_layers': True}, {'remat': True}, {'scan_layers': True, 'remat': True},
    {'attention': 'einsum'}])
def test_execution_variants_match_and_share_the_checkpoint_layout(variant):
  cfg = dataclasses.replace(SMALL, **variant)
  graphdef, params = model_lib.init(SMALL, 0)
  other_graphdef, other_params = model_lib.init(cfg, 0)
  assert jax.tree.structure(params) == jax.tree.structure(other_params)
  tokens = _tokens()

  def loss(graphdef, params):
    return jnp.mean(model_lib.apply(graphdef, params, tokens) ** 2)

  np.testing.assert_allclose(loss(graphdef, params), loss(other_graphdef, params), rtol=1e-5)
  grads = jax.grad(loss, argnums=1)(graphdef, params)
  other_grads = jax.grad(loss, argnums=1)(other_graphdef, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
               grads, other_grads)


def test_param_count_matches_flops_accounting():
  for cfg in (SMALL, dataclasses.replace(SMALL, block='gpt2')):
    _, params = model_lib.init(cfg, 0)
    lookups_norms_biases = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
      name = path[-1].key
      if name in ('embed', 'pos_embed', 'scale', 'bias') or name.startswith('b_'):
        lookups_norms_biases += x.size
    assert model_lib.count_params(params) - lookups_norms_biases == flops.matmul_params(cfg)


def test_greedy_decoding_matches_argmax_of_a_full_forward_pass():
  from lm import generate
  graphdef, params = model_lib.init(SMALL, 0)
  out = generate.greedy(graphdef, params, [5, 7, 11], num_tokens=6)
  assert out[:3] == [5, 7, 11] and len(out) == 9
  logits = model_lib.apply(graphdef, params, jnp.array([out]))
  np.testing.assert_array_equal(np.argmax(logits[0, 2:-1], -1), out[3:])
