"""Where sweep jobs run: each job is one `python -m lm.main ...` process, and a backend turns
`submit(job)` into a concurrent.futures.Future of its outcome.

  local  a pool of `max_parallel` threads on this machine, each waiting on one job process.
  ray    one Ray task per job (num_cpus=cpus_per_job) on the cluster at `address`, or on a
         local Ray instance started here and stopped by close(). Nodes need `lm` installed and
         the sweep's workdir on a filesystem they share with the launcher; this module is
         shipped to them with the job (runtime_env py_modules).

A job holds an exclusive lock on RUN_DIR/.lock while its process runs (the process inherits
it), so a relaunched sweep never starts a second process on a run whose first one outlived a
killed launcher: it waits for that one instead.
"""

import concurrent.futures
import dataclasses
import fcntl
import os
import subprocess
import sys
import time


@dataclasses.dataclass(frozen=True)
class Job:
  name: str
  args: tuple  # Arguments after the Python interpreter, e.g. ('-m', 'lm.main', '--config', ...).
  run_dir: str  # The job's output goes to run_dir/log.txt; run_dir/.lock guards it.
  env: tuple = ()  # (name, value) pairs added to the environment of the job's process.


@dataclasses.dataclass(frozen=True)
class Outcome:
  returncode: int
  wall_s: float
  log_tail: str  # The last lines of this attempt's output: why it failed.


def run_job(job: Job) -> Outcome:
  """Runs the job's process to completion with the interpreter running this function."""
  os.makedirs(job.run_dir, exist_ok=True)
  lock = os.open(os.path.join(job.run_dir, '.lock'), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Waits while a process from an earlier launch runs.
    log_path = os.path.join(job.run_dir, 'log.txt')
    with open(log_path, 'a') as log:
      log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} {sys.executable} '
                f'{" ".join(job.args)}\n')
      log.flush()
      start = time.perf_counter()
      returncode = subprocess.run(
          [sys.executable, *job.args], stdout=log, stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL, env={**os.environ, **_merged_env(job.env)},
          pass_fds=(lock,), check=False).returncode
      wall_s = time.perf_counter() - start
    return Outcome(returncode, wall_s, _tail(log_path))
  finally:
    os.close(lock)


def _merged_env(additions) -> dict:
  """Job variables over this environment's; a PYTHONPATH is prepended to the existing one."""
  env = dict(additions)
  if 'PYTHONPATH' in env and os.environ.get('PYTHONPATH'):
    env['PYTHONPATH'] += os.pathsep + os.environ['PYTHONPATH']
  return env


def _tail(path: str, lines: int = 12, max_bytes: int = 16_384) -> str:
  with open(path, 'rb') as f:
    f.seek(max(0, os.path.getsize(path) - max_bytes))
    text = f.read().decode('utf-8', 'replace')
  text = text.replace('\r', '\n')  # Progress bars redraw with carriage returns.
  return '\n'.join([line for line in text.splitlines() if line.strip()][-lines:])


class LocalBackend:
  """Jobs as processes on this machine, at most `max_parallel` at once."""

  def __init__(self, max_parallel: int):
    self.max_parallel = max_parallel
    self._pool = concurrent.futures.ThreadPoolExecutor(max_parallel, 'sweep-job')

  def submit(self, job: Job) -> concurrent.futures.Future:
    return self._pool.submit(run_job, job)

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
  """Jobs as Ray tasks; `address=None` starts a local Ray instance with max_parallel CPUs."""

  def __init__(self, max_parallel: int, address: str | None = None, cpus_per_job: float = 1):
    import ray  # pylint: disable=g-import-not-at-top
    self._ray = ray
    self.max_parallel = max_parallel
    runtime_env = {'py_modules': [os.path.dirname(os.path.abspath(__file__))]}
    if address:
      ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
      ray.init(num_cpus=max_parallel * cpus_per_job, include_dashboard=False,
               runtime_env=runtime_env, log_to_driver=False)
    self._task = ray.remote(num_cpus=cpus_per_job, max_retries=0)(run_job)

  def submit(self, job: Job) -> concurrent.futures.Future:
    return self._task.remote(job).future()

  def close(self):
    self._ray.shutdown()


def make_backend(name: str, max_parallel: int, ray_address: str | None = None):
  if name == 'local':
    return LocalBackend(max_parallel)
  if name == 'ray':
    try:
      import ray  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      sys.exit("error: --backend=ray needs Ray: pip install 'ray>=2.50'")
    return RayBackend(max_parallel, ray_address)
  sys.exit(f"error: --backend={name!r}: expected 'local' or 'ray'")
