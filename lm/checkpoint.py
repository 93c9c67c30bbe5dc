"""Orbax checkpoints of the train state and the data iterator, saved asynchronously.

Each checkpoint is a step directory with two items: 'state' (params, optimizer state, step,
RNG) and 'data' (the iterator's JSON state). Orbax writes a step into a temporary directory and
renames it only once complete, so a run killed mid-save leaves the previous checkpoints intact
and the next run resumes from the newest complete one. A step that is complete but does not
restore (files damaged on disk) is moved aside to STEP.corrupt once an older one restores: the
resumed run then saves that step afresh, and whatever takes the newest step skips it.

Parameters alone (`save_params`, `restore_params`) start other runs (config.init_from): they are
read from a directory holding a 'params' item (lm/vocab.py writes those) or from the 'state' of
a training checkpoint.

A run that freezes some parameters (config.train.trainable, e.g. LoRA) saves them once, as
WORKDIR/frozen/params, and its checkpoints hold only what it trains: a LoRA step of a 7B model
is megabytes, not 28 GB. `restore_params` puts the two back together.

Quantized parameters (lm/quantize.py: {'int8' or 'int4', 'scale'} dicts in place of weights) read
as the float weights they stand for: `params_shapes` gives those shapes and `restore_params`
dequantizes into the target's dtypes, so config.init_from trains from them; keep_quantized=True
gives them as stored instead (what lm.generate serves).
"""

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from lm import pytree


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be restored."""


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts an async save of `step` (a no-op if that step is already saved: restore_latest
    leaves no step newer than the one it restored, so a resumed run saves every step it trains)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, target):
    """Restores `step` into the structure, dtypes and shardings of `target`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def restore_latest(self, target):
    """(state, data_state) from the newest checkpoint that restores, or None if there is none.

    A checkpoint that fails to restore (e.g. files damaged on disk) is skipped in favour of the
    one before it, and once one restores it is moved aside (_set_aside), never deleted. When none
    restores, nothing is moved (a rerun would then start afresh) and CheckpointError names every
    failure.
    """
    damaged = {}
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('checkpoint %s/%d does not restore (%s); trying an older one',
                        self.directory, step, e)
        damaged[step] = f'{type(e).__name__}: {e}'
        continue
      self._set_aside(damaged)
      return restored
    if damaged:
      raise CheckpointError(f'no checkpoint in {self.directory} could be restored:\n'
                            + '\n'.join(f'step {step}: {error}' for step, error in damaged.items()))
    return None

  def _set_aside(self, damaged: dict[int, str]) -> None:
    """Renames each damaged step directory to STEP.corrupt (STEP.corrupt-N if that is taken), so
    that orbax no longer lists it and the run saves that step again. Process 0 renames; every
    process waits for it, then rereads the steps, and all raise if one is still there."""
    if not damaged:
      return
    refused = []
    if jax.process_index() == 0:
      for step, error in damaged.items():
        path = os.path.join(self.directory, str(step))
        aside = _unused_path(path + '.corrupt')
        try:
          os.rename(path, aside)
        except OSError as e:
          refused.append(f'{type(e).__name__}: {e}')
          continue
        logging.warning('checkpoint step %d does not restore (%s); moved it to %s', step, error,
                        aside)
    ocp.multihost.sync_global_processes(f'lm_checkpoint_set_aside_{min(damaged)}')
    self._manager.reload()
    left = sorted(set(damaged) & set(self._manager.all_steps()))
    if left:
      raise CheckpointError(
          f'checkpoint steps {left} in {self.directory} do not restore and could not be moved '
          f'aside ({"; ".join(refused) or "on process 0"}): move or delete them, or this '
          'run would never save those steps again')

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _unused_path(path: str) -> str:
  """`path`, or the first of path-1, path-2, ... that does not exist."""
  candidate, n = path, 0
  while os.path.exists(candidate):
    n += 1
    candidate = f'{path}-{n}'
  return candidate


FROZEN = 'frozen'  # WORKDIR/FROZEN/params: the parameters a run does not train.


def save_params(directory: str, params, force: bool = False) -> None:
  """Writes `params` as the item directory/params (synchronously; force: replacing one)."""
  ocp.PyTreeCheckpointer().save(os.path.join(os.path.abspath(directory), 'params'),
                                args=ocp.args.PyTreeSave(params), force=force)


