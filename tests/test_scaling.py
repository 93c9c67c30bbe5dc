import csv
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm import flops
from lm import model as model_lib
from lm import scaling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Chinchilla's fitted law (Hoffmann et al. 2022, eq. 10), the truth of the synthetic runs.
TRUTH = {'E': 1.69, 'A': 406.4, 'B': 410.7, 'alpha': 0.34, 'beta': 0.28}
TRUE_A = 0.28 / (0.34 + 0.28)  # N_opt exponent beta / (alpha + beta) = 0.4516
TRUE_G = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)  # (alpha A / (beta B))^(1/(alpha+beta))


def _model(**fields):
  model = config_lib.base_config().model
  model.update(fields)
  return model


def _config(model):
  config = config_lib.base_config()
  config.model = model
  return config


# ---------------------------------------------------------------------------------------------
# Accounting.


def test_param_counts_by_hand_llama_tied_gqa():
  model = config_lib.load_config('configs/tiny.py').model  # V 2048, D 128, L 4, H 4, K 2, F 384
  attention = 128 * 4 * 32 + 2 * 128 * 2 * 32 + 4 * 32 * 128  # w_q, w_k + w_v, w_o = 49152
  mlp = 3 * 128 * 384  # gate, up, down = 147456
  block = attention + mlp + 2 * 128  # + two RMSNorm scales = 196864
  non_embedding = 4 * block + 128  # + final norm; the tied output is the embedding
  assert scaling.param_counts(model) == {
      'total': 2048 * 128 + non_embedding, 'non_embedding': 787_584, 'embedding': 262_144,
      'active': 2048 * 128 + non_embedding, 'active_non_embedding': 787_584}
  assert 2048 * 128 + non_embedding == 1_049_728


def test_param_counts_by_hand_gpt2_untied():
  model = _model(block='gpt2', vocab_size=100, d_model=16, num_layers=2, num_heads=4,
                 num_kv_heads=4, d_ff=64, max_seq_len=32, tie_embeddings=False)
  attention = 4 * 16 * 16 + (3 * 16 + 16)  # w_q, w_k, w_v, w_o; b_q, b_k, b_v (H*Q), b_o (D)
  mlp = 2 * 16 * 64 + 64 + 16  # w_up, w_down; b_up, b_down
  block = attention + mlp + 2 * (16 + 16)  # two LayerNorms (scale, bias) = 3280
  non_embedding = 2 * block + 32 + 16 * 100  # + final LayerNorm + unembed = 8192
  embedding = 100 * 16 + 32 * 16  # tokens + learned positions = 2112
  assert scaling.param_counts(model) == {
      'total': 10_304, 'non_embedding': non_embedding, 'embedding': embedding,
      'active': 10_304, 'active_non_embedding': non_embedding}


def test_param_counts_by_hand_moe():
  model = config_lib.load_config('configs/moe_tiny.py').model  # tiny, F 128, 8 experts, top-2
  attention = 49152
  expert = 3 * 128 * 128
  router = 128 * 8
  norms = 4 * 2 * 128 + 128
  counts = scaling.param_counts(model)
  assert counts['non_embedding'] == 4 * (attention + 8 * expert + router) + norms
  assert counts['active_non_embedding'] == 4 * (attention + 2 * expert + router) + norms
  assert counts['total'] - counts['active'] == 4 * 6 * expert
  # 6 N_active for compute; every other block MoE halves the experts' share.
  assert scaling.flops_per_token_by_method(model, 128, '6N') == 6 * counts['active_non_embedding']
  model.moe.every_n_layers = 2
  counts = scaling.param_counts(model)
  assert counts['non_embedding'] == 4 * attention + 2 * expert + 2 * (8 * expert + router) + norms


@pytest.mark.parametrize('block,tie,kv_heads', [
    ('llama', False, 4), ('llama', True, 2), ('llama', False, 1),
    ('gpt2', False, 4), ('gpt2', True, 2), ('gpt2', False, 1)])
