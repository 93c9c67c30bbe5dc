"""Scaling laws: parameter and FLOP accounting, and Chinchilla's three compute-optimal fits.

Accounting (used by the sweep launcher under launch/): `param_counts`,
`flops_per_token_by_method` and `tokens_for_budget` take the config.model ConfigDict (or a
lm.model.ModelConfig).

Fits (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", section 3):
  python -m lm.scaling fit --results results.csv --out DIR [--budget 5.76e23 ...]
reads runs (`params, tokens, loss` columns, `flops` optional) and writes DIR/fit.json and PNGs.
The Python API behind it, for notebooks: load_results, fit_approach1/2/3, bootstrap, summarize,
optimal_allocation, parametric_loss, plot_isoflops/allocation/parametric. A fit is a dict whose
float values are the fitted numbers (the ones bootstrapped) and whose other values are
diagnostics; every fit has the allocation N_opt = n_coef C^a, D_opt = d_coef C^b.
"""

import os

if __name__ == '__main__':
  # scipy's L-BFGS-B makes tiny BLAS calls that multithreaded OpenBLAS slows ~10x on busy cores
  # (scipy/scipy#23191); the CLI owns its process, so it pins BLAS to one thread before numpy
  # loads. Library users can set OPENBLAS_NUM_THREADS=1 themselves.
  os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import csv
import functools
import json
import warnings

import matplotlib
from matplotlib.figure import Figure
import numpy as np
from scipy import optimize

from lm import files as files_lib
from lm import flops as flops_lib

# ---------------------------------------------------------------------------------------------
# Accounting.


def param_counts(model_cfg) -> dict:
  """{'total', 'non_embedding', 'embedding', 'active', 'active_non_embedding'} parameter counts,
  by formula (no model is built).

  Convention (Kaplan et al. 2020): 'embedding' is the lookup tables, the token embedding
  [V, D] and, for gpt2, the learned positions [max_seq_len, D]; 'non_embedding' is everything
  else: blocks, norms, biases and the output projection [D, V] when it is untied. A tied output
  projection is the token embedding, counted once, under 'embedding'. Chinchilla's N is 'total'.
  'active' counts what one token runs: with MoE (config.model.moe) its top_k experts of each MoE
  layer instead of all of them; for a dense model it equals 'total'.
  """
  D, V = model_cfg.d_model, model_cfg.vocab_size
  gpt2 = model_cfg.block == 'gpt2'
  embedding = V * D + (model_cfg.max_seq_len * D if gpt2 else 0)
  tied_output = V * D if model_cfg.tie_embeddings else 0
  counts = {'embedding': embedding}
  for prefix, active in (('', False), ('active_', True)):
    non_embedding = (flops_lib.matmul_params(model_cfg, active=active) - tied_output
                     + _norms_and_biases(model_cfg, active))
    counts[prefix + 'non_embedding'] = non_embedding
    counts['active' if active else 'total'] = embedding + non_embedding
  return counts


def _norms_and_biases(model_cfg, active: bool = False) -> int:
  """Per block two norms (scale, and bias for gpt2), plus the final norm; gpt2 biases (an MoE
  layer's experts each have their MLP biases: top_k of them when counting active)."""
  D, L = model_cfg.d_model, model_cfg.num_layers
  if model_cfg.block != 'gpt2':
    return (2 * L + 1) * D
  experts, top_k, moe_layers = flops_lib.moe_shape(model_cfg)
  q = model_cfg.d_model // model_cfg.num_heads
  attention_biases = q * (model_cfg.num_heads + 2 * model_cfg.num_kv_heads) + D
  mlp_biases = model_cfg.d_ff + D
  expert_mlp_biases = (top_k if active else experts) * mlp_biases
  return (2 * (2 * L + 1) * D + L * attention_biases + (L - moe_layers) * mlp_biases
          + moe_layers * expert_mlp_biases)


