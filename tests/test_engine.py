"""Continuous batching over a paged KV cache equals decoding each request alone."""

import dataclasses

import jax
import numpy as np
import pytest

from lm import engine as engine_lib
from lm import generate
from lm import model as model_lib

# As tests/test_generate.py: scanned layers compile faster; GQA (4 query heads, 2 kv heads).
SMALL = model_lib.ModelConfig(
    vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
    max_seq_len=64, scan_layers=True)


@pytest.fixture(scope='module')
def small():
  return jax.jit(model_lib.init_params, static_argnums=(0, 1))(SMALL, 0)


def _requests(sampling: dict) -> list[engine_lib.Request]:
  """Seven requests, prompts of 1 to 20 tokens, outputs of 1 to 19 tokens; #2 has a stop token
  its greedy output emits (found below), so it ends early."""
  rng = np.random.default_rng(0)
  shapes = [(3, 12), (20, 5), (1, 19), (9, 1), (16, 8), (5, 14), (11, 3)]
  return [engine_lib.Request(prompt=rng.integers(1, SMALL.vocab_size, p).tolist(),
                             max_new_tokens=n, seed=100 + i, **sampling)
          for i, (p, n) in enumerate(shapes)]


def _alone(params, request: engine_lib.Request) -> generate.Completion:
  """generate.sample on the request alone. It decodes 19 tokens (one compilation for every
  request) and is cut to max_new_tokens: a token never depends on how many follow it."""
  [completion] = generate.sample(
      model_lib.graphdef(SMALL), params, [request.prompt], max_new_tokens=19,
      temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
      stop_tokens=list(request.stop_tokens), seed=[request.seed])
  n = request.max_new_tokens
  if len(completion.tokens) <= n:
    return completion
  return generate.Completion(completion.tokens[:n], completion.logprobs[:n], None, 'length')


@pytest.mark.parametrize('sampling, steps_per_call', [
    (dict(temperature=0.0), 8), (dict(temperature=0.9, top_k=20, top_p=0.9), 8),
    (dict(temperature=0.0), 1)], ids=['greedy', 'top_k_top_p', 'greedy_one_step_per_call'])
def test_engine_equals_each_request_decoded_alone(small, sampling, steps_per_call):
  requests = _requests(sampling)
  # Stop request 2 at the 4th token it generates alone.
  stop = _alone(small, dataclasses.replace(requests[2], max_new_tokens=4)).tokens[-1]
  requests[2] = dataclasses.replace(requests[2], stop_tokens=(stop,))
  engine = engine_lib.Engine(SMALL, small, slots=3, block_size=8, steps_per_call=steps_per_call)
  served = engine.run(requests)  # 7 requests through 3 slots.
  for request, completion in zip(requests, served):
    alone = _alone(small, request)
    assert completion.tokens == alone.tokens
    assert completion.finish_reason == alone.finish_reason
    np.testing.assert_allclose(completion.logprobs, alone.logprobs, atol=1e-4)
  assert served[2].finish_reason == 'stop_token' and len(served[2].tokens) <= 4
  assert engine.stats['free_blocks'] == engine.num_blocks - 1  # Everything returned.


def test_blocks_are_freed_and_reused_within_a_small_pool(small):
  """Twelve requests of up to 3 blocks each through a pool of 6 usable blocks: they wait for
  blocks, reuse freed ones, and every completion still equals the request alone."""
  rng = np.random.default_rng(1)
  requests = [engine_lib.Request(prompt=rng.integers(1, 97, int(rng.integers(1, 12))).tolist(),
                                 max_new_tokens=int(rng.integers(2, 14))) for _ in range(12)]
  engine = engine_lib.Engine(SMALL, small, slots=4, block_size=8, num_blocks=7)
  served = engine.run(requests)
  assert engine.stats['peak_blocks_used'] <= 6
  assert engine.stats['block_allocations'] > 6  # Blocks were handed out again after release.
  assert engine.stats['free_blocks'] == 6
  for request in (requests[0], requests[-1]):
    assert served[requests.index(request)].tokens == _alone(small, request).tokens
  # A lazily grown sequence takes only the blocks its tokens fill: 1 token fits in 1 block.
  engine.run([engine_lib.Request(prompt=[5], max_new_tokens=2)])
  assert engine.stats['block_allocations'] == 1


def test_a_request_that_cannot_fit_is_refused_with_the_sizes(small):
  engine = engine_lib.Engine(SMALL, small, slots=2, block_size=8, num_blocks=3)
  with pytest.raises(ValueError, match=r'request 1 needs 3 blocks of 8 tokens .* has 2'):
    engine.run([engine_lib.Request(prompt=[1], max_new_tokens=4),
                engine_lib.Request(prompt=[1] * 10, max_new_tokens=10)])
  with pytest.raises(ValueError, match='max_seq_len=64'):
    engine.run([engine_lib.Request(prompt=[1] * 60, max_new_tokens=10)])
  with pytest.raises(ValueError, match='top_p=0'):
    engine.run([engine_lib.Request(prompt=[1], temperature=1.0, top_p=0.0)])
