"""Parameter-efficient fine-tuning beside LoRA (lm/lora.py), chosen by config.peft.kind.

'adapter' (Houlsby et al., 2019): a bottleneck h + W_up gelu(h W_down + b_down) on the output h
of every attention, cross-attention and MLP (or MoE) sub-layer, before the residual add, in every
block of every stack. W_down [D, r] starts like the model's weights, W_up [r, D] at zero, so a
model with fresh adapters computes exactly the base model's outputs. The up projection has no bias:
every adapter parameter then carries the logical axis 'adapter_dim', which config.train.trainable's
'adapter' group selects. Adapters are nonlinear, so they cannot be merged into the base weights;
generation, evaluation and lm.engine run them as part of the model.

'prompt' (Lester et al., 2021): N trainable embeddings, the soft prompt, prepended to every row
before the first block (a decoder's alone). The soft prompt sits at positions 0 .. N-1 and the
model shifts every real token's position by N, so callers keep counting positions from 0; the
model returns logits for the real tokens only, so no loss ever sees the soft positions. Without a
KV cache (training, scoring) it is prepended once per row in segment attention.SHARED_PREFIX,
which every packed document of the row attends to (and padding does not). With a KV cache the
caller writes it first (`Transformer.prefill_prompt`: slots 0 .. N-1, segment 1, the segment of
every decoded row) and the prompt follows. max_seq_len counts the N soft positions.

With prompt_init='vocab' the soft prompt is embed[prompt_ids] + soft_prompt, soft_prompt starting
at zero: ids drawn from the vocabulary (config.peft.prompt_seed) so it starts as the embeddings of
real tokens, the embeddings of the checkpoint it is trained from (config.init_from) rather than of
a fresh model. With 'normal' it is soft_prompt alone, drawn like the embeddings.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('lora', 'adapter', 'prompt')
PROMPT_INITS = ('vocab', 'normal')
# The parameters config.peft adds: the adapters' (leaves of Adapter modules in the blocks) and the
# soft prompt. A base checkpoint lacks them, so config.init_from starts them fresh.
ADAPTER_PARAMS = ('adapter_down', 'adapter_down_bias', 'adapter_up')
SOFT_PROMPT = 'soft_prompt'


def is_peft(name: str) -> bool:
  """Whether a parameter (its last path key) is one config.peft adds."""
  return name in ADAPTER_PARAMS or name == SOFT_PROMPT


def prompt_ids(vocab_size: int, prompt_tokens: int, seed: int) -> tuple[int, ...]:
  """The vocabulary ids whose embeddings a 'vocab'-initialised soft prompt starts from: distinct
  when the vocabulary allows, the same for the same seed (so every load rebuilds them)."""
  rng = np.random.default_rng(seed)
  ids = rng.choice(vocab_size, prompt_tokens, replace=prompt_tokens > vocab_size)
  return tuple(int(i) for i in ids)


class Adapter(nnx.Module):
  """The bottleneck x + gelu(x W_down + b_down) W_up on a sub-layer's output x_BTD."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, R, dtype = cfg.d_model, cfg.adapter_dim, jnp.dtype(cfg.param_dtype)
    # A stream of its own ('peft'), so the base weights are the same with or without adapters.
    self.adapter_down = nnx.Param(cfg.init_std * jax.random.normal(rngs.peft(), (D, R), dtype),
                                  logical_axes=('embed', 'adapter_dim'))
    self.adapter_down_bias = nnx.Param(jnp.zeros((R,), dtype), logical_axes=('adapter_dim',))
    self.adapter_up = nnx.Param(jnp.zeros((R, D), dtype), logical_axes=('adapter_dim', 'embed'))

  def __call__(self, x_BTD):
    dt = self.cfg.dtype
    rows = x_BTD.shape[:-1]
    x_ND = x_BTD.reshape(math.prod(rows), -1)
    down_NR = (jnp.dot(x_ND, self.adapter_down[...].astype(dt))
               + self.adapter_down_bias[...].astype(dt)[None, :])
    up_ND = jnp.dot(jax.nn.gelu(down_NR, approximate=True), self.adapter_up[...].astype(dt))
    return x_BTD + up_ND.reshape(x_BTD.shape)


def init_soft_prompt(cfg, rngs: nnx.Rngs) -> nnx.Param:
  """[N, D]: zeros over embed[prompt_ids] ('vocab'), or normal(init_std) ('normal')."""
  shape, dtype = (cfg.prompt_tokens, cfg.d_model), jnp.dtype(cfg.param_dtype)
  if cfg.prompt_ids:
    value = jnp.zeros(shape, dtype)
  else:
    value = cfg.init_std * jax.random.normal(rngs.peft(), shape, dtype)
  return nnx.Param(value, logical_axes=('prompt_tokens', 'embed'))


def prompt_embeddings(model) -> jax.Array:
  """The soft prompt the model prepends, [N, D] in param dtype."""
  prompt_ND = model.soft_prompt[...]
  if model.cfg.prompt_ids:
    ids = jnp.asarray(model.cfg.prompt_ids, jnp.int32)
    prompt_ND = jnp.take(model.embed[...], ids, axis=0) + prompt_ND
  return prompt_ND


def set_prompt(params: dict, cfg, prompt_ND) -> dict:
  """params whose soft prompt is prompt_ND (e.g. the embeddings of a real text); exact with
  prompt_init='normal', up to rounding over embed[prompt_ids] with 'vocab'."""
  soft = jnp.asarray(prompt_ND, params[SOFT_PROMPT].dtype)
  if cfg.prompt_ids:
    soft = soft - jnp.take(params['embed'], jnp.asarray(cfg.prompt_ids), axis=0)
  return {**params, SOFT_PROMPT: soft}