def test_param_counts_match_the_model_tree(block, tie, kv_heads):
  model = _model(block=block, tie_embeddings=tie, num_kv_heads=kv_heads, vocab_size=101,
                 d_model=64, num_layers=3, num_heads=4, d_ff=96, max_seq_len=40)
  cfg = model_lib.ModelConfig.from_config(_config(model), dtype='float32')
  tree = jax.eval_shape(lambda: model_lib.init_params(cfg, 0))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  embedding = sum(x.size for path, x in leaves if path[-1].key in ('embed', 'pos_embed'))
  counts = scaling.param_counts(model)
  assert counts['total'] == model_lib.count_params(tree)
  assert counts['embedding'] == embedding
  assert counts['non_embedding'] == counts['total'] - embedding


@pytest.mark.parametrize('block,every', [('llama', 1), ('llama', 3), ('gpt2', 1), ('gpt2', 3)])
def test_moe_param_counts_match_the_model_tree(block, every):
  model = _model(block=block, vocab_size=101, d_model=32, num_layers=3, num_heads=4,
                 num_kv_heads=2, d_ff=48, max_seq_len=40)
  model.moe.update(num_experts=4, top_k=2, every_n_layers=every)
  cfg = model_lib.ModelConfig.from_config(_config(model), dtype='float32')
  tree = jax.eval_shape(lambda: model_lib.init_params(cfg, 0))
  counts = scaling.param_counts(model)
  assert counts['total'] == model_lib.count_params(tree)
  experts = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                if path[0].key == 'moe_blocks' and path[1].key == 'mlp'
                and path[-1].key != 'w_router')
  assert counts['total'] - counts['active'] == experts // 2  # 2 of 4 experts run per token.
  matmul, _ = flops.matmul_param_counts(tree, active_expert_share=0.5)
  assert matmul == flops.matmul_params(cfg, active=True)
  assert flops.matmul_param_counts(tree)[0] == flops.matmul_params(cfg)


def test_flops_per_token_by_method_by_hand():
  model = config_lib.load_config('configs/tiny.py').model
  assert scaling.flops_per_token_by_method(model, 128, '6N') == 6 * 787_584
  # Chinchilla appendix F, forward pass per token at T = 128 (H 4, K 2, Q 32, swiglu):
  embedding = 2 * 2048 * 128
  qkv = 2 * 128 * 32 * (4 + 2 * 2)
  logits = 2 * 128 * 32 * 4  # attention logits; the reduction over values costs the same
  softmax = 3 * 4 * 128
  projection = 2 * 4 * 32 * 128
  mlp = 2 * 3 * 128 * 384
  layer = qkv + 2 * logits + softmax + projection + mlp  # 460288
  output = 2 * 128 * 2048
  forward = embedding + 4 * layer + output  # 2889728
  assert scaling.flops_per_token_by_method(model, 128, 'chinchilla') == 3 * forward == 8_669_184
  assert scaling.tokens_for_budget(1e18, model, 128) == 1e18 / (6 * 787_584)
  assert scaling.tokens_for_budget(1e18, model, 128, 'chinchilla') == 1e18 / 8_669_184


def test_chinchilla_count_is_the_mfu_count_plus_embedding_and_softmax():
  model = config_lib.load_config('configs/llama_1b.py').model
  cfg = model_lib.ModelConfig.from_config(_config(model), dtype='float32')
  extra = 3 * (2 * 32000 * 2048 + 3 * 22 * 32 * 2048)
  assert scaling.flops_per_token_by_method(model, 2048, 'chinchilla') == (
      flops.flops_per_token(cfg, 2048) + extra)
  with pytest.raises(ValueError, match='method'):
    scaling.flops_per_token_by_method(model, 2048, 'palm')


# ---------------------------------------------------------------------------------------------
# Fits, on runs drawn from TRUTH.