def flops_per_token_by_method(model_cfg, seq_len: int, method: str = '6N') -> float:
  """Training (forward + backward) FLOPs per token of a sequence of `seq_len` tokens, counted
  by a scaling-law convention (lm.flops.flops_per_token is the exact count behind MFU).

  '6N': 6 x param_counts(model_cfg)['active_non_embedding'] (Kaplan's C = 6N per token, with N
    the parameters a token runs: an MoE model's 6 N_active; the attention over the context, and
    a tied output projection, are left out).
  'chinchilla': Hoffmann et al. appendix F, 3 x the forward pass: embedding (as a one-hot
    matmul, 2VD), per layer the q/k/v/output projections, the attention logits and reduction
    (2THQ each, causal mask ignored) and softmax (3HT), the MLP (3 matrices for SwiGLU), and the
    output logits (2DV); norms, biases and nonlinearities are not counted. This is lm.flops's
    PaLM count (used for MFU) plus the embedding matmul and the softmax.
  """
  if method == '6N':
    return 6.0 * param_counts(model_cfg)['active_non_embedding']
  if method == 'chinchilla':
    embedding = 2 * model_cfg.vocab_size * model_cfg.d_model
    softmax = 3 * model_cfg.num_layers * model_cfg.num_heads * seq_len
    return flops_lib.flops_per_token(model_cfg, seq_len) + 3.0 * (embedding + softmax)
  raise ValueError(f"method={method!r}: expected '6N' or 'chinchilla'")


def tokens_for_budget(flops: float, model_cfg, seq_len: int, method: str = '6N') -> float:
  """Training tokens D that spend `flops` on this model: C / (FLOPs per token)."""
  return flops / flops_per_token_by_method(model_cfg, seq_len, method)


# ---------------------------------------------------------------------------------------------
# Results: one row per training run.


class ResultsError(ValueError):
  """A results CSV that cannot be fitted; the message names the file and what is wrong in it."""


def load_results(path: str, params_column: str = 'params') -> dict:
  """Runs from a CSV as {'run', 'params', 'tokens', 'flops', 'loss'} numpy arrays.

  N is read from `params_column` (e.g. 'non_embedding_params' for Kaplan's N). A missing or
  empty `flops` is taken as 6ND. Runs whose loss is missing, non-numeric or not finite, or whose
  `status` (launch/sweep.py's column, if present) is 'failed', are dropped with a warning, as are
  runs without a positive N or D. Raises ResultsError for a file that cannot be read, lacks a
  column, or has no usable run.
  """
  try:
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      rows = list(reader)
      columns = reader.fieldnames or []
  except OSError as e:
    raise ResultsError(f'{path}: cannot read: {e.strerror or e}') from e
  except (UnicodeDecodeError, csv.Error) as e:
    raise ResultsError(f'{path}: not a readable CSV: {e}') from e
  if not columns:
    raise ResultsError(f'{path}: empty; expected a header with {params_column}, tokens and loss')
  missing = {params_column, 'tokens', 'loss'} - set(columns)
  if missing:
    raise ResultsError(f'{path}: no column(s) {sorted(missing)}; columns are {sorted(columns)}')
  if not rows:
    raise ResultsError(f'{path}: a header and no rows: no runs to fit')
  runs = {
      'run': np.array([r.get('run') or str(i) for i, r in enumerate(rows)]),
      'params': np.array([_number(r[params_column]) for r in rows]),
      'tokens': np.array([_number(r['tokens']) for r in rows]),
      'loss': np.array([float('nan') if r.get('status') == 'failed' else _number(r['loss'])
                        for r in rows]),
      'flops': np.array([_number(r.get('flops')) for r in rows]),
  }
  runs['flops'] = np.where(np.isfinite(runs['flops']), runs['flops'],
                           6 * runs['params'] * runs['tokens'])
  runs = _drop_unusable(runs, path)
  if not len(runs['loss']):
    raise ResultsError(f'{path}: none of its {len(rows)} run(s) has a finite positive loss, '
                       f'{params_column}, tokens and flops')
  return runs


def _number(text) -> float:
  try:
    return float(text)
  except (TypeError, ValueError):
    return float('nan')


def _drop_unusable(runs: dict, source: str) -> dict:
  usable = np.isfinite(runs['loss']) & (runs['loss'] > 0)
  for key in ('params', 'tokens', 'flops'):
    usable &= np.isfinite(runs[key]) & (runs[key] > 0)
  if not usable.all():
    dropped = ', '.join(runs['run'][~usable])
    warnings.warn(f'{source}: excluded {int((~usable).sum())} run(s) with a missing, failed or '
                  f'non-finite loss, N, D or C: {dropped}')
  return take(runs, usable)


def take(runs: dict, index) -> dict:
  """The runs selected by a boolean mask or integer index array."""
  return {key: values[index] for key, values in runs.items()}


def isoflop_groups(flops, rtol: float = 0.1):
  """(labels, budgets): runs whose FLOPs lie within `rtol` of a group's smallest share a label;
  budgets[label] is the group's median. Labels count up with the budget."""
  flops = np.asarray(flops, float)
  labels = np.empty(len(flops), int)
  label, start = -1, 0.0
  for i in np.argsort(flops):
    if label < 0 or flops[i] > start * (1 + rtol):
      label, start = label + 1, flops[i]
    labels[i] = label
  budgets = np.array([np.median(flops[labels == g]) for g in range(label + 1)])
  return labels, budgets


