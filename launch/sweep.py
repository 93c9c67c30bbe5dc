"""Runs a scaling sweep: `python -m launch.sweep --config configs/sweeps/NAME.py --workdir DIR`.

  --backend local|ray   where jobs run (launch/backends.py); --ray_address joins a cluster.
  --max_parallel N      jobs at once (default: one per two CPU cores, at least one).
  --retries K           attempts after the first before a run is reported failed.
  --mode run|plan|collect
      run      plan, train every unfinished run, keep DIR/results.csv current.
      plan     write DIR/plan.csv, DIR/commands.txt (one `python -m lm.main` line per unfinished
               run) and DIR/slurm_array.sh, and run nothing.
      collect  only rewrite DIR/results.csv from what the run directories hold.

Every run trains in DIR/runs/NAME (run.json records its overrides and planned numbers; log.txt
its output). Relaunching is safe at any time: a run whose final evaluation is in its
metrics.jsonl is skipped, and an unfinished one resumes from its last checkpoint (lm.main's own
resume), whether its process was killed or the launcher was.

SLURM: no submitit backend. `--mode plan` writes a job array script instead, one array task per
unfinished run, each running its line of commands.txt through `srun`:
  python -m launch.sweep --config ... --workdir DIR --mode plan && sbatch DIR/slurm_array.sh
  python -m launch.sweep --config ... --workdir DIR --mode collect   # after, or during
The array is plain SLURM (no extra dependency, `scontrol requeue` and time limits work as
usual, and lm.main checkpoints on SIGTERM); rerunning --mode plan lists only what is left.
"""

import collections
import concurrent.futures
import csv
import functools
import json
import logging as std_logging
import os
import shlex
import sys
import time
import types

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from tqdm import tqdm

import lm
from lm import config as config_lib
from lm import files as files_lib
from lm import metrics as metrics_lib
from launch import backends
from launch import plan as plan_lib


RESULT_COLUMNS = ('run', 'budget', 'params', 'non_embedding_params', 'tokens', 'flops', 'loss',
                  'status', 'steps', 'd_model', 'num_layers', 'num_heads', 'd_ff',
                  'learning_rate', 'warmup_steps', 'attempts', 'wall_s', 'eval_bits_per_byte')
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(lm.__file__)))


# ---------------------------------------------------------------------------------------------
# A sweep's directory: shared data, run directories, results.


def prepare_shared_data(sweep, workdir: str) -> dict:
  """Trains the sweep's tokenizer once (unless the base config names one) and tokenizes the
  corpus once; returns the dotted overrides that point every run at them."""
  config = plan_lib.run_config(sweep, plan_lib.flatten(sweep.overrides))
  if config.data.tokenizer:
    return {}
  from lm import data as data_lib  # pylint: disable=g-import-not-at-top
  data = data_lib.make_data(config.data, vocab_size=config.model.vocab_size,
                            batch_size=config.train.batch_size, seed=config.train.seed,
                            workdir=os.path.join(workdir, 'shared'))
  return {'data.tokenizer': data.tokenizer.path}


def seed_data_cache(workdir: str, run_dir: str) -> None:
  """Hard-links the tokens prepared once into the run's data cache, so runs skip tokenizing;
  lm.data re-tokenizes if they differ."""
  from lm import token_cache  # pylint: disable=g-import-not-at-top
  token_cache.copy_cache(os.path.join(workdir, 'shared', 'data'), os.path.join(run_dir, 'data'))


def prepare(sweep, workdir: str, write: bool = True) -> list:
  """The sweep's runs; with `write`, also the shared data, each run's run.json and data cache.

  Without it (collecting results) nothing is written; the plan is the same, names included.
  """
  if not write:
    return plan_lib.plan(sweep)
  runs = plan_lib.plan(sweep, prepare_shared_data(sweep, workdir))
  for run in runs:
    write_run_json(sweep, workdir, run)
    seed_data_cache(workdir, run_dir(workdir, run))
  return runs


def run_dir(workdir: str, run: plan_lib.Run) -> str:
  return os.path.join(workdir, 'runs', run.name)