def _synthetic_runs(budgets=np.logspace(18, 21, 6), points=7, span=8.0, noise=0.0, seed=0):
  """`points` model sizes per budget, log-spaced within `span`x of the true N_opt; D = C/(6N)."""
  rng = np.random.default_rng(seed)
  params, flops_ = [], []
  for budget in budgets:
    n_opt = TRUE_G * (budget / 6) ** TRUE_A
    params += list(n_opt * np.geomspace(1 / span, span, points))
    flops_ += [budget] * points
  params, flops_ = np.array(params), np.array(flops_)
  tokens = flops_ / (6 * params)
  loss = scaling.parametric_loss(TRUTH, params, tokens) * np.exp(
      noise * rng.standard_normal(len(params)))
  return {'run': np.array([f'r{i}' for i in range(len(params))]), 'params': params,
          'tokens': tokens, 'flops': flops_, 'loss': loss}


def _write_csv(path, runs, losses=None):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['run', 'params', 'non_embedding_params', 'tokens', 'flops', 'loss'])
    for i, run in enumerate(runs['run']):
      loss = runs['loss'][i] if losses is None else losses[i]
      writer.writerow([run, runs['params'][i], 0.9 * runs['params'][i], runs['tokens'][i],
                       runs['flops'][i], loss])


def test_load_results_excludes_failed_runs_with_a_warning(tmp_path):
  runs = _synthetic_runs(budgets=[1e18], points=5)
  path = tmp_path / 'results.csv'
  _write_csv(path, runs, losses=[2.5, 'nan', '', 'failed', 2.4])
  with pytest.warns(UserWarning, match=r'excluded 3 run\(s\).*r1, r2, r3'):
    loaded = scaling.load_results(str(path))
  assert list(loaded['run']) == ['r0', 'r4']
  np.testing.assert_allclose(loaded['loss'], [2.5, 2.4])
  with open(path, 'w') as f:
    f.write('run,params,tokens,loss,status\nok,100,2000,3.5,done\nbad,100,2000,3.6,failed\n')
  with pytest.warns(UserWarning, match=r'excluded 1 run\(s\).*: bad'):
    loaded = scaling.load_results(str(path))
  np.testing.assert_allclose(loaded['flops'], [6 * 100 * 2000])  # no flops column: C = 6ND
  with pytest.raises(ValueError, match='no column'):
    scaling.load_results(str(path), params_column='non_embedding_params')


def test_load_results_names_the_file_and_what_is_wrong(tmp_path):
  path = tmp_path / 'results.csv'
  path.write_text('run,params,tokens,loss\n')
  with pytest.raises(scaling.ResultsError, match=r'results.csv: a header and no rows'):
    scaling.load_results(str(path))
  path.write_text('')
  with pytest.raises(scaling.ResultsError, match=r'results.csv: empty; expected a header'):
    scaling.load_results(str(path))
  path.write_text('run,params,tokens,loss\na,100,2000,nan\nb,0,2000,3.0\n')
  with pytest.warns(UserWarning, match='excluded 2'), pytest.raises(
      scaling.ResultsError, match=r'none of its 2 run\(s\) has a finite positive loss'):
    scaling.load_results(str(path))
  with pytest.raises(scaling.ResultsError, match=r'absent.csv: cannot read: No such file'):
    scaling.load_results(str(tmp_path / 'absent.csv'))


def test_isoflop_groups_tolerate_small_differences():
  labels, budgets = scaling.isoflop_groups([1e18, 1.04e18, 3e18, 0.98e18, 3.1e18], rtol=0.1)
  assert list(labels) == [0, 0, 1, 0, 1]
  np.testing.assert_allclose(budgets, [1e18, 3.05e18])  # medians


def test_approach1_per_budget_minimum():
  fit = scaling.fit_approach1(_synthetic_runs(points=21, span=4.0))
  # Minima snap to a grid of ratio 4^(1/10) = 1.15, so the exponent is only roughly recovered.
  assert abs(fit['a'] - TRUE_A) < 0.05
  assert fit['a'] + fit['b'] == pytest.approx(1)  # C = 6ND at every point
  assert len(fit['minima']) == 6


