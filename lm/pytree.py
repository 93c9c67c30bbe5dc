"""Small helpers over parameter trees (nested dicts keyed by name), shared by the modules that
select, merge, shard or describe parameters."""

from collections.abc import Iterable

from flax import traverse_util


def leaf_paths(tree: dict) -> list[tuple]:
  """The key tuples of a nested dict's leaves, in its order."""
  return list(traverse_util.flatten_dict(tree))


def subtree(tree: dict, paths: Iterable[tuple]) -> dict:
  """The nested dict of the tree's leaves at `paths` (tuples of keys), in the tree's order."""
  paths = set(paths)
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in paths})


def union(*trees: dict) -> dict:
  """One nested dict with the leaves of all `trees` (which share no leaf)."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat)


def unflatten(flat: dict) -> dict:
  """{key tuple: leaf} -> nested dict; unlike traverse_util's, a leaf may itself be a tuple
  (a parameter's logical axes)."""
  tree = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def is_axes(x) -> bool:
  """Whether a leaf of a logical-axes tree (lm.model.logical_axes) is reached: a tuple of names,
  which jax.tree would otherwise descend into."""
  return isinstance(x, tuple)


def keys(path) -> tuple[str, ...]:
  """('blocks', 'attention', 'w_q') for a key tuple or a jax.tree key path."""
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def dotted(path) -> str:
  """'blocks.attention.w_q' for a key tuple or a jax.tree key path."""
  return '.'.join(keys(path))
