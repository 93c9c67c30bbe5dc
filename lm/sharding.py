"""Where sharding is decided: the device mesh, and one table mapping logical axes to mesh axes.

The model names every parameter axis ('embed', 'heads', 'mlp', ...) and a few activation axes
('act_batch', 'act_heads', ...), and never mentions devices. `RULES` below maps each logical
name to mesh axes, in the spirit of t5x's `standard_logical_axis_rules`:

  data    data parallelism: the batch is split, parameters are replicated.
  fsdp    ZeRO-3 style: the batch is split and so are parameters, gradients and optimizer
          state (along 'embed'); XLA gathers each layer's weights when it needs them.
  tensor  Megatron style: attention heads and the MLP hidden dimension are split, and the
          activations between the two matmuls of each sub-block stay split.
  expert  expert parallelism (MoE, lm/moe.py): the experts are split, and so is the batch
          everywhere else; XLA moves each token to its experts' devices and back (all-to-all).

A config can override single rules with `config.mesh.rules`, e.g. 'vocab=,mlp=tensor+fsdp'
(an empty right side replicates that axis).
"""

import contextlib
import contextvars
import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

from lm import pytree

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')

# Logical axis -> mesh axes (a tuple: an axis may be split over several mesh axes; () replicates).
RULES = {
    # Parameters.
    'vocab': ('tensor',),
    'embed': ('fsdp',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'head_dim': (),
    'mlp': ('tensor',),
    'layers': (),
    'expert': ('expert',),
    'lora_rank': (),  # LoRA adapters are small: split along their other axis only.
    # Activations.
    'act_batch': ('data', 'fsdp', 'expert'),
    'act_expert': ('expert',),  # MoE dispatch buffers [E, G, C, D]: experts split ...
    'act_expert_batch': ('data', 'fsdp'),  # ... and their groups over the other batch axes.
    'act_seq': (),
    'act_embed': (),
    'act_heads': ('tensor',),
    'act_kv_heads': ('tensor',),
    'act_mlp': ('tensor',),
    'act_vocab': ('tensor',),
}


class ShardingError(ValueError):
  """A mesh or rule that cannot work with this model or these devices."""


def parse_rules(overrides: str) -> dict:
  """RULES with 'logical=mesh_axis[+mesh_axis],...' overrides applied."""
  rules = dict(RULES)
  for item in filter(None, (s.strip() for s in overrides.split(','))):
    name, sep, axes = item.partition('=')
    if not sep or name not in RULES:
      raise ShardingError(
          f'config.mesh.rules: {item!r} is not LOGICAL=MESH_AXES with LOGICAL one of '
          f'{sorted(RULES)}')
    axes = tuple(a for a in axes.split('+') if a)
    for axis in axes:
      if axis not in MESH_AXES:
        raise ShardingError(f'config.mesh.rules: {axis!r} in {item!r} is not one of {MESH_AXES}')
    rules[name] = axes
  return rules


def mesh_shape(mesh_config: ml_collections.ConfigDict, device_count: int) -> tuple[int, ...]:
  """(data, fsdp, tensor, expert) with a single -1 resolved; checks the product is the device
  count. A config without mesh.expert (written before MoE) has expert=1."""
  shape = [mesh_config.get(axis, 1) for axis in MESH_AXES]
  described = ', '.join(f'config.mesh.{a}={s}' for a, s in zip(MESH_AXES, shape))
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ShardingError(f'{described}: use positive sizes and at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if device_count % known:
      raise ShardingError(f'{described}: {device_count} devices are not divisible by {known}')
    shape[shape.index(-1)] = device_count // known
  if math.prod(shape) != device_count:
    raise ShardingError(
        f'{described}: the product {math.prod(shape)} is not the device count {device_count}')
  return tuple(shape)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def spec(logical_axes, rules: dict, mesh=None, shape=None, name: str = '') -> P:
  """PartitionSpec for logical axes; with mesh and shape, checks each split divides its dim."""
  used = set()
  parts = []
  for i, logical in enumerate(logical_axes):
    axes = tuple(a for a in rules.get(logical, ()) if a not in used) if logical else ()
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if mesh is not None and shape is not None and axes:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[i] % size:
        splits = ' x '.join(f'{a}={mesh.shape[a]}' for a in axes)
        raise ShardingError(
            f'{name or "array"}: dimension {i} ({logical}={shape[i]}) is not divisible by '
            f'{splits}; change config.mesh or the model size (or config.mesh.rules)')
    used.update(axes)
    parts.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*parts)


def tree_shardings(logical_tree, shapes_tree, mesh, rules):
  """NamedShardings for a pytree of arrays given the matching pytree of logical-axis tuples."""
  paths = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=pytree.is_axes)[0]
  shapes = jax.tree.leaves(shapes_tree)
  if len(paths) != len(shapes):
    raise ShardingError('logical axes and arrays have different structures')
  shardings = [
      NamedSharding(mesh, spec(axes, rules, mesh, shape.shape, pytree.dotted(path)))
      for (path, axes), shape in zip(paths, shapes)]
  return jax.tree.unflatten(jax.tree.structure(shapes_tree), shardings)


def check_batch(batch_size: int, mesh, rules, field: str) -> None:
  """The batch must split evenly over the mesh axes that 'act_batch' maps to."""
  axes = [a for a in rules['act_batch'] if mesh.shape[a] > 1]
  ways = math.prod(mesh.shape[a] for a in axes)
  if batch_size % ways:
    splits = ' x '.join(f'{a}={mesh.shape[a]}' for a in axes)
    raise ShardingError(f'{field} = {batch_size} is not divisible by {splits} = {ways}')


def batch_sharding(mesh, rules) -> NamedSharding:
  """Sharding of [batch, seq] input arrays."""
  return NamedSharding(mesh, spec(('act_batch', 'act_seq'), rules, mesh))


# The mesh and rules that `constrain` applies inside the model; unset means a single device.
_ACTIVE = contextvars.ContextVar('lm_sharding_active', default=None)


@contextlib.contextmanager
def active(mesh, rules):
  """Within this context (while tracing), `constrain` pins activations to the mesh."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x, logical_axes):
  """with_sharding_constraint by logical names; a no-op outside `active` (single device)."""
  current = _ACTIVE.get()
  if current is None:
    return x
  mesh, rules = current
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(logical_axes, rules, mesh)))


def bytes_per_device(tree) -> int:
  """Bytes of a pytree of jax.Arrays held by the first local device (its shards)."""
  device = jax.local_devices()[0]
  total = 0
  for array in jax.tree.leaves(tree):
    for shard in array.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total
