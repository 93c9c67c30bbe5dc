"""Tests of lm/files.py: a file or a directory appears whole or not at all."""

import os
import stat

import pytest

from lm import files as files_lib


def test_write_atomically_keeps_the_old_file_on_error(tmp_path):
  path = tmp_path / 'a.txt'
  files_lib.write_atomically(str(path), lambda f: f.write('old'))

  def fail(f):
    f.write('half')
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    files_lib.write_atomically(str(path), fail)
  assert path.read_text() == 'old' and os.listdir(tmp_path) == ['a.txt']


def test_atomic_directory_appears_whole_and_readable(tmp_path):
  out = tmp_path / 'new' / 'out'  # Its parent is made too.
  with files_lib.atomic_directory(str(out)) as directory:
    assert os.path.dirname(directory) == str(out.parent) and not out.exists()
    with open(os.path.join(directory, 'x.txt'), 'w') as f:
      f.write('x')
  assert os.listdir(out.parent) == ['out'] and (out / 'x.txt').read_text() == 'x'
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755  # Not mkdtemp's 0o700.


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with files_lib.atomic_directory(str(tmp_path / 'out')) as directory:
      open(os.path.join(directory, 'half.txt'), 'w').close()
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == []


def test_atomic_directory_never_mixes_into_a_filled_target(tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(OSError):
    with files_lib.atomic_directory(str(out)) as directory:
      open(os.path.join(directory, 'new.txt'), 'w').close()
      out.mkdir()
      (out / 'theirs.txt').write_text('theirs')  # Filled meanwhile, by someone else.
  assert os.listdir(tmp_path) == ['out'] and os.listdir(out) == ['theirs.txt']


def test_new_directory(tmp_path):
  (tmp_path / 'empty').mkdir()
  assert files_lib.new_directory(str(tmp_path / 'empty')) == str(tmp_path / 'empty')
  assert files_lib.new_directory('relative') == os.path.abspath('relative')
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('x')
  (tmp_path / 'file').write_text('x')
  for name in ('full', 'file'):
    with pytest.raises(FileExistsError, match=f'{name} already exists and is not empty'):
      files_lib.new_directory(str(tmp_path / name))
