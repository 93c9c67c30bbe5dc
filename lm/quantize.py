"""int8 weight-only quantization: symmetric, one scale per output channel of each matmul weight.

`quantize(params)` returns the same params tree with each matmul weight (attention w_q, w_k,
w_v, w_o; MLP w_up, w_gate, w_down; unembed; embed too with include_embed) replaced by
{'int8': int8 values, 'scale': fp32 scales}; norms and biases stay as they are. A scale covers
one output channel: the max |w| over the axes the matmul contracts (lm/model.py `dense`),
divided by 127. embed's scale is per vocabulary row, which serves both the lookup and the tied
unembedding (x @ embed.T, whose output channel is the row).

`dequantize(qparams)` rebuilds ordinary params (w = int8 * scale). Call it inside the jitted
function, so only the int8 tree is held in memory and XLA converts weights as it needs them; the
model itself does not change (lm/engine.py and `apply` below do this). Trees without quantized
leaves pass through unchanged.
"""

import jax
import jax.numpy as jnp

from lm import model as model_lib
from lm import pytree

# Per weight: how many leading axes (after 'layers' for the stacked blocks) its matmul contracts.
CONTRACTED_AXES = {'w_q': 1, 'w_k': 1, 'w_v': 1, 'w_o': 2, 'w_up': 1, 'w_gate': 1, 'w_down': 1,
                   'unembed': 1}


def _is_quantized(leaf) -> bool:
  return isinstance(leaf, dict) and set(leaf) == {'int8', 'scale'}


def quantize_array(w, reduce_axes: tuple[int, ...]) -> dict:
  """{'int8', 'scale'} with w ~= int8 * scale, the scale taken over reduce_axes (kept as 1s)."""
  w = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=reduce_axes, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)  # An all-zero channel stays zero.
  int8 = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return {'int8': int8, 'scale': scale}


def _reduce_axes(path: tuple[str, ...]) -> tuple[int, ...] | None:
  """The axes a weight's scale is taken over, or None to leave it in float."""
  name = path[-1]
  if name == 'embed':
    return (1,)  # [V, D]: one scale per vocabulary row.
  if name not in CONTRACTED_AXES:
    return None
  # Skip the stacked 'layers' axis, and an MoE block's 'expert' axis: one scale per expert.
  first = 1 if path[0] in model_lib.STACKS else 0
  if path[0] in model_lib.MOE_STACKS and path[-2] == 'mlp':
    first = 2
  return tuple(range(first, first + CONTRACTED_AXES[name]))


def quantize(params: dict, include_embed: bool = False) -> dict:
  """params with their matmul weights in int8 (see the module docstring)."""
  def convert(path, w):
    keys = pytree.keys(path)
    axes = _reduce_axes(keys)
    if axes is None or (keys[-1] == 'embed' and not include_embed):
      return w
    return quantize_array(w, axes)
  return jax.tree_util.tree_map_with_path(convert, params)


def dequantize(params: dict, dtype=jnp.float32) -> dict:
  """Ordinary params from a (partly) int8 tree; unquantized leaves are returned as they are."""
  return jax.tree.map(
      lambda leaf: (leaf['int8'].astype(dtype) * leaf['scale'].astype(dtype)
                    if _is_quantized(leaf) else leaf),
      params, is_leaf=_is_quantized)


def apply(graphdef, qparams, *args, **kwargs):
  """model.apply on int8 params (jit it: the dequantized weights are then only temporaries)."""
  return model_lib.apply(graphdef, dequantize(qparams), *args, **kwargs)


def num_bytes(params) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