def test_approach2_recovers_the_exponent_from_noisy_isoflops():
  fit = scaling.fit_approach2(_synthetic_runs(noise=0.005))
  assert abs(fit['a'] - TRUE_A) < 0.03
  assert fit['a'] + fit['b'] == pytest.approx(1)
  at = scaling.optimal_allocation(fit, 1e21)
  assert at['tokens'] == pytest.approx(1e21 / (6 * at['params']), rel=1e-6)


def test_approach2_skips_and_flags_budgets_without_a_minimum():
  runs = _synthetic_runs(budgets=[1e18, 1e19, 1e20], points=5)
  extra = {'run': ['few0', 'few1', 'cap0', 'cap1', 'cap2', 'cap3', 'edge0', 'edge1', 'edge2'],
           'params': [1e8, 2e8] + [1e8, 2e8, 4e8, 8e8] + [1e8, 2e8, 4e8],
           'flops': [1e22] * 2 + [1e23] * 4 + [1e24] * 3,
           'loss': [2.0, 2.1] + [1.0, 1.2, 1.2, 1.0] + [3.0, 2.5, 2.2]}
  runs = {k: np.concatenate([runs[k], extra[k]]) for k in extra}
  runs['tokens'] = runs['flops'] / (6 * runs['params'])
  with pytest.warns(UserWarning) as caught:
    fit = scaling.fit_approach2(runs)
  messages = [str(w.message) for w in caught]
  assert any('1e+22' in m and 'need 3 for a parabola; skipped' in m for m in messages)
  assert any('1e+23' in m and 'opens downward' in m for m in messages)
  assert any('1e+24' in m and 'outside the grid' in m for m in messages)
  assert len(fit['skipped']) == 3
  assert [p['flops'] for p in fit['profiles'] if 'params' in p] == pytest.approx([1e18, 1e19, 1e20])


def test_approach3_recovers_a_noise_free_law():
  fit = scaling.fit_approach3(_synthetic_runs(), starts=2)
  for key, value in TRUTH.items():
    assert fit[key] == pytest.approx(value, rel=1e-3), key
  assert fit['a'] == pytest.approx(TRUE_A, rel=1e-3)
  assert fit['G'] == pytest.approx(TRUE_G, rel=1e-2)
  n_opt = scaling.optimal_allocation(fit, 5.76e23)['params']
  assert n_opt == pytest.approx(TRUE_G * (5.76e23 / 6) ** TRUE_A, rel=1e-2)


@pytest.mark.parametrize('loss', [
    lambda n, d: np.full(len(n), 2.0),  # unbounded, alpha + beta reached 0: ZeroDivisionError
    lambda n, d: 1 + 0.01 * np.log(n * d),  # unbounded, beta went negative and G to NaN
], ids=['flat', 'rising'])
def test_approach3_refuses_a_loss_that_does_not_fall_with_n_or_d(loss):
  runs = _synthetic_runs(budgets=[1e18, 1e19, 1e20], points=4)
  runs['loss'] = loss(runs['params'], runs['tokens'])
  with pytest.raises(ValueError, match=r'degenerate fit: (alpha|beta) at the lower bound 0.001'):
    scaling.fit_approach3(runs, starts=4)


def test_bootstrap_drops_and_counts_resamples_that_fail_or_are_not_finite():
  runs = _synthetic_runs(budgets=[1e18], points=10)

  def fit_fn(sample):
    if 'r0' in sample['run']:
      raise ZeroDivisionError('float division by zero')
    return {'x': float('nan') if 'r1' in sample['run'] else 1.0}

  rng = np.random.default_rng(5)
  draws = [set(runs['run'][rng.integers(0, 10, 10)]) for _ in range(50)]
  survivors = sum(not {'r0', 'r1'} & drawn for drawn in draws)
  samples = scaling.bootstrap(runs, fit_fn, resamples=50, seed=5)
  assert 0 < len(samples['x']) == survivors < 50
  assert scaling.bootstrap(runs, lambda sample: fit_fn(runs), resamples=5) == {}


