"""Greedy decoding, the simplest sampler: enough to look at what a model has learned.

Each new token re-runs the model over a fixed-length buffer (causal attention makes the
unfilled tail irrelevant), all inside one jitted fori_loop. Cost is quadratic in length; a
KV-cached decoder replaces this for real generation.
"""

import functools

import jax
import jax.numpy as jnp

from lm import model as model_lib


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_tokens'))
def _greedy(graphdef, params, buffer_1L, prompt_len, num_tokens):
  def body(i, buffer_1L):
    logits_1LV = model_lib.apply(graphdef, params, buffer_1L)
    position = prompt_len + i
    next_token = jnp.argmax(logits_1LV[0, position - 1]).astype(buffer_1L.dtype)
    return buffer_1L.at[0, position].set(next_token)
  return jax.lax.fori_loop(0, num_tokens, body, buffer_1L)


def greedy(graphdef, params, prompt: list[int], num_tokens: int) -> list[int]:
  """The prompt followed by num_tokens greedily chosen tokens."""
  if not prompt:
    raise ValueError('greedy decoding needs a non-empty prompt (e.g. [tokenizer.bos_id])')
  length = len(prompt) + num_tokens
  buffer_1L = jnp.zeros((1, length), jnp.int32).at[0, :len(prompt)].set(jnp.array(prompt))
  out_1L = _greedy(graphdef, params, buffer_1L, len(prompt), num_tokens)
  return [int(t) for t in out_1L[0]]