def _power_law(x, y):
  """(exponent, coefficient) of y = coefficient * x^exponent, least squares in log-log."""
  exponent, intercept = np.polyfit(np.log(x), np.log(y), 1)
  return float(exponent), float(np.exp(intercept))


def _allocation_laws(points: list) -> dict:
  """N_opt = n_coef C^a and D_opt = d_coef C^b through compute-optimal points, each a dict
  with 'flops', 'params' and 'tokens'."""
  if len(points) < 2:
    raise ValueError(f'{len(points)} compute-optimal point(s): need 2 budgets to fit a power law')
  flops, params, tokens = (np.array([p[k] for p in points]) for k in ('flops', 'params', 'tokens'))
  a, n_coef = _power_law(flops, params)
  b, d_coef = _power_law(flops, tokens)
  return {'a': a, 'n_coef': n_coef, 'b': b, 'd_coef': d_coef}


def optimal_allocation(fit: dict, flops) -> dict:
  """Compute-optimal {'params', 'tokens', 'tokens_per_param'} at `flops`, for any approach."""
  flops = np.asarray(flops, float)
  params = fit['n_coef'] * flops ** fit['a']
  tokens = fit['d_coef'] * flops ** fit['b']
  return {'params': params, 'tokens': tokens, 'tokens_per_param': tokens / params}


# ---------------------------------------------------------------------------------------------
# Approach 1: the lowest loss at each FLOP budget.


def fit_approach1(runs: dict, rtol: float = 0.1, min_points: int = 3) -> dict:
  """Power laws through the lowest-loss run of each isoFLOP group.

  The paper takes, at each FLOP count, the lowest loss over all training curves (intermediate
  checkpoints included). With only final losses the envelope reduces to the per-budget minimum:
  the run with the lowest final loss in each group of equal FLOPs (within `rtol`). A budget
  with fewer than `min_points` distinct N has no meaningful minimum and is skipped with a
  warning. The estimate is only as fine as the grid of N.
  """
  labels, budgets = isoflop_groups(runs['flops'], rtol)
  minima, skipped = [], []
  for g, budget in enumerate(budgets):
    group = take(runs, labels == g)
    too_few = _too_few_sizes(group, budget, min_points, 'a minimum')
    if too_few:
      warnings.warn(too_few)
      skipped.append(too_few)
      continue
    best = np.argmin(group['loss'])
    minima.append({'flops': float(budget), 'params': float(group['params'][best]),
                   'tokens': float(group['tokens'][best]), 'loss': float(group['loss'][best])})
  return {**_allocation_laws(minima), 'minima': minima, 'skipped': skipped}


def _too_few_sizes(group: dict, budget: float, min_points: int, purpose: str) -> str | None:
  """Why a budget is skipped when it has fewer than `min_points` distinct model sizes."""
  sizes = len(np.unique(group['params']))
  if sizes < min_points:
    return (f'budget {budget:.3g} FLOPs: {sizes} distinct model size(s), need {min_points} for '
            f'{purpose}; skipped')
  return None


# ---------------------------------------------------------------------------------------------
# Approach 2: isoFLOP profiles.


def fit_approach2(runs: dict, rtol: float = 0.1, min_points: int = 3) -> dict:
  """Power laws through the minima of parabolas fitted to loss against log N, one per budget.

  A budget with fewer than `min_points` distinct N is skipped, and one whose parabola opens
  downward or has its minimum outside the budget's range of N is flagged and left out of the
  power laws; each with a warning and a line under 'skipped'. D_opt is read off the budget's own
  runs (log D linear in log N), which is C / (6 N_opt) when the FLOPs are 6ND.
  """
  labels, budgets = isoflop_groups(runs['flops'], rtol)
  profiles, skipped = [], []
  for g, budget in enumerate(budgets):
    profile = _isoflop_profile(take(runs, labels == g), budget, min_points)
    if 'skipped' in profile:
      warnings.warn(profile['skipped'])
      skipped.append(profile['skipped'])
    profiles.append(profile)
  laws = _allocation_laws([p for p in profiles if 'skipped' not in p])
  return {**laws, 'profiles': profiles, 'skipped': skipped}


