"""bench/eval.py --smoke: lm's harness adapter and lm-eval's HF backend on one tiny model agree, and
the report has every number the full benchmark prints."""

import json
import os
import subprocess
import sys

import pytest
import requirements

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_agrees_with_hf_and_reports_ratios(tmp_path):
  for name in ('torch', 'transformers'):
    requirements.require(name)
  out = tmp_path / 'eval.json'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'eval.py'), '--smoke', '--out', str(out),
       '--workdir', str(tmp_path / 'work')],
      cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'lm/hf' in result.stdout and 'agreement:' in result.stdout

  report = json.loads(out.read_text())
  assert set(report['results']) == {'lm b=4', 'hf b=4'}
  for side in report['results'].values():
    mc, gen = side['bench_eval_mc'], side['bench_eval_gen']
    assert (mc['requests'], gen['requests']) == (8 * 4, 4)
    assert mc['steady_s'] > 0 and gen['steady_s'] > 0 and gen['generated_tokens'] > 0
    assert mc['requests_per_s'] == pytest.approx(mc['requests'] / mc['steady_s'])
  ratios = report['ratios']['lm b=4']
  assert ratios['bench_eval_mc'] > 0 and ratios['bench_eval_gen'] > 0

  # Same weights, same token ids: the same log-likelihoods to fp32 rounding, the same answers.
  agreement = report['agreement']
  assert agreement['max_abs_loglikelihood_diff'] < 1e-3 < agreement['mean_abs_loglikelihood']
  assert agreement['acc_lm'] == agreement['acc_hf']
  assert agreement['acc_norm_lm'] == agreement['acc_norm_hf']
  assert agreement['same_choice'] == 1.0
  assert agreement['identical_generations'] >= 0.75
