"""The sweep launcher (launch/sweep.py, launch/backends.py): retries, a micro-sweep end to end on
the local backend surviving a kill, and one on a local Ray instance."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import requirements

from lm import config as config_lib
from lm import token_cache
from launch import backends
from launch import plan as plan_lib
from launch import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 2 budgets x 3 one-layer models of 12k-40k parameters, 16-100 steps each.
MICRO_SWEEP = '''
from launch.plan import base_sweep_config

def get_config():
  sweep = base_sweep_config()
  sweep.base = 'configs/tiny.py'
  sweep.overrides = {
      'model': {'vocab_size': 512, 'dtype': 'float32'},
      'data': {'seq_len': 32, 'max_chars': 100_000, 'tokenizer_train_chars': 100_000},
      'train': {'batch_size': 4, 'learning_rate': 1e-2, 'eval_batches': 2},
  }
  sweep.budgets = (8e8, 1.6e9)
  sweep.tokens_per_param = 0.25
  sweep.sizes_per_budget = 3
  sweep.size_span = 4.0
  sweep.family.update(head_dim=8, aspect_ratio=32.0, min_width=16, max_width=64)
  return sweep
'''


def _micro_sweep(tmp_path, **overrides):
  path = tmp_path / 'micro.py'
  path.write_text(MICRO_SWEEP)
  return str(path), config_lib.load_config(str(path), **overrides)


def _results(workdir):
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    return {row['run']: row for row in csv.DictReader(f)}


def _fake_run(name, steps=3):
  return plan_lib.Run(name=name, budget=1e9, overrides={
      'model.d_model': 16, 'model.num_layers': 1, 'model.num_heads': 2, 'model.d_ff': 48,
      'train.warmup_steps': 1}, params=100, non_embedding_params=50, tokens=1000, flops=1e9,
      steps=steps)


def _fake_job(workdir, run, exit_status=0):
  """A job that writes a final evaluation (as lm.main would), then exits with `exit_status`."""
  run_dir = sweep_lib.run_dir(workdir, run)
  code = (f'import json, os; os.makedirs({run_dir!r}, exist_ok=True); '
          f'exit_status = {exit_status}; '
          f'exit_status or open(os.path.join({run_dir!r}, "metrics.jsonl"), "a").write('
          f'json.dumps({{"step": {run.steps}, "eval_loss": 2.5}}) + "\\n"); '
          f'raise SystemExit(exit_status)')
  return backends.Job(run.name, ('-c', code), run_dir)


def test_a_failing_job_is_retried_then_reported_while_the_others_finish(tmp_path):
  workdir = str(tmp_path)
  runs = [_fake_run('good_a'), _fake_run('bad'), _fake_run('good_b')]
  jobs = {r.name: _fake_job(workdir, r, exit_status=3 if r.name == 'bad' else 0) for r in runs}
  backend = backends.LocalBackend(max_parallel=2)
  try:
    status = sweep_lib.execute(runs, jobs, backend, workdir, retries=2)
  finally:
    backend.close()
  assert status == {'good_a': 'done', 'bad': 'failed', 'good_b': 'done'}
  rows = _results(workdir)
  assert rows['bad']['status'] == 'failed' and rows['bad']['loss'] == ''
  assert rows['bad']['attempts'] == '3'  # The first attempt and two retries.
  assert float(rows['good_a']['loss']) == 2.5 and rows['good_a']['attempts'] == '1'
  log = open(os.path.join(workdir, 'runs', 'bad', 'log.txt')).read()
  assert log.count('===') == 3

  # Relaunched: finished runs are not run again; the failed one is tried afresh.
  backend = backends.LocalBackend(max_parallel=2)
  try:
    sweep_lib.execute(runs, jobs, backend, workdir, retries=0)
  finally:
    backend.close()
  assert open(os.path.join(workdir, 'runs', 'good_a', 'log.txt')).read().count('===') == 1
  assert log.count('===') + 1 == open(
      os.path.join(workdir, 'runs', 'bad', 'log.txt')).read().count('===')


def test_seed_data_cache_links_the_shared_tokens_into_a_run(tmp_path):
  """Each run reads the tokens prepared once, through lm.token_cache's own layout."""
  workdir, run = str(tmp_path), str(tmp_path / 'runs' / 'a')
  shared = os.path.join(workdir, 'shared', 'data')
  os.makedirs(shared)
  for path in token_cache.cache_files(shared):
    with open(path, 'w') as f:
      f.write('prepared')
  sweep_lib.seed_data_cache(workdir, run)
  for source, target in zip(token_cache.cache_files(shared),
                            token_cache.cache_files(os.path.join(run, 'data'))):
    assert os.path.samefile(source, target)


