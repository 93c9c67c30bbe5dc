"""bench/gpu.py --smoke on CPU: every section of the accelerator benchmark (train variants with
their memory plan against XLA's, decode, serving, compile times) is in the report, its numbers
add up, and a variant that cannot run (cuDNN on a CPU) or a job whose process dies becomes a
row's error while the rest still run."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, 'bench', 'gpu.py')


def _bench(name: str):
  spec = importlib.util.spec_from_file_location(f'bench_{name}', os.path.join(ROOT, 'bench',
                                                                            f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """(report, stdout) of one --smoke run."""
  out = tmp_path_factory.mktemp('gpu') / 'gpu.json'
  result = subprocess.run([sys.executable, GPU, '--smoke', '--out', str(out)], cwd=out.parent,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text()), result.stdout


def test_smoke_train_rows_time_the_step_and_compare_the_plan_with_xla(smoke):
  report, stdout = smoke
  assert {'train', 'decode', 'serving', 'compile_s', 'machine', 'versions'} <= set(report)
  assert 'plan/XLA' in stdout and 'decode tok/s' in stdout and 'continuous batching' in stdout
  assert report['machine']['jax_backend'] == 'cpu' and report['wall_s'] > 0
  train = report['train']
  assert (train['batch_size'], train['seq_len'], train['tokens_per_step']) == (4, 64, 256)
  rows = train['rows']
  assert list(rows) == ['auto:remat', 'xla:noremat', 'cudnn:remat']  # --variants' order.
  for name in ('auto:remat', 'xla:noremat'):
    r = rows[name]
    assert 'error' not in r and 'skipped' not in r, (name, r.get('error'))
    assert (r['remat'], r['scan_layers']) == (name.endswith(':remat'), True)
    assert len(r['times']) == 2 and all(_positive(t) for t in r['times'])
    assert r['step_s'] == pytest.approx(float(np.median(r['times'])))
    assert r['tokens_per_s'] == pytest.approx(256 / r['step_s'])
    assert r['mfu'] == pytest.approx(r['flops_per_token'] * r['tokens_per_s'] / r['peak_flops'])
    assert r['peak_flops'] == report['machine']['peak_flops_per_device']  # One process.
    assert 0 < r['mfu'] <= 1
    assert _positive(r['compile_s']) and r['compile_events']['compiles'] >= 1
    # The steps ran the executable compiled from the abstract state: nothing compiled again.
    assert r['compiles_after_compile'] == 0 and r['cudnn_fmha_calls'] == 0
    # The step counted every unmasked target of the synthetic batch (2-4 documents per row).
    assert r['target_tokens'] == r['target_tokens_in_batch']
    assert 256 - 4 * 3 <= r['target_tokens'] <= 256 - 4
    assert math.isfinite(r['loss']) and r['loss'] > 0
    mem = r['memory']
    assert _positive(mem['planned']) and _positive(mem['xla']['total'])
    xla = mem['xla']
    assert xla['total'] == (xla['argument'] + xla['output'] - xla['alias'] + xla['temp']
                            + xla['generated_code'])
    assert xla['total'] == mem['xla_bytes_helper']  # lm.memory.xla_bytes' own count.
    assert mem['planned_over_xla'] == pytest.approx(mem['planned'] / xla['total'])
    assert 0.5 < mem['planned_over_xla'] < 2
  # Remat keeps less for the backward pass: in the plan and in XLA's count.
  remat, full = rows['auto:remat']['memory'], rows['xla:noremat']['memory']
  assert remat['planned'] < full['planned'] and remat['xla']['total'] < full['xla']['total']
  # cuDNN's attention does not exist on a CPU: the row says so, the run went on.
  assert 'cuDNN' in rows['cudnn:remat']['error'] and 'step_s' not in rows['cudnn:remat']
  assert report['jobs']['train:cudnn:remat']['error'] == rows['cudnn:remat']['error']


def test_smoke_decode_and_serving_rates_add_up(smoke):
  report, _ = smoke
  decode = report['decode']
  N = decode['new_tokens']
  assert set(decode['rows']) == {'b1_c32', 'b1_c64', 'b4_c32', 'b4_c64'}
  for r in decode['rows'].values():
    assert 'error' not in r, r
    assert _positive(r['decode_tok_s']) and _positive(r['first_token_s'])
    assert r['time_new_tokens_s'] > r['first_token_s']
    assert r['decode_tok_s'] == pytest.approx(
        r['batch'] * (N - 1) / (r['time_new_tokens_s'] - r['first_token_s']))
    assert r['decode_step_ms'] == pytest.approx(1e3 * r['batch'] / r['decode_tok_s'])
    assert r['compiles'] == 2 and _positive(r['compile_s'])  # One per length: N and 1.

  serving = report['serving']
  assert 'error' not in serving, serving.get('error')
  requests = _bench('generate').mixed_requests(report['model']['vocab_size'],
                                               serving['requests'])
  assert serving['requested_tokens'] == sum(r.max_new_tokens for r in requests)
  assert _positive(serving['continuous_tok_s']) and _positive(serving['static_tok_s'])
  assert serving['continuous_over_static'] == pytest.approx(
      serving['continuous_tok_s'] / serving['static_tok_s'])
  # Every token after a request's first (its prefill's) took one decode slot-step.
  assert (serving['continuous_decode_steps'] * serving['slots']
          >= serving['requested_tokens'] - serving['requests'])

  compiled = report['compile_s']
  assert set(compiled) == ({'train auto:remat', 'train xla:noremat', 'serving'}
                           | {f'decode {k}' for k in decode['rows']})
  assert all(_positive(v) for v in compiled.values())


def test_isolated_jobs_return_their_row_or_the_reason_their_process_died(smoke):
  report, _ = smoke
  planned = report['train']['rows']['xla:noremat']['memory']
  gpu = _bench('gpu')
  # A device too small for what XLA compiled, not for the plan (within PLAN_MARGIN): the job's
  # own process compiles the step, does not run it, and returns its row.
  limit = 0.9 * min(planned['planned'], planned['xla']['total'])
  row = gpu.run_isolated('train:xla:noremat', ['--smoke', '--device_gb', str(limit / 2**30)], 300)
  assert 'not run' in row['skipped'] and row['compile_s'] > 0 and 'step_s' not in row
  assert row['memory']['xla']['total'] == planned['xla']['total']
  assert row['memory']['limit'] == int(limit) and row['device']['jax_backend'] == 'cpu'
  # A device far too small for the plan: not even compiled (in this process: nothing compiles).
  args = argparse.Namespace(**{**gpu.SMOKE, 'smoke': True, 'isolate': False, 'compile_all': False,
                               'device_gb': planned['planned'] / 2 / 2**30})
  row = gpu.train_variant('xla:noremat', args)
  assert 'not compiled' in row['skipped'] and 'compile_s' not in row
  assert row['memory']['planned'] == planned['planned']
  # A process that exits without a result (here: its flags are refused) is reported with its
  # exit status and the end of its output.
  died = gpu.run_isolated('train:auto:remat', ['--variants', 'flash:remat'], 60)
  assert 'exited with status 2' in died['error']
  assert "variant 'flash:remat'" in died['log_tail']