def _isoflop_profile(group: dict, budget: float, min_points: int) -> dict:
  """The parabola loss(log N) of one budget and its minimum, or why it gives none."""
  log_n = np.log(group['params'])
  profile = {'flops': float(budget), 'runs': int(len(log_n))}
  too_few = _too_few_sizes(group, budget, min_points, 'a parabola')
  if too_few:
    return {**profile, 'skipped': too_few}
  curvature, slope, offset = np.polyfit(log_n, group['loss'], 2)
  profile['parabola'] = [float(curvature), float(slope), float(offset)]
  if curvature <= 0:
    return {**profile, 'skipped': f'budget {budget:.3g} FLOPs: the parabola opens downward '
            '(no minimum); flagged and left out'}
  best = -slope / (2 * curvature)
  if not log_n.min() <= best <= log_n.max():
    return {**profile, 'skipped': f'budget {budget:.3g} FLOPs: the minimum N={np.exp(best):.3g} '
            f'lies outside the grid [{group["params"].min():.3g}, {group["params"].max():.3g}]; '
            'flagged and left out'}
  log_d = np.polyval(np.polyfit(log_n, np.log(group['tokens']), 1), best)
  return {**profile, 'params': float(np.exp(best)), 'tokens': float(np.exp(log_d)),
          'loss': float(np.polyval(profile['parabola'], best))}


# ---------------------------------------------------------------------------------------------
# Approach 3: the parametric loss L(N, D) = E + A / N^alpha + B / D^beta.

# alpha and beta are bounded below: at alpha + beta = 0 the allocation (a, G) divides by zero,
# and a negative exponent is a loss that rises with N or D. An exponent left at the bound means
# the runs show no power-law fall in N or D, and the fit is refused as degenerate.
_MIN_EXPONENT = 1e-3
_LOWER_BOUNDS = np.array([-np.inf, -np.inf, -np.inf, _MIN_EXPONENT, _MIN_EXPONENT])
_BOUNDS = optimize.Bounds(_LOWER_BOUNDS, np.inf)

# The paper's grid of initial (a, b, e, alpha, beta), with a = log A, b = log B, e = log E; its
# exponents of 0 are raised to the bound.
_INIT_GRID = np.maximum(_LOWER_BOUNDS, np.stack(np.meshgrid(
    np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
    np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5), indexing='ij'), -1).reshape(-1, 5))


def _log_loss_pred(theta, log_n, log_d):
  """log L = LSE(a - alpha log N, b - beta log D, e) and the softmax weights of its 3 terms.

  theta is [..., 5] (a batch of parameter vectors broadcasts against the runs)."""
  a, b, e, alpha, beta = np.moveaxis(np.asarray(theta, float)[..., None], -2, 0)
  term_n, term_d = a - alpha * log_n, b - beta * log_d
  top = np.maximum(np.maximum(term_n, term_d), e)
  weights = np.exp(term_n - top), np.exp(term_d - top), np.exp(e - top)
  total = weights[0] + weights[1] + weights[2]
  return top + np.log(total), [w / total for w in weights]


def _huber_objective(theta, log_n, log_d, log_loss, delta):
  """Sum of Huber(delta) of log-loss residuals, and its gradient in theta."""
  pred, (w_n, w_d, w_e) = _log_loss_pred(theta, log_n, log_d)
  r = pred - log_loss
  abs_r = np.abs(r)
  value = np.where(abs_r <= delta, 0.5 * r ** 2, delta * (abs_r - 0.5 * delta)).sum(-1)
  dr = np.clip(r, -delta, delta)
  dn, dd = dr * w_n, dr * w_d
  grad = np.stack([dn.sum(-1), dd.sum(-1), (dr * w_e).sum(-1), -(dn * log_n).sum(-1),
                   -(dd * log_d).sum(-1)], -1)
  return value, grad


