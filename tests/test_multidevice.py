"""Runs tests/multidevice in separate pytest processes that have 8 fake CPU devices: the
sharding and memory files here, the others in test_multidevice_models.py (two files, so the
suite's two workers run the halves side by side)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_8_fake_devices(*files: str) -> None:
  """pytest on tests/multidevice/FILE... in a process with 8 fake CPU devices; fails with its
  output if any test there fails."""
  env = dict(os.environ, LM_MULTIDEVICE='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-n', '0', '-p', 'no:cacheprovider']
      + [os.path.join(ROOT, 'tests', 'multidevice', f) for f in files],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  print(result.stdout[-20000:])
  assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


def test_every_multidevice_file_is_run():
  import test_multidevice_models  # pylint: disable=g-import-not-at-top
  files = {f for f in os.listdir(os.path.join(ROOT, 'tests', 'multidevice'))
           if f.startswith('test_') and f.endswith('.py')}
  assert files == set(SHARDING_FILES) | set(test_multidevice_models.MODEL_FILES)


SHARDING_FILES = ('test_sharding.py', 'test_memory.py')


def test_sharding_and_memory_on_8_fake_cpu_devices():
  run_on_8_fake_devices(*SHARDING_FILES)
