"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives), 4 fake devices each."""

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lm import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINTS = 'checkpoints'  # train.train's checkpoint directory inside a workdir.


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(workdir, tokenizer, steps, mesh, *extra):
  return [sys.executable, '-m', 'lm.main', '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
          '--workdir', str(workdir), f'--config.data.tokenizer={tokenizer}',
          '--config.model.vocab_size=512', '--config.model.d_model=64',
          '--config.model.d_ff=128', '--config.model.num_layers=2',
          '--config.model.dtype=float32', '--config.data.max_chars=300000',
          '--config.data.seq_len=64', '--config.train.batch_size=16',
          '--config.train.warmup_steps=2', f'--config.train.steps={steps}',
          '--config.train.log_every=1', '--config.train.eval_every=4',
          '--config.train.checkpoint_every=4', *[f'--config.mesh.{k}={v}' for k, v in mesh.items()],
          *extra]


def _env(devices):
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_PLATFORMS='cpu')


def _one_process(workdir, tokenizer, steps, mesh, *extra):
  result = subprocess.run(_command(workdir, tokenizer, steps, mesh, *extra), cwd=ROOT, env=_env(8),
                          capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _two_processes(workdir, tokenizer, steps, mesh, *extra, timeout=400):
  port = _free_port()
  processes = [
      subprocess.Popen(
          _command(workdir, tokenizer, steps, mesh, *extra,
                   f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                   '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
                   '--config.distributed.initialization_timeout=120'),
          cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  deadline = time.time() + timeout
  for process in processes:
    try:
      outputs.append(process.communicate(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      raise
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-4000:]
  return outputs


def _losses(workdir):
  """{step: metrics} from a run's metrics.jsonl (train and eval rows of a step merged)."""
  return {r['step']: r for r in metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))}


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm import data as data_lib  # pylint: disable=g-import-not-at-top
  data_config = config_lib.base_config().data
  data_config.update(max_chars=300_000, tokenizer_train_chars=300_000, seq_len=64)
  workdir = tmp_path_factory.mktemp('tokenizer')
  return data_lib.make_data(data_config, vocab_size=512, batch_size=16, seed=0,
                            workdir=str(workdir)).tokenizer.path


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tokenizer):
  """One process, 8 devices, mesh data=2 x fsdp=4, 6 steps; checkpoints at steps 4 and 6."""
  workdir = tmp_path_factory.mktemp('reference')
  _one_process(workdir, tokenizer, 6, {'data': 2, 'fsdp': 4})
  return workdir


def test_two_processes_train_like_one_process_and_hand_over_to_one(tmp_path, tokenizer, reference):
  expected = _losses(reference)
  outputs = _two_processes(tmp_path, tokenizer, 6, {'data': 2, 'fsdp': 4},
                           '--config.train.steps_per_run=4')
  losses = _losses(tmp_path)
  # Step 1 has a row of its own (no throughput: it includes compilation).
  assert sorted(losses) == [1, 2, 3, 4]
  for step in range(1, 5):
    assert losses[step]['loss'] == pytest.approx(expected[step]['loss'], rel=1e-5), step
  assert losses[4]['eval_loss'] == pytest.approx(expected[4]['eval_loss'], rel=1e-5)
  # Process 0 alone logs: one metrics row per step (checked above), one line per log window.
  assert 'step 4/6: loss' in outputs[0][1] and '/6: loss' not in outputs[1][1]

  # One process on another mesh resumes the two processes' step-4 checkpoint.
  resumed = _one_process(tmp_path, tokenizer, 6, {'data': 2, 'fsdp': 2, 'tensor': 2})
  assert 'resumed from step 4' in resumed.stderr
  np.testing.assert_allclose(_losses(tmp_path)[6]['loss'], expected[6]['loss'], rtol=1e-5)


def test_two_processes_resume_a_one_process_checkpoint(tmp_path, tokenizer, reference):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / CHECKPOINTS / '6')  # Leaves the one-process step-4 checkpoint.
  outputs = _two_processes(workdir, tokenizer, 6, {'data': 1, 'fsdp': 8})
  assert 'resumed from step 4' in outputs[0][1]
  np.testing.assert_allclose(_losses(workdir)[6]['loss'], _losses(reference)[6]['loss'], rtol=1e-5)


def test_an_unreachable_coordinator_is_a_clear_error(tmp_path, tokenizer):
  port = _free_port()  # Nothing listens there.
  start = time.time()
  result = subprocess.run(
      _command(tmp_path, tokenizer, 3, {'data': -1},
               f'--config.distributed.coordinator_address=127.0.0.1:{port}',
               '--config.distributed.num_processes=2', '--config.distributed.process_id=1',
               '--config.distributed.initialization_timeout=5'),
      cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert f'could not join coordinator 127.0.0.1:{port} as process 1 of 2' in result.stderr
  assert 'Traceback' not in result.stderr
  assert time.time() - start < 90