def _sweep_command(config, workdir):
  return [sys.executable, '-m', 'launch.sweep', '--config', config, '--workdir', str(workdir),
          '--max_parallel', '2', '--retries', '1']


def _env():
  return {**os.environ, 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}


def _has_checkpoint(run_dir):
  directory = os.path.join(run_dir, 'checkpoints')
  return os.path.isdir(directory) and any(p.isdigit() for p in os.listdir(directory))


def test_local_micro_sweep_killed_midway_resumes_and_completes(tmp_path):
  config, sweep = _micro_sweep(tmp_path)
  workdir = tmp_path / 'sweep'
  runs = plan_lib.plan(sweep)
  assert len(runs) == 6
  launcher = subprocess.Popen(_sweep_command(config, workdir), cwd=tmp_path, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
  killed_in = None
  try:
    deadline = time.time() + 240
    while time.time() < deadline and launcher.poll() is None:
      done = [r for r in runs if sweep_lib.final_eval(str(workdir), r)]
      partial = [r for r in runs if r not in done
                 and _has_checkpoint(sweep_lib.run_dir(str(workdir), r))]
      if done and partial:
        killed_in = partial[0].name
        break
      time.sleep(0.05)
  finally:
    os.killpg(launcher.pid, signal.SIGKILL)  # The launcher and its jobs, like a lost machine.
    launcher.wait()
  assert killed_in, 'no run was caught between its first checkpoint and its end'
  finished_before = {r.name for r in runs if sweep_lib.final_eval(str(workdir), r)}

  result = subprocess.run(_sweep_command(config, workdir), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = _results(workdir)
  assert sorted(rows) == sorted(r.name for r in runs)
  for run in runs:
    row = rows[run.name]
    assert row['status'] == 'done'
    assert 0 < float(row['loss']) < math.log(512)  # Learned something over uniform guessing.
    assert int(row['tokens']) == run.tokens and float(row['flops']) == pytest.approx(run.flops)
    log = open(os.path.join(workdir, 'runs', run.name, 'log.txt')).read()
    if run.name in finished_before:
      assert log.count('===') == 1  # Skipped on relaunch.
  resumed = open(os.path.join(workdir, 'runs', killed_in, 'log.txt')).read()
  assert 'resumed from step' in resumed
  record = json.load(open(os.path.join(workdir, 'runs', killed_in, 'run.json')))
  assert record['overrides']['data.tokenizer'].endswith('shared/tokenizer/spm.model')


def test_ray_micro_sweep_runs_jobs_on_a_local_instance_and_stops_it(tmp_path):
  ray = requirements.require('ray')
  _, sweep = _micro_sweep(tmp_path, budgets=(1.6e9,), sizes_per_budget=2)
  workdir = str(tmp_path / 'sweep')
  runs = sweep_lib.prepare(sweep, workdir)
  jobs = {r.name: sweep_lib.make_job(sweep, workdir, r) for r in runs}
  bad = _fake_run('always_fails')
  jobs[bad.name] = _fake_job(workdir, bad, exit_status=1)
  backend = backends.RayBackend(max_parallel=2)
  try:
    status = sweep_lib.execute(runs + [bad], jobs, backend, workdir, retries=1)
  finally:
    backend.close()
  assert not ray.is_initialized()
  assert status == {**{r.name: 'done' for r in runs}, bad.name: 'failed'}
  rows = _results(workdir)
  assert all(0 < float(rows[r.name]['loss']) < math.log(512) for r in runs)
  assert rows[bad.name]['attempts'] == '2'
