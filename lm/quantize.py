"""Weight-only quantization to int8 or int4: symmetric, one scale per output channel or per group
of input elements of each matmul weight.

  python -m lm.quantize --checkpoint DIR --bits 8|4 [--group_size G] [--include_embed] --out DIR2

What is quantized: the matmul weights (attention's and cross-attention's w_q, w_k, w_v, w_o; the
MLPs' and MoE experts' w_up, w_gate, w_down; unembed; with include_embed the embedding tables
embed and encoder_embed too). Norms, biases, MoE routers, pos_embed and scalar heads stay float.

Scales. A weight is [lead..., inputs..., outputs...]: the stacked layers (and experts) axes, then
the axes its matmul contracts (lm/model.py `dense`; lm.lora.INPUT_AXES), then its outputs; an
embedding table [V, D] is read in its unembedding role (x @ embed.T): inputs D, one scale per
vocabulary row. A scale is absmax / qmax of the block it covers, qmax = 127 (int8) or 7 (int4);
values are round(w / scale) clipped to [-qmax, qmax], symmetric (int4 leaves -8 unused, so that
+-absmax both land on a level and the error bound is the same on both sides).
  group_size=0  one scale per output channel (each lead index too): the block is all inputs.
  group_size=g  one scale per g consecutive inputs of each output channel (as GPTQ and AWQ group
                them), in the flattened input order; the inputs must divide into groups of g
                (w_o's H x Q inputs: g must divide Q or be a multiple of it), else ValueError
                naming the weight.
The scale array has the weight's rank, each of its dims dividing the weight's: scale[i, j, ...]
covers the block of weight.shape / scale.shape elements at that index, so every format
dequantizes by one rule (the per-channel scales are the case of size-1 dims along the inputs).
Each element's round-trip error is at most its scale / 2.

A quantized leaf is stored as a dict, which orbax checkpoints as it is:
  {'int8': int8 values, 'scale': fp32}   shaped like the weight
  {'int4': int8 bytes, 'scale': fp32}    two values per byte (low nibble first) along one output
                                         axis, the last whose scale dims equal the weight's
                                         (padded with a 0 when odd), so the bytes halve; its
                                         original size is the scale's dim there, which is how
                                         `dequantize` finds the axis again.
Inside a jitted function, `dequantize_on_read(qparams)` swaps each dict for a QuantizedArray,
which the model reads through its usual w[...]: the weight is dequantized where it is used, one
layer at a time inside the layer scan, so memory holds the quantized tree and a layer's float
weights at most. lm.generate, lm.eval, lm.engine and `apply` below run quantized params so; the
model does not change. `dequantize(qparams)` rebuilds ordinary float params (training from a
quantized checkpoint: lm.checkpoint.restore_params). `fake_quantize` is the same quantizer with a
straight-through gradient, for quantization-aware training.

The command writes a checkpoint OUT that loads wherever one does (`--config.mode=sample --workdir
OUT`, config.init_from=OUT, lm.eval's checkpoint=OUT, lm.engine.Engine on
lm.generate.load_checkpoint(OUT, keep_quantized=True)'s params). Like lm.prune's, it is a workdir
whose one step holds only params:
  checkpoints/0/         the quantized parameters (state holds {'params': ...})
  config.json            the source's config, init_from and data.tokenizer pointing here, LoRA
                         off (a LoRA run's adapters are merged into their weights first)
  config.py              its get_config() (lm.vocab's), wherever the directory has moved
  tokenizer.model        the source's tokenizer
  quantize_report.json   bits, group size, bytes before and after and the largest round-trip
                         error of each quantized leaf (and of each of its matrices), totals
  hf_config.json         copied when the source was imported from HF (lm/convert.py)
"""

import argparse
from collections.abc import Sequence
import dataclasses
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lm import lora as lora_lib
from lm import model as model_lib
from lm import pytree

BITS = (8, 4)
QMAX = {8: 127, 4: 7}
VALUES = {8: 'int8', 4: 'int4'}  # The key of a quantized leaf's values.
# Per weight: how many axes (after the lead axes) its matmul contracts.
CONTRACTED_AXES = dict(lora_lib.INPUT_AXES, unembed=1)
EMBEDDINGS = ('embed', 'encoder_embed')  # [V, D] tables, quantized with include_embed.
REPORT_FILE = 'quantize_report.json'


