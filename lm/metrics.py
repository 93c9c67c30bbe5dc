"""Metrics a person can plot: `metrics.jsonl` (one JSON object per logged step) and TensorBoard.

Only process 0 writes, so multi-host runs produce one copy.
"""

import json
import math
import os
import sys

import jax


class MetricsWriter:

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tensorboard = _summary_writer_class()(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self._active:
      return
    row = {'step': int(step)}
    row.update({k: _jsonable(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, float(value), int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tensorboard.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch when it is installed, only to accept torch tensors; that costs
  2-10 s at every start of a run. Hiding torch during the import makes it fall back to numpy.
  """
  hide_torch = 'torch' not in sys.modules
  if hide_torch:
    sys.modules['torch'] = None  # `import torch` now raises ImportError.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if hide_torch:
      del sys.modules['torch']
  return SummaryWriter


def _jsonable(value):
  value = float(value)
  return None if math.isnan(value) or math.isinf(value) else value


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl; a run resumed after a crash may repeat steps: the last row wins."""
  by_step = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        row = json.loads(line)
        by_step.setdefault(row['step'], {}).update(row)
  return [by_step[s] for s in sorted(by_step)]
