"""lm.prepare on datatrove's cluster executors writes what the local one writes: Ray on a Ray
instance started for the run, Slurm through sbatch, srun and scontrol stand-ins that run each job array's
tasks on this machine, in submission order (so every job's dependencies have ended)."""

import os
import stat
import textwrap

import pytest

from lm.prepare import config as config_lib
from lm.prepare import pipeline
from test_prepare import _config, _outputs, _write_corpus

# Runs `bash SCRIPT` once per task of the array its #SBATCH --array=0-N[%W] line declares, with
# the variables a job array's tasks get, and answers as sbatch does.
FAKE_SBATCH = '''\
#!/usr/bin/env python3
import os, re, subprocess, sys
args, script = sys.argv[1:-1], sys.argv[-1]
text = open(script).read()
last = int(re.search(r'#SBATCH --array=0-(\\d+)', text).group(1))
env = dict(os.environ, SLURM_NODELIST='localhost', SLURM_JOB_ID='1')
for arg in args:
  if arg.startswith('--export=ALL,'):
    env.update(kv.split('=', 1) for kv in arg[len('--export=ALL,'):].split(','))
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'submitted'), 'a') as log:
  log.write(' '.join(args) + ' ' + re.search(r'#SBATCH --job-name=(\\S+)', text).group(1) + '\\n')
for task in range(last + 1):
  subprocess.run(['bash', script], env=dict(env, SLURM_ARRAY_TASK_ID=str(task)), check=True)
print('Submitted batch job 1')
'''
FAKE_SRUN = '''\
#!/bin/bash
while [[ $1 == -* ]]; do [[ $1 == -n ]] && shift; shift; done
exec "$@"
'''
FAKE_SCONTROL = '''\
#!/bin/bash
[[ $1 == show && $2 == hostnames ]] && echo "$3"
'''


def _corpus(tmp_path):
  directory = str(tmp_path / 'corpus')
  os.makedirs(directory)
  _, overrides = _write_corpus(directory)
  overrides['dedup.near'] = False  # Its buckets pass runs a task per band: many processes here.
  local = os.path.join(directory, 'local')
  pipeline.prepare(_config(overrides), local)
  return overrides, local


def test_ray_executor_writes_what_the_local_one_writes(tmp_path):
  pytest.importorskip('ray')
  overrides, local = _corpus(tmp_path)
  out = str(tmp_path / 'ray')
  report = pipeline.prepare(_config({**overrides, 'executor': 'ray', 'workers': 2, 'tasks': 2,
                                     'ray.mem_per_cpu_gb': 0.5}), out)
  assert report['tasks'] == 2
  assert _outputs(out) == _outputs(local)
  import ray  # pylint: disable=g-import-not-at-top
  assert not ray.is_initialized()  # The instance the run started is stopped.


def test_slurm_executor_submits_dependent_job_arrays(tmp_path, monkeypatch):
  overrides, local = _corpus(tmp_path)
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in (('sbatch', FAKE_SBATCH), ('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(stat.S_IRWXU)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  out = str(tmp_path / 'slurm')
  config = _config({**overrides, 'executor': 'slurm', 'tasks': 2, 'workers': 2,
                    'slurm.partition': 'cpu', 'slurm.sbatch_args': 'account=lm; exclusive'})
  result = pipeline.prepare(config, out)
  assert list(result['submitted']) == ['documents', 'signatures', 'clusters', 'final', 'report']
  assert _outputs(out) == _outputs(local)
  arrays = [line.split() for line in (bin_dir / 'submitted').read_text().splitlines()
            if 'RUN_OFFSET' in line]  # Not datatrove's stats-merging jobs.
  assert [a[-1] for a in arrays] == [f'lm-prepare-{name}' for name in result['submitted']]
  assert '--dependency=afterok:1' not in arrays[0]
  assert all('--dependency=afterok:1' in a for a in arrays[1:])  # Each after the one before.
  script = open(os.path.join(out, 'work', 'logs', 'documents', 'launch_script.slurm')).read()
  assert '#SBATCH --partition=cpu' in script and '#SBATCH --account=lm' in script
  assert '#SBATCH --exclusive\n' in script and '#SBATCH --array=0-1%2' in script
  # Submitted again, every task is complete: nothing is queued but the report job.
  (bin_dir / 'submitted').unlink()
  assert pipeline.prepare(config, out)['submitted']['documents'] == -1


def test_executor_fields_are_checked():
  config = config_lib.base_config()
  config.source = 'stdlib'
  config.executor = 'spark'
  with pytest.raises(config_lib.ConfigError, match=r"config.executor='spark': expected one of"):
    config_lib.validate(config)
  config.executor = 'slurm'
  with pytest.raises(config_lib.ConfigError, match='needs config.slurm.partition'):
    config_lib.validate(config)
  config.slurm.partition = 'cpu'
  config.slurm.sbatch_args = 'account=lm; bad key=1'
  with pytest.raises(config_lib.ConfigError, match=r"sbatch_args=.*bad entry 'bad key=1'"):
    config_lib.validate(config)
  assert config_lib.sbatch_args(' account = lm ;exclusive; ') == {'account': 'lm', 'exclusive': ''}