def fit_approach3(runs: dict, delta: float = 1e-3, starts: int = 32, init=None) -> dict:
  """L(N, D) fitted as in the paper: Huber(delta) on log-loss residuals, L-BFGS-B.

  The paper runs L-BFGS from every point of its grid of initialisations; here the objective is
  evaluated on the whole grid and L-BFGS runs from the `starts` best points (plus `init`, e.g. a
  previous fit's ['optimizer']['theta']), keeping the best optimum: in our tests the same
  optimum as the full grid's at a fraction of the cost. alpha and beta are kept above 0; a fit
  that ends with one at its bound, or with a non-finite allocation, raises ValueError.
  """
  data = (np.log(runs['params']), np.log(runs['tokens']), np.log(runs['loss']), delta)
  grid_values, _ = _huber_objective(_INIT_GRID, *data)
  inits = list(_INIT_GRID[np.argsort(grid_values)[:starts]])
  if init is not None:
    inits.insert(0, np.maximum(_LOWER_BOUNDS, np.asarray(init, float)))
  best = min((optimize.minimize(_huber_objective, x0, args=data, jac=True, method='L-BFGS-B',
                                bounds=_BOUNDS,
                                options={'ftol': 1e-15, 'gtol': 1e-12, 'maxiter': 10_000})
              for x0 in inits), key=lambda result: result.fun)
  theta = [float(x) for x in best.x]
  at_bound = [(name, variable) for name, variable, x in zip(('alpha', 'beta'), 'ND', theta[3:])
              if x <= _MIN_EXPONENT * (1 + 1e-6)]
  if at_bound:
    raise ValueError(f"degenerate fit: {' and '.join(name for name, _ in at_bound)} at the lower "
                     f'bound {_MIN_EXPONENT:g}: the loss shows no power-law fall in '
                     f"{' or '.join(variable for _, variable in at_bound)}")
  numbers = _parametric_numbers(best.x)
  non_finite = [key for key, value in numbers.items() if not np.isfinite(value)]
  if non_finite:
    raise ValueError(f'degenerate fit: {non_finite} not finite at (log A, log B, log E, alpha, '
                     f'beta) = {np.round(theta, 4).tolist()}')
  optimizer = {'theta': theta, 'objective': float(best.fun),
               'converged': bool(best.success), 'message': str(best.message)}
  return {**numbers, 'optimizer': optimizer}


def _parametric_numbers(theta) -> dict:
  """E, A, B, alpha, beta and the compute-optimal allocation they imply under C = 6ND:
  N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, a = beta/(alpha+beta), b = alpha/(alpha+beta).

  As in the paper, the budget is read as 6ND even when the runs' FLOPs were counted otherwise
  (e.g. flops_per_token_by_method(..., 'chinchilla')); Approaches 1 and 2 use the runs' own
  FLOPs."""
  log_a, log_b, log_e, alpha, beta = (float(x) for x in theta)
  a, b = beta / (alpha + beta), alpha / (alpha + beta)
  log_g = (np.log(alpha) + log_a - np.log(beta) - log_b) / (alpha + beta)
  logs = [log_e, log_a, log_b, log_g, log_g - a * np.log(6), -b * np.log(6) - log_g]
  with np.errstate(over='ignore'):  # An overflow is a degenerate fit, which fit_approach3 refuses.
    E, A, B, G, n_coef, d_coef = (float(x) for x in np.exp(logs))
  return {'E': E, 'A': A, 'B': B, 'alpha': alpha, 'beta': beta, 'a': a, 'b': b, 'G': G,
          'n_coef': n_coef, 'd_coef': d_coef}


def parametric_loss(fit: dict, params, tokens):
  """L(N, D) = E + A / N^alpha + B / D^beta of an Approach 3 fit."""
  params, tokens = np.asarray(params, float), np.asarray(tokens, float)
  return fit['E'] + fit['A'] / params ** fit['alpha'] + fit['B'] / tokens ** fit['beta']


# ---------------------------------------------------------------------------------------------
# Bootstrap confidence intervals.


def bootstrap(runs: dict, fit_fn, resamples: int = 200, seed: int = 0) -> dict:
  """{name: array of resampled values} for every float `fit_fn(runs)` returns.

  Each resample draws len(runs) runs with replacement and refits. A resample whose fit fails
  (e.g. too few budgets left for Approach 2, a degenerate Approach 3) or gives a non-finite
  number is dropped, its warnings silenced: resamples - len(any array) of them.
  """
  rng = np.random.default_rng(seed)
  count = len(runs['loss'])
  samples = []
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    for _ in range(resamples):
      try:
        fit = fit_fn(take(runs, rng.integers(0, count, count)))
      except (ValueError, ArithmeticError, np.linalg.LinAlgError):
        continue
      numbers = {k: v for k, v in fit.items() if isinstance(v, float)}
      if all(np.isfinite(list(numbers.values()))):
        samples.append(numbers)
  return {k: np.array([s[k] for s in samples]) for k in (samples[0] if samples else {})}


def interval(samples, confidence: float = 0.95) -> tuple:
  """(low, high) percentile interval of bootstrap samples; NaNs when there are none."""
  samples = np.asarray(samples, float)
  if not np.isfinite(samples).any():
    return float('nan'), float('nan')
  tail = 50 * (1 - confidence)
  low, high = np.nanpercentile(samples, [tail, 100 - tail])
  return float(low), float(high)


