"""bench/post_training.py --smoke: lm's SFT and DPO steps and TRL's do the same work (the same
first-step loss, the same reference log-probabilities, the same batch shape), and the report has
every number the full benchmark prints."""

import json
import math
import os
import subprocess
import sys

import pytest
import requirements

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_matches_trl_and_reports_ratios(tmp_path):
  for name in ('torch', 'transformers', 'datasets', 'trl'):
    requirements.require(name)
  out = tmp_path / 'post_training.json'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'post_training.py'), '--smoke', '--out',
       str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'lm/TRL' in result.stdout and 'first-step losses differ by' in result.stdout

  report = json.loads(out.read_text())
  assert set(report['results']) == {'tiny'}
  modes = report['results']['tiny']
  assert set(modes) == {'sft', 'dpo'}
  for mode, entry in modes.items():
    rows = entry['batch_size'] * (2 if mode == 'dpo' else 1)
    assert (entry['rows'], entry['seq_len']) == (rows, 32)
    assert entry['tokens_per_step'] == rows * 32
    assert 0 < entry['trained_tokens_per_step'] < entry['tokens_per_step']
    for side in ('lm', 'trl'):
      r = entry[side]
      assert len(r['times']) == 2 and r['step_s'] > 0
      assert r['tokens_per_s'] == pytest.approx(entry['tokens_per_step'] / r['step_s'])
    assert entry['lm']['params'] == entry['trl']['params']
    assert entry['trl']['batch_shape'] == [rows, 32]  # TRL's padded batch is lm's rows.
    assert entry['lm_over_trl'] == pytest.approx(
        entry['lm']['tokens_per_s'] / entry['trl']['tokens_per_s'])
    # Same weights, same tokens, same targets: the same loss before any update.
    assert entry['first_loss_abs_diff'] < 1e-4
  assert modes['sft']['lm']['first_loss'] > 1.0
  assert modes['dpo']['lm']['first_loss'] == pytest.approx(math.log(2), abs=1e-5)
  assert modes['dpo']['ref_logp_max_abs_diff'] < 1e-3
