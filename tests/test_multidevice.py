"""Runs tests/multidevice in a separate pytest process that has 8 fake CPU devices."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_multidevice_suite_passes_on_8_fake_cpu_devices():
  env = dict(os.environ, LM_MULTIDEVICE='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-n', '0', '-p', 'no:cacheprovider',
       os.path.join(ROOT, 'tests', 'multidevice')],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  print(result.stdout[-20000:])
  assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