def summarize(fit: dict, samples: dict, budgets, confidence: float = 0.95) -> dict:
  """Every fitted number, and the allocation at each budget, as {'value', 'low', 'high'}."""
  def estimate(value, resampled):
    low, high = interval(resampled, confidence)
    return {'value': float(value), 'low': low, 'high': high}

  numbers = {k: estimate(v, samples.get(k, [])) for k, v in fit.items() if isinstance(v, float)}
  allocations = []
  for budget in budgets:
    point = optimal_allocation(fit, budget)
    resampled = optimal_allocation(samples, budget) if samples else {}
    allocations.append({'flops': float(budget), **{
        k: estimate(v, resampled.get(k, [])) for k, v in point.items()}})
  return {'fit': numbers, 'budgets': allocations}


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's Figure API: no pyplot state, so notebooks keep their backend).


def plot_isoflops(runs: dict, fit2: dict, path: str, rtol: float = 0.1) -> Figure:
  """Loss against N for each isoFLOP budget, with its fitted parabola and minimum."""
  labels, budgets = isoflop_groups(runs['flops'], rtol)
  fig = Figure(figsize=(7, 5))
  ax = fig.subplots()
  for g, profile in enumerate(fit2['profiles']):
    color = matplotlib.colormaps['viridis'](g / max(1, len(budgets) - 1))
    group = take(runs, labels == g)
    ax.scatter(group['params'], group['loss'], color=color, s=14,
               label=f'{budgets[g]:.2g} FLOPs')
    if 'parabola' in profile:
      log_n = np.linspace(*np.log([group['params'].min(), group['params'].max()]), 100)
      ax.plot(np.exp(log_n), np.polyval(profile['parabola'], log_n), color=color, lw=1)
    if 'params' in profile:
      ax.plot(profile['params'], profile['loss'], 'x', color='red', ms=8)
  ax.set(xscale='log', xlabel='parameters N', ylabel='final loss',
         title='IsoFLOP profiles (Approach 2); x: fitted minima')
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _save_figure(fig, path)


def plot_allocation(fits: dict, path: str, budgets=()) -> Figure:
  """N_opt and D_opt against C: each approach's compute-optimal points and fitted power laws,
  extrapolated to the requested budgets (dotted verticals)."""
  fig = Figure(figsize=(11, 4.5))
  axes = fig.subplots(1, 2)
  points = _optimal_points(fits)
  low = min([p['flops'] for p in points] or [1.0])
  high = max([p['flops'] for p in points] + list(budgets) or [10.0])
  flops = np.logspace(np.log10(low) - 0.3, np.log10(high) + 0.3, 50)
  for i, (name, fit) in enumerate(fits.items()):
    line = optimal_allocation(fit, flops)
    for ax, key, exponent in ((axes[0], 'params', 'a'), (axes[1], 'tokens', 'b')):
      ax.plot(flops, line[key], color=f'C{i}', label=f'{name}: {exponent}={fit[exponent]:.3f}')
      own = [p for p in points if p['approach'] == name]
      ax.scatter([p['flops'] for p in own], [p[key] for p in own], color=f'C{i}', s=18)
  for ax, label in ((axes[0], 'N_opt (parameters)'), (axes[1], 'D_opt (tokens)')):
    for budget in budgets:
      ax.axvline(budget, color='gray', ls=':', lw=1)
    ax.set(xscale='log', yscale='log', xlabel='training FLOPs C', ylabel=label)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.95, wspace=0.25)
  return _save_figure(fig, path)


def _optimal_points(fits: dict) -> list:
  """The per-budget compute-optimal points behind Approaches 1 and 2, tagged by approach."""
  points = []
  for name, fit in fits.items():
    found = fit.get('minima', []) + [p for p in fit.get('profiles', []) if 'params' in p]
    points += [{**p, 'approach': name} for p in found]
  return points