def write_run_json(sweep, workdir: str, run: plan_lib.Run) -> None:
  """run.json: what the run is (its overrides of the base config) and what it should give."""
  directory = run_dir(workdir, run)
  os.makedirs(directory, exist_ok=True)
  record = {'name': run.name, 'base_config': _base_path(sweep), 'overrides': run.overrides,
            'budget': run.budget, 'params': run.params,
            'non_embedding_params': run.non_embedding_params, 'tokens': run.tokens,
            'flops': run.flops, 'steps': run.steps, 'flops_method': sweep.flops_method}
  files_lib.write_atomically(os.path.join(directory, 'run.json'),
                             lambda f: json.dump(record, f, indent=1))


def final_eval(workdir: str, run: plan_lib.Run) -> dict | None:
  """The run's evaluation at its last step, or None while it has not reached it."""
  path = os.path.join(run_dir(workdir, run), 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  rows = [r for r in metrics_lib.read_metrics(path) if r['step'] == run.steps]
  return rows[0] if rows and rows[0].get('eval_loss') is not None else None


def result_row(workdir: str, run: plan_lib.Run, status: str, attempts: int,
               wall_s: float) -> dict:
  final = final_eval(workdir, run) or {}
  o = run.overrides
  return {
      'run': run.name, 'budget': run.budget, 'params': run.params,
      'non_embedding_params': run.non_embedding_params, 'tokens': run.tokens, 'flops': run.flops,
      'loss': final.get('eval_loss', ''), 'status': status, 'steps': run.steps,
      'd_model': o['model.d_model'], 'num_layers': o['model.num_layers'],
      'num_heads': o['model.num_heads'], 'd_ff': o['model.d_ff'],
      'learning_rate': o.get('train.learning_rate', ''), 'warmup_steps': o['train.warmup_steps'],
      'attempts': attempts, 'wall_s': round(wall_s, 1) if wall_s else '',
      'eval_bits_per_byte': final.get('eval_bits_per_byte', ''),
  }


def write_results(path: str, rows: list) -> None:
  """results.csv via a temporary file and os.replace: readers never see half a file."""
  def write(f):
    writer = csv.DictWriter(f, RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  files_lib.write_atomically(path, write, newline='')


def _base_path(sweep) -> str:
  """The base config as an absolute path, so jobs can run from any directory."""
  if os.path.exists(sweep.base) or os.path.isabs(sweep.base):
    return os.path.abspath(sweep.base)
  return os.path.join(_REPO, sweep.base)


def job_args(sweep, workdir: str, run: plan_lib.Run) -> tuple:
  """`python -m lm.main` arguments of a run (after the interpreter)."""
  return ('-m', 'lm.main', '--config', _base_path(sweep), '--workdir', run_dir(workdir, run),
          *(f'--config.{k}={v}' for k, v in run.overrides.items()))


def make_job(sweep, workdir: str, run: plan_lib.Run) -> backends.Job:
  """Jobs import the `lm` this launcher imports; compiled programs are cached across attempts."""
  env = (('PYTHONPATH', _REPO),)
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    env += (('JAX_COMPILATION_CACHE_DIR', os.path.join(workdir, 'jax_cache')),)
  return backends.Job(run.name, job_args(sweep, workdir, run), run_dir(workdir, run), env)


# ---------------------------------------------------------------------------------------------
# Running: submit, retry, record.


class Progress:
  """Done / running / failed counts as a tqdm bar and a log line per change; results.csv
  rewritten after each, from rows read once when their run settles."""

  def __init__(self, runs: list, workdir: str):
    self._runs, self._workdir = runs, workdir
    self._by_name = {r.name: r for r in runs}
    self._rows = {}  # name -> result_row of a settled ('done' or 'failed') run.
    self.status = {r.name: 'pending' for r in runs}
    self.attempts = collections.Counter()
    self.wall_s = collections.Counter()
    self._bar = tqdm(total=len(runs), desc='sweep', unit='run', dynamic_ncols=True)

  def update(self, name: str, status: str) -> None:
    if status in ('done', 'failed') and self.status[name] not in ('done', 'failed'):
      self._bar.update(1)
    self.status[name] = status
    if status in ('done', 'failed'):
      self._rows[name] = result_row(self._workdir, self._by_name[name], status,
                                    self.attempts[name], self.wall_s[name])
    else:
      self._rows.pop(name, None)
    counts = collections.Counter(self.status.values())
    summary = {k: counts[k] for k in ('done', 'running', 'failed')}
    summary['pending'] = counts['pending'] + counts['retrying']
    self._bar.set_postfix(summary)
    logging.info('%s: %s (%s)', name, status, ', '.join(f'{k} {v}' for k, v in summary.items()))
    self.write_results()

  def write_results(self) -> None:
    rows = [self._rows[r.name] for r in self._runs if r.name in self._rows]
    write_results(os.path.join(self._workdir, 'results.csv'), rows)

  def close(self):
    self._bar.close()


def execute(runs: list, jobs: dict, backend, workdir: str, retries: int) -> dict:
  """Runs every unfinished run, retrying each failure up to `retries` times; other runs go on.

  `jobs` maps a run name to its backends.Job. Returns {name: 'done' | 'failed'}.
  """
  progress = Progress(runs, workdir)
  by_name = {r.name: r for r in runs}
  pending = collections.deque()
  for run in runs:
    if final_eval(workdir, run):
      progress.update(run.name, 'done')
    else:
      pending.append(run.name)
  running = {}
  try:
    while pending or running:
      while pending and len(running) < backend.max_parallel:
        name = pending.popleft()
        progress.attempts[name] += 1
        running[backend.submit(jobs[name])] = name
        progress.update(name, 'running')
      finished, _ = concurrent.futures.wait(running, return_when='FIRST_COMPLETED')
      for future in finished:
        name = running.pop(future)
        status, outcome = _settle(future, by_name[name], workdir)
        progress.wall_s[name] += outcome.wall_s if outcome else 0.0
        if status == 'failed' and progress.attempts[name] <= retries:
          logging.warning('%s: attempt %d failed, retrying:\n%s', name, progress.attempts[name],
                          _why(outcome, future))
          pending.append(name)
          status = 'retrying'
        elif status == 'failed':
          logging.error('%s: failed after %d attempts:\n%s', name, progress.attempts[name],
                        _why(outcome, future))
        progress.update(name, status)
  finally:
    progress.close()
  return {name: progress.status[name] for name in by_name}


def _settle(future, run, workdir):
  """('done' | 'failed', Outcome or None): done means the final evaluation is on disk."""
  try:
    outcome = future.result()
  except Exception:  # pylint: disable=broad-except  # e.g. a Ray worker lost with its node.
    return 'failed', None
  ok = outcome.returncode == 0 and final_eval(workdir, run) is not None
  return ('done' if ok else 'failed'), outcome


def _why(outcome, future) -> str:
  if outcome is None:
    return f'  {future.exception()!r}'
  return f'  exit status {outcome.returncode}; last lines:\n' + '\n'.join(
      f'    {line}' for line in outcome.log_tail.splitlines())


# ---------------------------------------------------------------------------------------------
# The three modes.


def write_plan(sweep, workdir: str, runs: list, max_parallel: int) -> list:
  """plan.csv, commands.txt (unfinished runs only) and slurm_array.sh; returns their paths."""
  write_results(os.path.join(workdir, 'plan.csv'),
                [result_row(workdir, r, 'planned', 0, 0.0) for r in runs])
  todo = [r for r in runs if not final_eval(workdir, r)]
  commands = os.path.join(workdir, 'commands.txt')
  with open(commands, 'w') as f:
    for run in todo:
      job = make_job(sweep, workdir, run)
      env = ' '.join(f'{k}={shlex.quote(v)}' for k, v in job.env)
      f.write(f'{env} python {shlex.join(job.args)} > {shlex.quote(job.run_dir)}/log.txt 2>&1\n')
  script = os.path.join(workdir, 'slurm_array.sh')
  with open(script, 'w') as f:
    f.write(_SLURM_ARRAY.format(last=max(0, len(todo) - 1), max_parallel=max_parallel,
                                commands=shlex.quote(commands), logs=shlex.quote(workdir)))
  return [os.path.join(workdir, 'plan.csv'), commands, script]


_SLURM_ARRAY = """#!/bin/bash
# One array task per line of commands.txt (written by `python -m launch.sweep --mode plan`).
# Adjust the resources to your cluster; lm.main saves a checkpoint on SIGTERM and resumes.
#SBATCH --job-name=lm-sweep
#SBATCH --array=0-{last}%{max_parallel}
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --signal=TERM@120
#SBATCH --output={logs}/slurm-%A_%a.out
set -euo pipefail
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {commands})
srun bash -c "$line"
"""


def define_flags() -> types.SimpleNamespace:
  """The command's flags. Defined when it runs, not on import, so that importing this module
  beside another command's module (tests, notebooks) does not define --config twice."""
  names = types.SimpleNamespace(
      config=config_flags.DEFINE_config_file('config', None,
                                             'Sweep config (configs/sweeps/*.py).'),
      workdir=flags.DEFINE_string('workdir', None, 'Directory of the sweep: runs, results.csv.'),
      backend=flags.DEFINE_enum('backend', 'local', ['local', 'ray'], 'Where jobs run.'),
      ray_address=flags.DEFINE_string(
          'ray_address', None, 'Ray cluster to join; empty: start a local Ray instance.'),
      max_parallel=flags.DEFINE_integer('max_parallel', None, 'Jobs at once.'),
      retries=flags.DEFINE_integer('retries', 2, 'Attempts after the first before giving up.'),
      mode=flags.DEFINE_enum('mode', 'run', ['run', 'plan', 'collect'], 'What to do.'))
  flags.mark_flags_as_required(['config', 'workdir'])
  return names


def main(argv, args: types.SimpleNamespace):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_NoLibraryInfo())
  sweep, workdir = args.config.value, os.path.abspath(args.workdir.value)
  max_parallel = args.max_parallel.value or max(1, (os.cpu_count() or 2) // 2)
  os.makedirs(workdir, exist_ok=True)
  try:
    runs = prepare(sweep, workdir, write=args.mode.value != 'collect')
  except (ValueError, config_lib.ConfigError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  logging.info('%d runs: %s', len(runs), ', '.join(r.name for r in runs))
  if args.mode.value == 'collect':
    rows = [result_row(workdir, r, 'done' if final_eval(workdir, r) else 'unfinished', 0, 0.0)
            for r in runs]
    write_results(os.path.join(workdir, 'results.csv'), rows)
    print(f'{sum(r["status"] == "done" for r in rows)}/{len(rows)} runs done: '
          f'{workdir}/results.csv')
    return
  if args.mode.value == 'plan':
    print('wrote ' + ', '.join(write_plan(sweep, workdir, runs, max_parallel)))
    return
  jobs = {r.name: make_job(sweep, workdir, r) for r in runs}
  backend = backends.make_backend(args.backend.value, max_parallel, args.ray_address.value)
  start = time.perf_counter()
  try:
    status = execute(runs, jobs, backend, workdir, args.retries.value)
  finally:
    backend.close()
  failed = sorted(n for n, s in status.items() if s != 'done')
  print(f'{len(runs) - len(failed)}/{len(runs)} runs done in {time.perf_counter() - start:.0f} s;'
        f' results: {workdir}/results.csv')
  if failed:
    sys.exit(f'error: {len(failed)} run(s) failed (see runs/NAME/log.txt): {", ".join(failed)}')


class _NoLibraryInfo(std_logging.Filter):
  """Keep data preparation's INFO lines out of the sweep's log; warnings still show."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/launch/' in record.pathname


if __name__ == '__main__':
  app.run(functools.partial(main, args=define_flags()), flags_parser=config_lib.parse_flags)
