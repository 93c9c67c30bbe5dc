"""lm.eval's scorer with the model and batches sharded on 8 fake CPU devices equals one device."""

import jax
import ml_collections
import numpy as np
import pytest

from lm import generate
from lm import sharding
from lm.eval import scoring

REQUESTS = [([1] + list(range(5, 5 + n)), list(range(40, 40 + k)))
            for n, k in [(3, 2), (20, 5), (70, 9), (1, 1), (9, 30), (110, 4)]]
REQUESTS += [([1, 7, 8, 9, 10], choice) for choice in ([5], [6, 7], [8, 9, 10], [11])]  # Shared.
PROMPTS = [[1, 9, 8, 7], [1] + list(range(3, 60)), [1, 5]]


@pytest.fixture(scope='module')
def single_device(tiny_llama):
  """The reference: parameters and batches on the first device alone."""
  graphdef, params, tokenizer, _ = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  devices = jax.devices()[:1]
  mesh = jax.make_mesh((1,) * len(sharding.MESH_AXES), sharding.MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))
  params = jax.device_put(params, devices[0])
  return scoring.Scorer(graphdef, params, tokenizer, mesh=mesh, rules=sharding.RULES,
                        batch_size=8, progress=False)


@pytest.mark.parametrize('shape', [(8, 1, 1), (2, 2, 2)])
def test_sharded_scores_and_generations_equal_one_device(tiny_llama, single_device, shape):
  mesh = ml_collections.ConfigDict(dict(zip(('data', 'fsdp', 'tensor'), shape), rules=''))
  sharded = scoring.Scorer.load(tiny_llama.lm, dtype='float32', batch_size=8, mesh_config=mesh,
                                progress=False)
  assert sharded.mesh.devices.size == 8
  leaf = sharded.params['blocks']['attention']['w_q']
  assert len(leaf.sharding.device_set) == 8
  want = single_device.loglikelihood(REQUESTS)
  got = sharded.loglikelihood(REQUESTS)
  np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in want], rtol=1e-5)
  assert [g for _, g in got] == [g for _, g in want]
  rolling = sharded.rolling_loglikelihood([list(range(3, 300))])
  np.testing.assert_allclose(rolling, single_device.rolling_loglikelihood([list(range(3, 300))]),
                             rtol=1e-5)
  want_texts = single_device.generate(PROMPTS, max_new_tokens=6)
  generate._sample.clear_cache()  # pylint: disable=protected-access  # Traced under one mesh.
  assert sharded.generate(PROMPTS, max_new_tokens=6) == want_texts
  generate._sample.clear_cache()  # pylint: disable=protected-access