def plot_parametric(runs: dict, fit3: dict, path: str, budgets=(), rtol: float = 0.1) -> Figure:
  """Contours of the fitted L(N, D), the runs, isoFLOP lines D = C/(6N) for the runs' budgets
  and the requested ones, and the efficient frontier (N_opt(C), D_opt(C))."""
  _, run_budgets = isoflop_groups(runs['flops'], rtol)
  all_budgets = np.concatenate([run_budgets, np.asarray(budgets, float)])
  low, high = np.log10(all_budgets.min()) - 1, np.log10(all_budgets.max()) + 1
  frontier = optimal_allocation(fit3, np.logspace(low, high, 50))
  n_range = np.concatenate([runs['params'], frontier['params']])
  d_range = np.concatenate([runs['tokens'], frontier['tokens']])
  n = np.logspace(np.log10(n_range.min()) - 0.3, np.log10(n_range.max()) + 0.3, 200)
  d = np.logspace(np.log10(d_range.min()) - 0.3, np.log10(d_range.max()) + 0.3, 200)
  fig = Figure(figsize=(7, 5.5))
  ax = fig.subplots()
  contours = ax.contour(n, d, np.log(parametric_loss(fit3, n[None, :], d[:, None])), levels=20,
                        cmap='viridis', linewidths=0.8)
  fig.colorbar(contours, ax=ax, label='log L(N, D)')
  ax.scatter(runs['params'], runs['tokens'], s=10, color='black', label='runs')
  for budget in all_budgets:
    ax.plot(n, budget / (6 * n), color='gray', lw=0.7, ls='--')
  ax.plot(frontier['params'], frontier['tokens'], color='red', lw=2, label='efficient frontier')
  ax.set(xscale='log', yscale='log', xlim=(n[0], n[-1]), ylim=(d[0], d[-1]),
         xlabel='parameters N', ylabel='tokens D',
         title=f"L = {fit3['E']:.3g} + {fit3['A']:.3g}/N^{fit3['alpha']:.3f} + "
               f"{fit3['B']:.3g}/D^{fit3['beta']:.3f}")
  ax.legend(fontsize=8)
  return _save_figure(fig, path)


def _save_figure(fig: Figure, path: str) -> Figure:
  files_lib.write_atomically(path, lambda f: fig.savefig(f, format='png', dpi=120), mode='wb')
  return fig


# ---------------------------------------------------------------------------------------------
# The `fit` command.

APPROACHES = {
    'approach1': 'lowest loss per FLOP budget',
    'approach2': 'isoFLOP parabolas',
    'approach3': 'parametric L(N, D)',
}


# Fewer bootstrap resamples refitted than this share of those drawn leave intervals that
# describe the few resamples a fit survives rather than the data: the report says so.
_MIN_REFITTED_SHARE = 0.5


def run_fit(results: str, out: str, budgets=(), resamples: int = 200, seed: int = 0,
            rtol: float = 0.1, params_column: str = 'params', confidence: float = 0.95) -> dict:
  """All three approaches with bootstrap intervals; writes out/fit.json and the PNGs.

  The allocation table is given at `budgets`, or at the runs' own budgets when none are asked.
  An approach that cannot be fitted (e.g. one budget only) is reported with its 'error', and
  each approach with the number of its bootstrap resamples refitted and dropped. Nothing is
  written unless the results load and at least one approach fits; otherwise ResultsError.
  """
  runs = load_results(results, params_column)
  budgets = list(budgets) or list(isoflop_groups(runs['flops'], rtol)[1])
  report = {'results': results, 'params_column': params_column, 'runs': len(runs['loss']),
            'bootstrap': {'resamples': resamples, 'seed': seed, 'confidence': confidence}}
  fits = {}
  for name, fit_fn, resample_fn in _approaches(runs, rtol):
    try:
      fits[name] = fit = fit_fn()
    except ValueError as e:
      warnings.warn(f'{name} ({APPROACHES[name]}): {e}')
      report[name] = {'error': str(e)}
      continue
    samples = bootstrap(runs, resample_fn(fit), resamples, seed)
    refitted = len(next(iter(samples.values()), []))
    diagnostics = {k: v for k, v in fit.items() if not isinstance(v, float)}
    report[name] = {**summarize(fit, samples, budgets, confidence), **diagnostics,
                    'resamples_fitted': refitted, 'resamples_dropped': resamples - refitted}
    if refitted < _MIN_REFITTED_SHARE * resamples:
      report[name]['bootstrap_warning'] = warning = (
          f'{name}: only {refitted} of {resamples} bootstrap resamples could be refitted (the '
          'others failed or were degenerate): too few for reliable intervals')
      warnings.warn(warning)
  if not fits:
    raise ResultsError(f'{results}: no approach could be fitted: ' + '; '.join(
        f"{name}: {report[name]['error']}" for name in APPROACHES))
  json_report = _jsonable(report)
  report['plots'] = _plot_all(runs, fits, out, budgets, rtol)
  # Written last, so that a fit.json is there only with its plots.
  files_lib.write_atomically(os.path.join(out, 'fit.json'), lambda f: json.dump(
      json_report, f, indent=1, allow_nan=False))
  return report


def _approaches(runs: dict, rtol: float):
  """(name, fit on all runs, fit -> the function refitting a resample) per approach.
  Approach 3's resamples start L-BFGS from the full fit and from their best grid point."""
  yield ('approach1', lambda: fit_approach1(runs, rtol),
         lambda fit: functools.partial(fit_approach1, rtol=rtol))
  yield ('approach2', lambda: fit_approach2(runs, rtol),
         lambda fit: functools.partial(fit_approach2, rtol=rtol))
  yield ('approach3', lambda: fit_approach3(runs),
         lambda fit: functools.partial(fit_approach3, starts=1, init=fit['optimizer']['theta']))


