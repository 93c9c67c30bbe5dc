"""Writing files so that a reader, or a run killed midway, never sees a half-written one."""

from collections.abc import Callable
import os
import tempfile
from typing import Any


def write_atomically(path: str, write: Callable[[Any], None], mode: str = 'w',
                     **open_kwargs) -> None:
  """Calls write(f) on a temporary file in path's directory, then renames it onto path; on any
  error the temporary file is removed and path keeps its old contents (or stays absent)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix='.tmp-')
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      write(f)
    os.replace(tmp_path, path)
  except BaseException:
    os.remove(tmp_path)
    raise