def test_bootstrap_is_seeded_and_drops_failed_refits():
  runs = _synthetic_runs(budgets=[1e18, 1e19, 1e20], points=4, noise=0.01)
  first = scaling.bootstrap(runs, scaling.fit_approach2, resamples=20, seed=3)
  again = scaling.bootstrap(runs, scaling.fit_approach2, resamples=20, seed=3)
  np.testing.assert_array_equal(first['a'], again['a'])
  assert 0 < len(first['a']) < 20  # resamples with < 3 sizes in a budget cannot be fitted
  low, high = scaling.interval(first['a'])
  assert low <= np.median(first['a']) <= high


# ---------------------------------------------------------------------------------------------
# The CLI, end to end: one run shared by the tests below.


@pytest.fixture(scope='module')
def cli_fit(tmp_path_factory):
  folder = tmp_path_factory.mktemp('scaling')
  runs = _synthetic_runs(noise=0.005, seed=1)
  _write_csv(folder / 'results.csv', runs,
             losses=[*runs['loss'][:-1], 'nan'])  # a failed run, excluded with a warning
  out = folder / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'lm.scaling', 'fit', '--results', str(folder / 'results.csv'),
       '--out', str(out), '--budget', '5.76e23', '1e21', '--resamples', '20'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': ROOT, 'OPENBLAS_NUM_THREADS': '1'})
  assert result.returncode == 0, result.stderr
  with open(out / 'fit.json') as f:
    return json.load(f), out, result


