"""Orbax checkpoints of the train state and the data iterator, saved asynchronously.

Each checkpoint is a step directory with two items: 'state' (params, optimizer state, step,
RNG) and 'data' (the iterator's JSON state). Orbax writes a step into a temporary directory and
renames it only once complete, so a run killed mid-save leaves the previous checkpoints intact
and the next run resumes from the newest complete one.
"""

import logging
import os

import jax
import orbax.checkpoint as ocp


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
    """Starts an async save of `step` (a no-op if that step is already saved)."""
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

    A checkpoint that fails to restore (e.g. files damaged on disk) is reported and skipped in
    favour of the one before it; it is never deleted.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
      try:
        return self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('checkpoint %s/%d does not restore (%s); trying an older one',
                        self.directory, step, e)
        errors.append(f'step {step}: {type(e).__name__}: {e}')
    if errors:
      raise CheckpointError(
          f'no checkpoint in {self.directory} could be restored:\n' + '\n'.join(errors))
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