def _plot_all(runs: dict, fits: dict, out: str, budgets, rtol: float) -> list:
  paths = []
  if 'approach2' in fits:
    paths.append(os.path.join(out, 'isoflops.png'))
    plot_isoflops(runs, fits['approach2'], paths[-1], rtol)
  if fits:
    paths.append(os.path.join(out, 'allocation.png'))
    plot_allocation(fits, paths[-1], budgets)
  if 'approach3' in fits:
    paths.append(os.path.join(out, 'parametric.png'))
    plot_parametric(runs, fits['approach3'], paths[-1], budgets, rtol)
  return paths


def _jsonable(value):
  """Plain JSON: numpy scalars to Python, NaN and infinities to null."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def format_report(report: dict) -> str:
  """The fitted numbers and the compute-optimal allocations as a plain-text table."""
  lines = [f"{report['runs']} runs used from {report['results']} (N = {report['params_column']}); "
           f"{report['bootstrap']['confidence']:.0%} intervals from "
           f"{report['bootstrap']['resamples']} bootstrap resamples"]
  for name, title in APPROACHES.items():
    section = report[name]
    lines.append(f'\n{name}: {title}')
    if 'error' in section:
      lines.append(f"  not fitted: {section['error']}")
      continue
    for key, est in section['fit'].items():
      lines.append(f'  {key:<10} {_estimate(est)}')
    lines.append(f"  bootstrap: {section['resamples_fitted']} resamples refitted, "
                 f"{section['resamples_dropped']} dropped (fit failed or degenerate)"
                 + ('; too few for reliable intervals' if 'bootstrap_warning' in section else ''))
    lines.append(f"  {'budget C':<10} {'N_opt':<30} {'D_opt':<30} D/N")
    for row in section['budgets']:
      lines.append(f"  {row['flops']:<10.3g} {_estimate(row['params']):<30} "
                   f"{_estimate(row['tokens']):<30} {_estimate(row['tokens_per_param'])}")
  return '\n'.join(lines)


def _estimate(est: dict) -> str:
  return f"{est['value']:.4g} [{est['low']:.3g}, {est['high']:.3g}]"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  fit = commands.add_parser('fit', help='fit the three approaches to a results CSV')
  fit.add_argument('--results', required=True, help='CSV with params, tokens, loss (flops)')
  fit.add_argument('--out', required=True, help='directory for fit.json and the PNGs')
  fit.add_argument('--budget', type=float, nargs='+', default=[],
                   help='FLOP budgets to give the compute-optimal N and D at, e.g. 5.76e23')
  fit.add_argument('--resamples', type=int, default=200, help='bootstrap resamples')
  fit.add_argument('--seed', type=int, default=0, help='seed of the bootstrap')
  fit.add_argument('--rtol', type=float, default=0.1,
                   help='runs whose FLOPs differ by less than this fraction share a budget')
  fit.add_argument('--params_column', default='params',
                   help="column holding N, e.g. 'non_embedding_params'")
  # The earlier spelling, still accepted.
  fit.add_argument('--params-column', dest='params_column', default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  _check_fit_args(fit, args)
  warnings.formatwarning = lambda message, *_: f'warning: {message}\n'
  try:
    report = run_fit(args.results, args.out, args.budget, args.resamples, args.seed, args.rtol,
                     args.params_column)
  except (ResultsError, OSError) as e:  # OSError: --out cannot be written.
    raise SystemExit(f'error: {e}') from None
  print(format_report(report))
  print(f"\nwrote {os.path.join(args.out, 'fit.json')} and {', '.join(report['plots'])}")


def _check_fit_args(parser: argparse.ArgumentParser, args) -> None:
  """parser.error (usage, one error line, exit 2) for a flag no fit can use."""
  if args.resamples < 0:
    parser.error(f'--resamples {args.resamples}: expected a count >= 0')
  if args.seed < 0:
    parser.error(f'--seed {args.seed}: expected an integer >= 0')
  if not (np.isfinite(args.rtol) and args.rtol >= 0):
    parser.error(f'--rtol {args.rtol}: expected a finite fraction >= 0')
  bad_budgets = [b for b in args.budget if not (np.isfinite(b) and b > 0)]
  if bad_budgets:
    parser.error(f'--budget {bad_budgets}: expected finite FLOP counts > 0')
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    parser.error(f'--out {args.out}: exists and is not a directory')


if __name__ == '__main__':
  main()