def params_shapes(path: str, keep_quantized: bool = False) -> dict:
  """The stored parameters' shapes and dtypes (jax.ShapeDtypeStruct leaves), read from metadata
  (a run's frozen parameters included); quantized weights as the float ones they restore to,
  unless keep_quantized."""
  from lm import quantize  # pylint: disable=g-import-not-at-top
  shapes = pytree.union(*(_item_shapes(item, key) for item, key in _params_sources(path)))
  return shapes if keep_quantized else quantize.dequantized_shapes(shapes)


def _item_shapes(item: str, key: str | None) -> dict:
  try:
    tree = ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree
    tree = tree[key] if key else tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'cannot read the parameters in {item}: {type(e).__name__}: {e}') from e


def restore_params(path: str, target, keep_quantized: bool = False) -> dict:
  """Parameters of the checkpoint at `path` with the shapes, dtypes and shardings of `target`
  (numpy arrays where a leaf has no sharding); CheckpointError names every leaf that differs.
  Quantized weights are dequantized into target's leaves, or with keep_quantized come as stored,
  their parts placed like target's leaves (lm.quantize.restore_target)."""
  from lm import quantize  # pylint: disable=g-import-not-at-top
  sources = [(item, key, _item_shapes(item, key)) for item, key in _params_sources(path)]
  stored = pytree.union(*(shapes for _, _, shapes in sources))
  differences = _shape_differences(quantize.dequantized_shapes(stored), target)
  if differences:
    raise CheckpointError(f'the parameters in {path} do not fit the model: '
                          + '; '.join(differences))
  parts = quantize.restore_target(stored, target)
  params = pytree.union(*(_restore_item(item, key, pytree.subtree(parts, pytree.leaf_paths(shapes)))
                          for item, key, shapes in sources))
  return params if keep_quantized else quantize.dequantize_like(params, target)


def _restore_item(item: str, key: str | None, target: dict) -> dict:
  restore_args = jax.tree.map(_restore_args, target)
  if key:
    target, restore_args = {key: target}, {key: restore_args}
  try:
    restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=bool(key)))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'cannot restore the parameters in {item}: {type(e).__name__}: {e}') from e
  return restored[key] if key else restored


def _params_sources(path: str) -> list[tuple[str, str | None]]:
  """The (orbax item, key) pairs holding the parameters at `path`: one, or for a training step of
  a run that froze some parameters, the step's state and the run's WORKDIR/frozen/params."""
  item, key = _params_item(path)
  sources = [(item, key)]
  if key:  # item is WORKDIR/checkpoints/STEP/state.
    frozen = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(item))), FROZEN,
                          'params')
    if os.path.isdir(frozen):
      sources.append((frozen, None))
  return sources


def _params_item(path: str) -> tuple[str, str | None]:
  """(orbax item directory, key of the params in it) for a params directory, a training
  workdir, its checkpoints/ folder (newest step) or one step directory."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'checkpoint directory {path} does not exist')
  if os.path.isdir(os.path.join(path, 'params')):
    return os.path.join(path, 'params'), None
  if os.path.isdir(os.path.join(path, 'state')):
    return os.path.join(path, 'state'), 'params'
  for directory in (os.path.join(path, 'checkpoints'), path):
    names = os.listdir(directory) if os.path.isdir(directory) else []
    steps = [int(n) for n in names if n.isdigit()]  # Orbax's unfinished saves end in '.tmp...'.
    if steps:
      return os.path.join(directory, str(max(steps)), 'state'), 'params'
  raise CheckpointError(
      f'{path} holds no lm checkpoint: expected a params/ item (an extended checkpoint), a '
      'state/ item (one step), or numbered steps (a workdir or its checkpoints/ folder)')


def _restore_args(leaf) -> ocp.RestoreArgs:
  sharding = getattr(leaf, 'sharding', None)
  if sharding is None:
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
  return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)


def _shape_differences(stored, wanted) -> list[str]:
  """"params['embed'] is (384, 64), the model wants (256, 64)" for each leaf that differs."""
  stored, wanted = ({jax.tree_util.keystr(k): tuple(x.shape) for k, x in
                     jax.tree.leaves_with_path(tree)} for tree in (stored, wanted))
  return [f'params{name} is {stored.get(name, "missing")}, ' + (
              f'the model wants {wanted[name]}' if name in wanted else 'not in the model')
          for name in sorted(set(stored) | set(wanted)) if stored.get(name) != wanted.get(name)]
