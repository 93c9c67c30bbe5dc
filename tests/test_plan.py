"""Sweep planning (launch/plan.py): sizes bracket the Chinchilla optimum, budgets become steps,
and every run's overrides make a valid training config with the right schedule."""

import math

import numpy as np
import pytest

from lm import config as config_lib
from lm import scaling
from lm import train as train_lib
from launch import plan as plan_lib

SWEEP = 'configs/sweeps/chinchilla_tiny.py'


@pytest.fixture(scope='module')
def sweep():
  return config_lib.load_config(SWEEP)


@pytest.fixture(scope='module')
def runs(sweep):
  return plan_lib.plan(sweep)


def _by_budget(runs):
  groups = {}
  for run in runs:
    groups.setdefault(run.budget, []).append(run)
  return groups


def test_every_budget_gets_distinct_sizes_bracketing_twenty_tokens_per_param(sweep, runs):
  groups = _by_budget(runs)
  assert sorted(groups) == sorted(sweep.budgets) and len(groups) >= 3
  for budget, group in groups.items():
    params = [r.params for r in group]
    assert len(set(params)) == sweep.sizes_per_budget == 5, budget
    assert params == sorted(params)
    ratios = [r.tokens / r.params for r in group]
    # The rule's optimum lies strictly inside the grid: smaller models see more than 20 tokens
    # per parameter, larger ones fewer, and the middle one is the closest to 20 in log.
    assert ratios[0] > 20 > ratios[-1], (budget, ratios)
    middle = np.argmin([abs(math.log(r / 20)) for r in ratios])
    assert 1 <= middle <= 3, (budget, ratios)
    # Spread over about the requested span, roughly evenly in log N.
    span = params[-1] / params[0]
    assert sweep.size_span / 2.5 < span < sweep.size_span * 2.5, (budget, params)
    assert max(np.diff(np.log(params))) < 3 * min(np.diff(np.log(params))), (budget, params)


def test_budgets_become_whole_steps_of_the_base_batch(sweep, runs):
  base = plan_lib.run_config(sweep, plan_lib.flatten(sweep.overrides))
  tokens_per_step = base.train.batch_size * base.data.seq_len
  for run in runs:
    config = plan_lib.run_config(sweep, run.overrides)
    wanted = scaling.tokens_for_budget(run.budget, config.model, base.data.seq_len,
                                       sweep.flops_method)
    assert run.steps == config.train.steps == round(wanted / tokens_per_step)
    assert run.tokens == run.steps * tokens_per_step
    per_token = scaling.flops_per_token_by_method(config.model, base.data.seq_len,
                                                  sweep.flops_method)
    assert run.flops == pytest.approx(run.tokens * per_token)
    assert abs(run.flops / run.budget - 1) < 0.02, run.name  # Within a budget group of the fit.
    assert run.params == scaling.param_counts(config.model)['total']


def test_overrides_make_valid_configs_of_the_family(sweep, runs):
  for run in runs:
    config = plan_lib.run_config(sweep, run.overrides)  # load_config + validate
    m = config.model
    assert m.d_model == m.num_heads * sweep.family.head_dim
    assert m.num_layers == max(1, round(m.d_model / sweep.family.aspect_ratio))
    assert m.d_ff % sweep.family.d_ff_multiple == 0
    assert abs(m.d_ff / m.d_model - 8 / 3) < 0.5
    assert config.data.tokenizer == ''  # The launcher adds the shared one.
    assert run.name.startswith(f'C{plan_lib.budget_tag(run.budget)}_d{m.d_model}_')


def test_learning_rate_schedule_is_fitted_to_each_run(sweep, runs):
  for run in runs:
    t = plan_lib.run_config(sweep, run.overrides).train
    assert t.warmup_steps == max(1, round(0.1 * t.steps))
    assert t.eval_every == t.steps  # Evaluated once, at the end.
    assert math.ceil(t.steps / t.checkpoint_every) <= sweep.checkpoints_per_run
    schedule = train_lib.learning_rate_schedule(t)
    assert float(schedule(t.warmup_steps)) == pytest.approx(t.learning_rate)
    assert float(schedule(t.steps)) == pytest.approx(t.learning_rate * t.min_lr_ratio)
  # One model at two budgets: the larger budget trains proportionally longer.
  by_shape = {}
  for run in runs:
    by_shape.setdefault(run.overrides['model.d_model'], []).append(run)
  pairs = [sorted(g, key=lambda r: r.budget) for g in by_shape.values() if len(g) > 1]
  assert pairs
  for small, large in (p[:2] for p in pairs):
    assert large.steps / small.steps == pytest.approx(large.budget / small.budget, rel=0.02)


def test_a_budget_beyond_the_family_names_the_field(sweep):
  sweep = config_lib.load_config(SWEEP, budgets=(1e20,))
  with pytest.raises(ValueError, match='max_width'):
    plan_lib.plan(sweep)


def test_model_shape_follows_the_family_rules(sweep):
  assert plan_lib.model_shape(128, sweep.family) == {
      'd_model': 128, 'num_layers': 4, 'num_heads': 16, 'num_kv_heads': 16, 'd_ff': 336}
  assert plan_lib.flatten({'a': {'b': 1, 'c': {'d': 2}}}) == {'a.b': 1, 'a.c.d': 2}
  assert plan_lib.nest({'a.b': 1, 'c.d': 2}) == {'a': {'b': 1}, 'c': {'d': 2}}
