"""bench/moe.py --smoke: MoE (dropping, dropless) against a dense model of the same active size on
one device, and the expert-parallel meshes on 8 fake devices; every row's rates are consistent,
its FLOPs count the active parameters exactly, and only the expert meshes move tokens by
all-to-all."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smoke model (bench/moe.py's SMOKE_MODEL): 1 layer, d_model 32, 2 heads of 16, 1 kv head,
# vocab 256 tied; 8 experts of width 32, top-2; the dense peer's d_ff is 2 x 32.
L, D, V, E, K, F = 1, 32, 256, 8, 2, 32
ATTENTION = L * D * 16 * (2 * 2 + 2 * 1)
DENSE_N = ATTENTION + L * 3 * D * (K * F) + D * V
ROUTER = L * D * E
MOE_ACTIVE_N = ATTENTION + L * (K * 3 * D * F + ROUTER) + D * V
MOE_TOTAL_N = ATTENTION + L * (E * 3 * D * F + ROUTER) + D * V
B, T = 8, 32


def _check_rates(r):
  assert len(r['times']) == 2 and min(r['times']) > 0
  assert r['tokens_per_step'] == B * T and (r['batch_size'], r['seq_len']) == (B, T)
  assert math.isfinite(r['tokens_per_s']) and r['tokens_per_s'] > 0
  assert r['tokens_per_s'] == pytest.approx(B * T / r['step_s'])
  assert math.isfinite(r['mfu']) and 0 < r['mfu'] <= 1
  assert r['mfu'] == pytest.approx(r['flops_per_token'] * r['tokens_per_s'] / r['peak_flops'])
  assert 0 < r['compile_s'] <= r['first_step_s']  # The first step compiles; reported apart.
  assert r['dtype'] == 'float32'


def _check_ratios(rows, ratios, base):
  assert set(ratios) == set(rows) - {base}
  for name, ratio in ratios.items():
    for key in ('tokens_per_s', 'step_s', 'mfu'):
      assert ratio[key] == pytest.approx(rows[name][key] / rows[base][key])


def test_smoke_run_reports_moe_against_dense_and_expert_parallel_meshes(tmp_path):
  out = tmp_path / 'moe.json'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'moe.py'), '--smoke', '--out', str(out)],
      cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'vs dense' in result.stdout and 'mesh (8 fake devices)' in result.stdout

  report = json.loads(out.read_text())
  assert {'cpu', 'cores', 'jax_backend'} <= set(report['machine'])
  assert report['versions']['jax'] and report['wall_s'] > 0
  assert report['peak_flops']['float32'] > 0

  single = report['single']
  rows = single['results']
  assert set(rows) == {'moe_dropping', 'moe_dropless', 'dense'}
  for r in rows.values():
    _check_rates(r)
    assert r['devices'] == 1 and r['all_to_all'] is False
  _check_ratios(rows, single['ratios_to_dense'], 'dense')
  assert single['compiles_during_timing'] == 0
  # Same active matmul parameters but the router's; 6 FLOPs per token for each.
  dense, dropping, dropless = rows['dense'], rows['moe_dropping'], rows['moe_dropless']
  assert (dense['d_ff'], dropping['d_ff']) == (K * F, F)
  assert dense['matmul_params_active'] == dense['matmul_params_total'] == DENSE_N
  for r in (dropping, dropless):
    assert (r['matmul_params_active'], r['matmul_params_total']) == (MOE_ACTIVE_N, MOE_TOTAL_N)
    assert r['flops_per_token'] - dense['flops_per_token'] == 6 * ROUTER
    assert (r['moe']['num_experts'], r['moe']['top_k'], r['moe']['layers']) == (E, K, L)
  assert dense['moe'] is None
  assert dropping['moe']['capacity_factor'] == 1.25 and dropless['moe']['capacity_factor'] == 0
  assert dropping['moe']['capacity_slots'] == math.ceil(1.25 * K * T / E) == 10
  # A random router overfills some experts' 10 slots; dropless drops nothing.
  assert 0 < dropping['moe']['dropped_first'] < 0.5 and 0 <= dropping['moe']['dropped'] < 0.5
  assert len(dropping['moe']['dropped_per_layer']) == L
  assert dropless['moe']['dropped_first'] == dropless['moe']['dropped'] == 0
  # Same seeded weights and batch: at init the three losses are all about log V.
  for r in rows.values():
    assert abs(r['first_loss'] - math.log(V)) < 0.1

  expert = report['expert_parallel']
  meshes = expert['results']
  assert set(meshes) == {'data=8', 'expert=8', 'expert=4 x data=2'}
  assert len(expert['devices']) == 8 and expert['compiles_during_timing'] == 0
  _check_ratios(meshes, expert['ratios_to_data8'], 'data=8')
  sizes = {'data=8': (8, 1), 'expert=8': (1, 8), 'expert=4 x data=2': (2, 4)}
  for name, r in meshes.items():
    _check_rates(r)
    assert r['devices'] == 8 and (r['mesh']['data'], r['mesh']['expert']) == sizes[name]
    assert r['mesh']['fsdp'] == r['mesh']['tensor'] == 1
    assert r['matmul_params_active'] == MOE_ACTIVE_N
    # The whole CPU's peak, shared by the 8 fake devices (not an eighth of it).
    assert r['peak_flops'] == pytest.approx(dropping['peak_flops'], rel=0.5)
    # The dropping run on 8 devices: the same first step as on one, drops included.
    assert r['first_loss'] == pytest.approx(dropping['first_loss'], rel=1e-5)
    assert r['moe']['dropped_first'] == pytest.approx(dropping['moe']['dropped_first'], abs=1e-6)
  # Only split experts need tokens moved to them.
  assert meshes['data=8']['collectives']['all-to-all'] == 0 and not meshes['data=8']['all_to_all']
  for name in ('expert=8', 'expert=4 x data=2'):
    assert meshes[name]['all_to_all'] and meshes[name]['collectives']['all-to-all'] > 0
