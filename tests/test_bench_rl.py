"""bench/rl.py --smoke: PPO (with a reward function and with a reward model) and GRPO steps timed
phase by phase; the phases add up to the step, no compilation falls in a timed step, and the
report has every number the full benchmark prints."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ('rollout', 'scoring', 'other', 'update')


def test_smoke_run_times_every_phase_of_ppo_and_grpo(tmp_path):
  out = tmp_path / 'rl.json'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'rl.py'), '--smoke', '--out', str(out)],
      cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'shares r/s/o/u %' in result.stdout and 'compilations while timed' in result.stdout

  report = json.loads(out.read_text())
  assert {'cpu', 'cores', 'jax_backend', 'devices'} <= set(report['machine'])
  assert report['versions']['jax'] and report['wall_s'] > 0
  runs = report['results']
  assert set(runs) == {'ppo', 'ppo_rm', 'grpo'}
  for name, r in runs.items():
    B, new = r['batch_size'], r['max_new_tokens']
    assert (B, new, r['seq_len']) == (8, 8, 32)
    for phase in PHASES:
      assert len(r['times'][phase]) == 2 and min(r['times'][phase]) > 0, (name, phase)
      assert r['phase_ms'][phase] > 0 and 0 < r['phase_share'][phase] < 1
      assert r['first_step'][phase] > 0
    assert sum(r['phase_share'].values()) == pytest.approx(1.0)
    # The phases partition each step.
    for i, step in enumerate(r['times']['step']):
      assert sum(r['times'][p][i] for p in PHASES) == pytest.approx(step, rel=1e-6)
    assert r['step_ms'] > 0 and r['first_step_s'] > r['step_ms'] / 1e3  # The first compiles.
    assert r['ms_per_update'] == pytest.approx(r['phase_ms']['update'] / r['updates_per_step'])
    assert B <= r['generated_tokens_per_step'] <= B * new
    assert r['rollout_tokens_per_s'] > 0 and 0 < r['decode_slot_use'] <= 1
    assert r['prefill_buckets_warmed'] == 2  # Prompts of up to 32 + 1 - 8 tokens, blocks of 16.
    assert r['compiles_during_timing'] == 0
    assert len(r['losses']) == 2 and all(abs(loss) < 1e3 for loss in r['losses'])
  for name in ('ppo', 'ppo_rm'):
    assert runs[name]['mode'] == 'ppo'
    assert (runs[name]['update_epochs'], runs[name]['minibatches']) == (4, 2)
    assert (runs[name]['updates_per_step'], runs[name]['rows_per_update']) == (8, 4)
  assert runs['ppo_rm']['reward'] == 'reward model'
  assert runs['ppo']['reward'] == 'lm.post.rewards:keyword_density'
  grpo = runs['grpo']
  assert grpo['mode'] == 'grpo' and (grpo['update_epochs'], grpo['minibatches']) == (1, 1)
  assert (grpo['group_size'], grpo['prompts_per_step'], grpo['rows_per_update']) == (4, 2, 8)
