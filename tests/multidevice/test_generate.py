"""KV-cached decoding with parameters and cache sharded on 8 fake CPU devices equals one device."""

import jax
import ml_collections
import numpy as np

from lm import generate
from lm import kv_cache
from lm import model as model_lib
from lm import sharding

CFG = model_lib.ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
    max_seq_len=32, scan_layers=True)
PROMPTS = [[1, 5, 9], [1, 2], [1, 7, 7, 7, 3], [1]]


def test_sharded_sampling_equals_one_device():
  graphdef, params = model_lib.init(CFG, 0)
  kwargs = dict(max_new_tokens=6, temperature=0.8, top_k=10, seed=3)
  alone = generate.sample(graphdef, params, PROMPTS, **kwargs)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': 2, 'tensor': 2}))
  shardings = sharding.tree_shardings(model_lib.logical_axes(CFG), params, mesh, sharding.RULES)
  sharded_params = jax.device_put(params, shardings)
  generate._sample.clear_cache()  # pylint: disable=protected-access
  with sharding.active(mesh, sharding.RULES):
    sharded = generate.sample(graphdef, sharded_params, PROMPTS, **kwargs)
  assert [c.tokens for c in sharded] == [c.tokens for c in alone]
  np.testing.assert_allclose([c.logprobs for c in sharded], [c.logprobs for c in alone],
                             atol=1e-5)


def test_cache_is_split_by_batch_and_kv_heads():
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': 2, 'tensor': 2}))
  with sharding.active(mesh, sharding.RULES):
    cache = jax.jit(lambda: kv_cache.init(CFG, 4, 16))()
  assert tuple(cache['k'].sharding.spec)[:4] == (None, ('data', 'fsdp'), None, 'tensor')
  assert cache['k'].addressable_shards[0].data.shape == (2, 1, 16, 1, 8)  # [L, B, S, K, Q]