# ---------------------------------------------------------------------------------------------
# Which leaves, and their scales' blocks.


def _is_quantized(leaf) -> bool:
  """A stored quantized leaf: {'int8' or 'int4': values, 'scale': scales}."""
  return isinstance(leaf, dict) and len(leaf) == 2 and 'scale' in leaf and (
      'int8' in leaf or 'int4' in leaf)


def is_quantized(tree) -> bool:
  """Whether any leaf of a params tree (of arrays or shapes) is quantized."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: _is_quantized(x) or _is_view(x))
  return any(_is_quantized(x) or _is_view(x) for x in leaves)


def _where(keys) -> str:
  """params['blocks']['mlp']['w_up'], as lm.checkpoint names a leaf."""
  return 'params' + ''.join(f'[{k!r}]' for k in keys)


def _reduce_axes(path: tuple[str, ...]) -> tuple[int, ...] | None:
  """The axes a weight's matmul contracts (its scales' inputs), or None to leave it in float."""
  name = path[-1]
  if len(path) == 1 and name in EMBEDDINGS:
    return (1,)  # [V, D]: one scale (per group) per vocabulary row.
  if name not in CONTRACTED_AXES or (name != 'unembed' and path[0] not in model_lib.STACKS):
    return None
  # Skip the stacked 'layers' axis, and an MoE block's 'expert' axis: one scale per expert.
  first = 1 if path[0] in model_lib.STACKS else 0
  if path[0] in model_lib.MOE_STACKS and path[-2] == 'mlp':
    first = 2
  return tuple(range(first, first + CONTRACTED_AXES[name]))


def scale_shape(shape, axes: Sequence[int], group_size: int = 0,
                where: str = 'the weight') -> tuple[int, ...]:
  """The shape of a weight's scales (see the module docstring); ValueError naming `where` when
  its inputs do not divide into groups of group_size."""
  scale = list(shape)
  if group_size == 0:
    for axis in axes:
      scale[axis] = 1
    return tuple(scale)
  dims = [shape[a] for a in axes]
  inputs = math.prod(dims)
  if group_size < 0 or inputs % group_size:
    raise ValueError(f'group_size={group_size}: {where} contracts {inputs} inputs per output '
                     f'(shape {tuple(shape)}), not a multiple of {group_size}')
  left = group_size  # Inputs per group still to cover, innermost contracted axis first.
  for axis in reversed(axes):
    size = shape[axis]
    if left % size and size % left:
      raise ValueError(
          f'group_size={group_size}: {where} contracts {" x ".join(map(str, dims))} inputs per '
          f'output (shape {tuple(shape)}); groups of {group_size} consecutive inputs would '
          f'straddle its axis of {size}: use a group size that divides {size} or is a multiple '
          'of it')
    scale[axis] = 1 if left >= size else size // left
    left = max(left // size, 1)
  return tuple(scale)


def _blocked(shape, scale_shape_) -> tuple[int, ...]:
  """shape with each axis split into (scale's dim, block size): [s0, b0, s1, b1, ...]."""
  return tuple(x for n, s in zip(shape, scale_shape_) for x in (s, n // s))


def _scale_axes(scale_shape_) -> tuple[int, ...]:
  """scale_shape as a blocked shape: [s0, 1, s1, 1, ...]."""
  return tuple(x for s in scale_shape_ for x in (s, 1))


# ---------------------------------------------------------------------------------------------
# The quantizer.


def _quantize_values(w, scale_shape_, bits: int):
  """(int8 values in [-qmax, qmax], fp32 scales of scale_shape_) with w ~= values * scale."""
  w = w.astype(jnp.float32)
  qmax = QMAX[bits]
  blocks = w.reshape(_blocked(w.shape, scale_shape_))
  scale = jnp.max(jnp.abs(blocks), axis=tuple(range(1, blocks.ndim, 2)), keepdims=True) / qmax
  scale = jnp.where(scale > 0, scale, 1.0)  # An all-zero block stays zero.
  values = jnp.clip(jnp.round(blocks / scale), -qmax, qmax).astype(jnp.int8)
  return values.reshape(w.shape), scale.reshape(scale_shape_)


def _dequantize_values(values, scale, dtype=jnp.float32):
  """values * scale, each scale over its block."""
  blocks = values.astype(dtype).reshape(_blocked(values.shape, scale.shape))
  return (blocks * scale.astype(dtype).reshape(_scale_axes(scale.shape))).reshape(values.shape)


def _packed_axis(shape, scale_shape_, where: str = 'the weight') -> int:
  """The axis int4 values pack along: the last of size >= 2 whose blocks are single elements."""
  for axis in reversed(range(len(shape))):
    if scale_shape_[axis] == shape[axis] >= 2:
      return axis
  raise ValueError(f'bits=4: {where} (shape {tuple(shape)}) has no output axis of size >= 2 to '
                   'pack two values per byte along')


def pack_int4(values, axis: int):
  """int8 values in [-8, 7], two per byte along `axis` (low nibble the even index; odd sizes
  padded with a 0)."""
  n = values.shape[axis]
  if n % 2:
    values = jnp.concatenate(
        [values, jnp.zeros(values.shape[:axis] + (1,) + values.shape[axis + 1:], values.dtype)],
        axis=axis)
  pairs = values.reshape(values.shape[:axis] + ((n + 1) // 2, 2) + values.shape[axis + 1:])
  low, high = jnp.split(pairs, 2, axis=axis + 1)
  packed = (low & jnp.int8(0x0F)) | (high << jnp.int8(4))
  return packed.reshape(packed.shape[:axis + 1] + packed.shape[axis + 2:])


def unpack_int4(packed, axis: int, size: int):
  """The int8 values of `pack_int4(values, axis)`, `size` of them along axis."""
  low = (packed << jnp.int8(4)) >> jnp.int8(4)  # Arithmetic shifts: the nibble's sign extends.
  high = packed >> jnp.int8(4)
  pairs = jnp.stack([low, high], axis=axis + 1)
  values = pairs.reshape(packed.shape[:axis] + (2 * packed.shape[axis],) + packed.shape[axis + 1:])
  return jax.lax.slice_in_dim(values, 0, size, axis=axis)


def _stored_axis(values_shape, scale_shape_) -> int | None:
  """The axis a stored int4 leaf is packed along: where the scale has more entries than the
  bytes (its dim there is the unpacked size; elsewhere it divides the values' dim)."""
  axes = [a for a, (v, s) in enumerate(zip(values_shape, scale_shape_)) if s > v]
  return axes[0] if len(axes) == 1 else None


def _unpacked_shape(values_shape, scale_shape_) -> tuple[int, ...]:
  axis = _stored_axis(values_shape, scale_shape_)
  if axis is None:
    raise ValueError(f'an int4 leaf of {tuple(values_shape)} bytes and {tuple(scale_shape_)} '
                     'scales names no packed axis')
  return tuple(s if a == axis else v
               for a, (v, s) in enumerate(zip(values_shape, scale_shape_)))


def quantize_array(w, reduce_axes: tuple[int, ...], bits: int = 8, group_size: int = 0,
                   where: str = 'the weight') -> dict:
  """A stored quantized leaf of w (see the module docstring): its scales over reduce_axes, the
  contracted axes, per output channel (group_size=0) or per group of group_size inputs."""
  if bits not in BITS:
    raise ValueError(f'bits={bits}: expected one of {BITS}')
  shape = scale_shape(w.shape, reduce_axes, group_size, where)
  values, scale = _quantize_values(w, shape, bits)
  if bits == 4:
    values = pack_int4(values, _packed_axis(w.shape, shape, where))
  return {VALUES[bits]: values, 'scale': scale}


def dequantize_array(leaf, dtype=jnp.float32):
  """The float weight of a stored quantized leaf or a QuantizedArray."""
  if _is_view(leaf):
    leaf = leaf.stored()
  scale = leaf['scale']
  if 'int8' in leaf:
    return _dequantize_values(leaf['int8'], scale, dtype)
  packed = leaf['int4']
  axis = _stored_axis(packed.shape, scale.shape)
  values = unpack_int4(packed, axis, scale.shape[axis])
  return _dequantize_values(values, scale, dtype)


def _fake_quantize(w, bits, group_size, axes):
  values, scale = _quantize_values(w, scale_shape(w.shape, axes, group_size), bits)
  return _dequantize_values(values, scale).astype(w.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def fake_quantize(w, bits: int = 8, group_size: int = 0, axes: tuple[int, ...] = (0,)):
  """w quantized and dequantized by the quantizer `quantize` uses (axes: the contracted axes),
  with a straight-through gradient (d out / d w = 1), for quantization-aware training."""
  return _fake_quantize(w, bits, group_size, tuple(axes))


@fake_quantize.defjvp
def _fake_quantize_jvp(bits, group_size, axes, primals, tangents):
  (w,), (dw,) = primals, tangents
  return fake_quantize(w, bits, group_size, axes), dw


# ---------------------------------------------------------------------------------------------
# Params trees.


def quantize(params: dict, bits: int = 8, group_size: int = 0,
             include_embed: bool = False) -> dict:
  """params with their matmul weights quantized (see the module docstring); the other leaves
  are returned as they are."""
  if bits not in BITS:
    raise ValueError(f'bits={bits}: expected one of {BITS}')
  if group_size < 0:
    raise ValueError(f'group_size={group_size}: must be >= 0 (0: one scale per output channel)')

  def convert(path, w):
    keys = pytree.keys(path)
    axes = _reduce_axes(keys)
    if axes is None or (keys[-1] in EMBEDDINGS and not include_embed):
      return w
    return quantize_array(w, axes, bits, group_size, where=_where(keys))
  return jax.tree_util.tree_map_with_path(convert, params)


def fake_quantize_params(params: dict, bits: int = 8, group_size: int = 0,
                         include_embed: bool = False) -> dict:
  """params with every weight `quantize` would quantize replaced by fake_quantize of it (the
  float values the quantized model computes with; gradients pass straight through): what
  quantization-aware training (config.qat) runs the model on."""
  def convert(path, w):
    keys = pytree.keys(path)
    axes = _reduce_axes(keys)
    if axes is None or (keys[-1] in EMBEDDINGS and not include_embed):
      return w
    scale_shape(w.shape, axes, group_size, _where(keys))  # ValueError naming the weight.
    return fake_quantize(w, bits, group_size, axes)
  return jax.tree_util.tree_map_with_path(convert, params)


def dequantize(params: dict, dtype=jnp.float32) -> dict:
  """Ordinary params from a (partly) quantized tree, stored or read as QuantizedArrays;
  unquantized leaves are returned as they are."""
  return jax.tree.map(
      lambda leaf: dequantize_array(leaf, dtype) if _is_quantized(leaf) or _is_view(leaf)
      else leaf, params, is_leaf=lambda x: _is_quantized(x) or _is_view(x))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A quantized weight as the model reads it: w[...] (lm.model's every read of a weight)
  dequantizes, so under jit the float weight exists only where it is used."""
  values: jax.Array  # int8 values, or int4 ones packed two per byte.
  scale: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True))

  def stored(self) -> dict:
    return {VALUES[self.bits]: self.values, 'scale': self.scale}

  @property
  def shape(self) -> tuple[int, ...]:
    if self.bits == 8:
      return tuple(self.values.shape)
    return _unpacked_shape(self.values.shape, self.scale.shape)

  @property
  def dtype(self):
    return self.scale.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __getitem__(self, index):
    return dequantize_array(self)[index]


def _is_view(leaf) -> bool:
  return isinstance(leaf, QuantizedArray)


def dequantize_on_read(params: dict) -> dict:
  """params with each stored quantized leaf as a QuantizedArray, which nnx.merge puts in the
  model like any weight and the model dequantizes where it reads it; other leaves as they are."""
  def view(leaf):
    if not _is_quantized(leaf):
      return leaf
    bits = 8 if 'int8' in leaf else 4
    return QuantizedArray(leaf[VALUES[bits]], leaf['scale'], bits)
  return jax.tree.map(view, params, is_leaf=_is_quantized)


def apply(graphdef, qparams, *args, **kwargs):
  """model.apply on quantized params (jit it: each weight is dequantized where it is read)."""
  return model_lib.apply(graphdef, dequantize_on_read(qparams), *args, **kwargs)


def config_of(graphdef, params) -> model_lib.ModelConfig:
  """The ModelConfig of a graphdef and its (possibly quantized) params."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.merge(graphdef, dequantize_on_read(params)).cfg


def num_bytes(params) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# Restoring checkpoints (lm.checkpoint.restore_params).


def dequantized_shapes(stored: dict) -> dict:
  """A checkpoint's params shapes (jax.ShapeDtypeStruct leaves, quantized leaves as stored) with
  each quantized leaf as the float weight it dequantizes to."""
  def shape(leaf):
    if not _is_quantized(leaf):
      return leaf
    scale = leaf['scale']
    values = leaf.get('int8', leaf.get('int4'))
    full = (tuple(values.shape) if 'int8' in leaf
            else _unpacked_shape(values.shape, scale.shape))
    return jax.ShapeDtypeStruct(full, scale.dtype)
  return jax.tree.map(shape, stored, is_leaf=_is_quantized)


def _part_sharding(sharding, shape):
  """`sharding` (a float leaf's) for a part of its quantized leaf of `shape`: split over the
  same mesh axes along every dim they divide, replicated along the others."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))

  def ways(axes):
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(sharding.mesh.shape[a] for a in axes)
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
      *[axes if axes is not None and n % ways(axes) == 0 else None
        for axes, n in zip(spec, shape)]))


def restore_target(stored: dict, target: dict) -> dict:
  """What to restore a checkpoint of `stored` shapes into, for params like `target`: target's
  leaves, and at each quantized leaf its parts as stored, placed like target's float leaf (no
  sharding: numpy arrays)."""
  def parts(leaf, want):
    if not _is_quantized(leaf):
      return want
    sharding = getattr(want, 'sharding', None)
    return {name: jax.ShapeDtypeStruct(part.shape, part.dtype,
                                       sharding=_part_sharding(sharding, part.shape))
            for name, part in leaf.items()}
  return jax.tree.map(parts, stored, target, is_leaf=_is_quantized)


def dequantize_like(params: dict, target: dict) -> dict:
  """params with each quantized leaf dequantized into target's dtype and sharding (numpy where
  target's leaf has none), one leaf at a time."""
  def convert(leaf, want):
    if not _is_quantized(leaf):
      return leaf
    sharding = getattr(want, 'sharding', None)
    to_float = jax.jit(functools.partial(dequantize_array, dtype=want.dtype),
                       out_shardings=sharding)
    return to_float(leaf) if sharding is not None else np.asarray(to_float(leaf))
  return jax.tree.map(convert, params, target, is_leaf=_is_quantized)


# ---------------------------------------------------------------------------------------------
# The report.


@functools.partial(jax.jit, static_argnums=2)
def _errors(w, leaf, lead: int):
  """The largest |w - dequantized| of each matrix of w (over its `lead` axes) and the scales'
  largest half step."""
  error = jnp.abs(w.astype(jnp.float32) - dequantize_array(leaf))
  return jnp.max(error.reshape(w.shape[:lead] + (-1,)), axis=-1), jnp.max(leaf['scale']) / 2


def quantize_report(params: dict, qparams: dict) -> dict:
  """Bytes before and after and the largest round-trip error of each quantized leaf (and of each
  of its matrices: per layer, per expert), and totals."""
  leaves, before, after = {}, 0, 0
  flat = {pytree.keys(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  quantized = {pytree.keys(p): x for p, x in jax.tree_util.tree_leaves_with_path(
      qparams, is_leaf=_is_quantized) if _is_quantized(x)}
  for keys, leaf in quantized.items():
    w = flat[keys]
    lead = 0 if keys[-1] in EMBEDDINGS else _reduce_axes(keys)[0]
    per_matrix, half_step = jax.device_get(_errors(w, leaf, lead))
    leaves['/'.join(keys)] = dict(
        shape=list(w.shape), scale_shape=list(leaf['scale'].shape),
        bytes_before=num_bytes(w), bytes_after=num_bytes(leaf),
        max_abs_error=float(np.max(per_matrix)), max_half_step=float(half_step),
        max_abs_error_per_matrix=np.round(per_matrix, 8).reshape(-1).tolist())
    before += num_bytes(w)
    after += num_bytes(leaf)
  return dict(leaves=leaves, matrix_bytes_before=before, matrix_bytes_after=after,
              bytes_before=num_bytes(params), bytes_after=num_bytes(qparams),
              max_abs_error=max((x['max_abs_error'] for x in leaves.values()), default=0.0))


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def check_arguments(bits: int, group_size: int, checkpoint: str | None = None) -> None:
  """ValueError naming the flag (as the command spells it) for bad arguments."""
  if bits not in BITS:
    raise ValueError(f'--bits={bits}: expected 8 or 4')
  if group_size < 0:
    raise ValueError(f'--group_size={group_size}: must be >= 0 (0: one scale per output channel; '
                     'G: one per G consecutive inputs of each output, e.g. 128)')
  if checkpoint is not None and not os.path.isdir(checkpoint):
    raise ValueError(f'--checkpoint={checkpoint}: no such directory (an lm checkpoint: a '
                     'workdir, one of its steps, or an lm.convert / lm.vocab / lm.prune output)')


def _disk_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)


def quantize_checkpoint(checkpoint: str, out: str, bits: int = 8, group_size: int = 0, *,
                        include_embed: bool = False) -> dict:
  """Writes the quantized checkpoint `out` (see the module docstring) of `checkpoint` (anything
  lm.generate.load_checkpoint reads; LoRA adapters are merged first); returns its summary.

  Raises ValueError naming the flag or weight for bad arguments, FileExistsError when `out`
  holds anything, CheckpointError for a checkpoint that does not restore. `out` appears whole or
  not at all.
  """
  # pylint: disable=g-import-not-at-top
  from lm import checkpoint as checkpoint_lib
  from lm import config as config_lib
  from lm import files as files_lib
  from lm import generate as generate_lib
  from lm import vocab as vocab_lib
  check_arguments(bits, group_size, checkpoint)
  out = files_lib.new_directory(out)
  if is_quantized(checkpoint_lib.params_shapes(checkpoint, keep_quantized=True)):
    raise ValueError(f'--checkpoint={checkpoint} holds quantized weights already (an lm.quantize '
                     'output): quantize the float checkpoint it was made from')
  _, params, tokenizer, _ = generate_lib.load_checkpoint(
      checkpoint, dtype='float32', mesh_config=config_lib.base_config().mesh)
  config = config_lib.checkpoint_config(checkpoint)  # The run's own mesh, not the one used here.
  hf_config = config_lib.find_hf_config(checkpoint, config)
  lora_merged = config.lora.rank > 0
  qparams = jax.jit(quantize, static_argnums=(1, 2, 3))(params, bits, group_size, include_embed)
  report = quantize_report(params, qparams)

  if lora_merged:  # The adapters are in the weights now; a run from here trains those.
    config.lora.rank = 0
    if 'lora' in [g.strip() for g in config.train.trainable.split(',')]:
      config.train.trainable = 'all'
  config.init_from = out
  config.data.tokenizer = os.path.join(out, 'tokenizer.model')
  summary = dict(
      checkpoint=os.path.abspath(checkpoint), out=out, bits=bits, group_size=group_size,
      include_embed=include_embed, lora_merged=lora_merged, quantized_leaves=len(report['leaves']),
      matrix_bytes_before=report['matrix_bytes_before'],
      matrix_bytes_after=report['matrix_bytes_after'], bytes_before=report['bytes_before'],
      bytes_after=report['bytes_after'],
      compression=round(report['bytes_before'] / max(report['bytes_after'], 1), 3),
      max_abs_error=report['max_abs_error'])

  with files_lib.atomic_directory(out) as directory:
    vocab_lib.write_params_workdir(directory, qparams, tokenizer=tokenizer.path, config=config,
                                   hf_config=hf_config)
    summary['checkpoint_disk_bytes'] = _disk_bytes(os.path.join(directory, 'checkpoints'))
    with open(os.path.join(directory, REPORT_FILE), 'w') as f:
      json.dump(dict(summary, report=report), f, indent=2)
  return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m lm.quantize', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='a workdir, one of its steps, or an lm.convert / lm.vocab output')
  parser.add_argument('--bits', type=int, default=8, help='8 or 4')
  parser.add_argument('--group_size', type=int, default=0,
                      help='inputs per scale (0: one scale per output channel)')
  parser.add_argument('--out', required=True, help='a new (or empty) directory')
  parser.add_argument('--include_embed', action='store_true',
                      help='quantize the embedding tables too')
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  from lm import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  try:
    summary = quantize_checkpoint(args.checkpoint, args.out, args.bits, args.group_size,
                                  include_embed=args.include_embed)
  except (OSError, ValueError, checkpoint_lib.CheckpointError) as e:  # The user's to fix.
    sys.exit(f'python -m lm.quantize: error: {e}')
  width = max(map(len, summary), default=0)
  for key, value in summary.items():
    print(f'{key:<{width}}  {value}')


if __name__ == '__main__':
  main()
