"""The command line end to end: `python -m lm.main` with overrides, then `python -m lm.plot`."""

import json
import os
import struct
import subprocess
import sys

import pytest

from tensorboardX.proto import event_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensorboard_scalars(directory):
  """Scalar tags in TFRecord event files (length, crc, payload, crc per record)."""
  tags = set()
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      tags.update(value.tag for value in event.summary.value)
      offset += 12 + length + 4
  return tags


def test_cli_trains_with_overrides_then_resumes_and_plots(tmp_path):
  workdir = tmp_path / 'run'
  base = [sys.executable, '-m', 'lm.main', '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
          '--workdir', str(workdir), '--config.model.d_model=64', '--config.model.d_ff=128',
          '--config.model.num_layers=2', '--config.model.vocab_size=512',
          '--config.data.max_chars=300000', '--config.data.seq_len=64',
          '--config.train.batch_size=8', '--config.train.warmup_steps=2',
          '--config.train.log_every=2', '--config.train.eval_every=4',
          '--config.train.checkpoint_every=4']
  first = subprocess.run(base + ['--config.train.steps=6'], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  # Redirected output gets a log line per log window, not a progress bar's '\r' updates.
  assert 'step 2/6: loss' in first.stderr and 'tokens/s, MFU' in first.stderr
  assert '\r' not in first.stderr

  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 4, 6]
  assert [r['step'] for r in rows if 'eval_loss' in r] == [4, 6]
  assert {'tokens_per_sec', 'mfu', 'grad_norm', 'learning_rate', 'step_time'} <= set(rows[1])
  assert {'loss', 'eval_loss', 'eval_bits_per_byte', 'tokens_per_sec', 'mfu'} <= (
      _tensorboard_scalars(workdir / 'tensorboard'))
  assert json.load(open(workdir / 'config.json'))['model']['d_model'] == 64
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '6']

  second = subprocess.run(
      base + ['--config.train.steps=8', '--config.train.allow_schedule_change=True'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resumed from step 6' in second.stderr
  assert 'config.train.steps 6 -> 8' in second.stderr
  assert json.load(open(workdir / 'config.step-6.json'))['train']['steps'] == 6
  assert json.load(open(workdir / 'config.json'))['train']['steps'] == 8
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '6', '8']

  # A run started from the checkpoint's config.json: data, so the config.py beside it never runs.
  (workdir / 'config.py').write_text(
      f'open({str(tmp_path / "executed")!r}, "w")\ndef get_config(): raise SystemExit(1)\n')
  continued = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', str(workdir / 'config.json'),
       '--workdir', str(tmp_path / 'continued'), '--config.train.steps=3'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert continued.returncode == 0, continued.stderr[-3000:]
  assert f'parameters from config.init_from={workdir}' in continued.stderr
  assert not (tmp_path / 'executed').exists()
  assert json.load(open(tmp_path / 'continued' / 'config.json'))['model']['d_model'] == 64

  plot = subprocess.run([sys.executable, '-m', 'lm.plot', str(workdir)], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
  assert plot.returncode == 0, plot.stderr
  with open(workdir / 'loss.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_cli_empty_corpus_names_the_path(tmp_path):
  (tmp_path / 'empty.txt').write_text('   \n')
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
       '--workdir', str(tmp_path / 'run'), f'--config.data.source=text:{tmp_path}/*.txt'],
      cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert str(tmp_path) in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.parametrize('raised, one_line', [
    ('sources.DataError("text:x/*.txt: no files match")', True),
    ('ValueError("an internal bug")', False)])
def test_input_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, raised, one_line):
  script = ('import sys; from lm import main, sources, train\n'
            f'def fail(*args): raise {raised}\n'
            'train.train = fail\n'
            'sys.argv = ["lm"] + sys.argv[1:]\n'
            'main.run()\n')
  result = subprocess.run(
      [sys.executable, '-c', script, '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
       '--workdir', str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert ('Traceback' not in result.stderr) == one_line, result.stderr[-2000:]
  if one_line:
    assert result.stderr.strip().splitlines()[-1] == 'error: text:x/*.txt: no files match'