def test_cli_writes_fit_json_table_and_plots(cli_fit):
  report, out, result = cli_fit
  assert 'excluded 1 run(s)' in result.stderr
  assert 'approach3: parametric L(N, D)' in result.stdout and 'D/N' in result.stdout
  assert 'resamples refitted' in result.stdout
  assert report['runs'] == 41
  for name in ('approach1', 'approach2', 'approach3'):
    assert report[name]['resamples_fitted'] + report[name]['resamples_dropped'] == 20
    assert [row['flops'] for row in report[name]['budgets']] == [5.76e23, 1e21]
    row = report[name]['budgets'][0]
    assert row['tokens_per_param']['value'] == pytest.approx(
        row['tokens']['value'] / row['params']['value'])
  for png in ('isoflops.png', 'allocation.png', 'parametric.png'):
    with open(out / png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert sorted(os.listdir(out)) == ['allocation.png', 'fit.json', 'isoflops.png',
                                     'parametric.png']  # no temporary files left


def test_cli_approach3_recovers_the_law_and_its_intervals_cover_it(cli_fit):
  fit = cli_fit[0]['approach3']['fit']
  assert fit['E']['value'] == pytest.approx(TRUTH['E'], abs=0.05)
  assert fit['A']['value'] == pytest.approx(TRUTH['A'], rel=0.3)
  assert fit['B']['value'] == pytest.approx(TRUTH['B'], rel=0.3)
  assert fit['alpha']['value'] == pytest.approx(TRUTH['alpha'], abs=0.03)
  assert fit['beta']['value'] == pytest.approx(TRUTH['beta'], abs=0.03)
  for key, value in {**TRUTH, 'a': TRUE_A}.items():
    assert fit[key]['low'] <= value <= fit[key]['high'], key
  approach2 = cli_fit[0]['approach2']['fit']['a']
  assert approach2['low'] <= TRUE_A <= approach2['high']


# ---------------------------------------------------------------------------------------------
# The CLI in process: bad input is one line, and --out is untouched.


def _main(argv, monkeypatch):
  monkeypatch.setattr(warnings, 'formatwarning', warnings.formatwarning)  # main replaces it
  return scaling.main(['fit', *map(str, argv)])


def _unfittable(runs, **_):
  """Stands in for fit_approach3 where its L-BFGS runs would only slow a CLI test down."""
  raise ValueError('degenerate fit')


def test_cli_reports_resamples_too_few_to_give_intervals(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(scaling, 'fit_approach3', _unfittable)
  _write_csv(tmp_path / 'results.csv', _synthetic_runs(budgets=[1e18, 1e19, 1e20], points=3))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    _main(['--results', tmp_path / 'results.csv', '--out', tmp_path / 'out', '--resamples', 10],
          monkeypatch)
  assert any(str(w.message).startswith('approach2: only ') for w in caught)
  with open(tmp_path / 'out' / 'fit.json') as f:
    approach2 = json.load(f)['approach2']
  assert approach2['resamples_fitted'] < 5 and approach2['resamples_dropped'] > 5
  assert 'too few for reliable intervals' in approach2['bootstrap_warning']
  assert 'dropped (fit failed or degenerate); too few for reliable intervals' in (
      capsys.readouterr().out)


@pytest.mark.parametrize('contents,message', [
    ('run,params,tokens,loss\n', 'results.csv: a header and no rows'),
    ('run,params,tokens\na,100,2000\n', "results.csv: no column(s) ['loss']"),
    ('run,params,tokens,loss\na,100,2000,3.0\nb,200,1000,2.9\nc,400,500,3.1\n',
     'results.csv: no approach could be fitted: approach1: 1 compute-optimal point(s)'),
])
def test_cli_input_errors_are_one_line_and_leave_out_untouched(tmp_path, monkeypatch, contents,
                                                               message):
  monkeypatch.setattr(scaling, 'fit_approach3', _unfittable)
  results = tmp_path / 'results.csv'
  results.write_text(contents)
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'fit.json').write_text('{}')
  for out in ('new', 'old'):
    with warnings.catch_warnings(), pytest.raises(SystemExit) as raised:
      warnings.simplefilter('ignore')
      _main(['--results', results, '--out', tmp_path / out, '--resamples', 2], monkeypatch)
    assert raised.value.code.startswith('error: ') and message in raised.value.code
    assert '\n' not in raised.value.code
  assert not (tmp_path / 'new').exists()
  assert os.listdir(tmp_path / 'old') == ['fit.json']
  assert (tmp_path / 'old' / 'fit.json').read_text() == '{}'


@pytest.mark.parametrize('flags,message', [
    (['--resamples', -1], 'error: --resamples -1: expected a count >= 0'),
    (['--budget', 1e21, 0], 'error: --budget [0.0]: expected finite FLOP counts > 0'),
    (['--rtol', 'nan'], 'error: --rtol nan: expected a finite fraction >= 0'),
    (['--out', 'results.csv'], 'error: --out results.csv: exists and is not a directory'),
])
def test_cli_flag_errors_are_argparse_errors(tmp_path, monkeypatch, capsys, flags, message):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'results.csv').write_text('run,params,tokens,loss\n')
  with pytest.raises(SystemExit) as raised:
    _main(['--results', 'results.csv', '--out', 'out', *flags], monkeypatch)
  assert raised.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1].endswith(message)
  assert sorted(os.listdir(tmp_path)) == ['results.csv']


def test_cli_params_column_takes_underscores_and_the_dashed_spelling(tmp_path, monkeypatch, capsys):
  (tmp_path / 'results.csv').write_text('run,params,tokens,loss\na,100,2000,3.0\n')
  for flag in ('--params_column', '--params-column'):
    with pytest.raises(SystemExit, match=r"no column\(s\) \['non_embedding_params'\]"):
      _main(['--results', tmp_path / 'results.csv', '--out', tmp_path / 'out', flag,
             'non_embedding_params'], monkeypatch)
  with pytest.raises(SystemExit):
    _main(['-h'], monkeypatch)
  usage = capsys.readouterr().out
  assert '--params_column' in usage and '--params-column' not in usage
