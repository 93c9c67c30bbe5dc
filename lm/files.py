"""Writing files so that a reader, or a run killed midway, never sees a half-written one."""

from collections.abc import Callable, Iterator
import contextlib
import os
import shutil
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


def new_directory(path: str) -> str:
  """path made absolute, once checked to be absent or an empty directory (atomic_directory's
  target), so that a command fails before its work rather than after it."""
  path = os.path.abspath(path)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f'{path} already exists and is not empty; choose a new output directory')
  return path


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields a new temporary sibling of `path` to fill, renamed to `path` when the block ends and
  removed if it raises: `path` appears whole or not at all. The rename fails, rather than mixing
  files, if `path` is by then a directory that is not empty."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f'.{os.path.basename(path)}.tmp-')
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would otherwise stay on `path`.
    yield tmp
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
