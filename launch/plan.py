"""Planning an isoFLOP sweep: which model sizes to train at each compute budget, and how long.

For a budget C, the Chinchilla rule D ≈ 20·N gives the size N* expected to be compute-optimal;
the sweep trains `sizes_per_budget` models spaced evenly in log N from N*/√span to N*·√span, so
each isoFLOP curve should have its minimum inside the grid. Models come from one family (width
sets depth, heads and MLP width), and every count (parameters, FLOPs per token, tokens for a
budget) comes from lm.scaling, the same accounting the fit uses.

A run trains for the tokens its budget buys, rounded to whole steps; its learning rate warms up
over a fixed fraction of those steps and decays (cosine) to the last one, where it is evaluated.
"""

import dataclasses
import math

import ml_collections

from lm import config as config_lib
from lm import scaling


def base_sweep_config() -> ml_collections.ConfigDict:
  """Every field of a sweep config, commented where it is defined; configs/sweeps/*.py start
  from this."""
  sweep = ml_collections.ConfigDict()
  # Training config every run starts from (a configs/*.py file): data, batch, seq_len, peak
  # learning rate, vocabulary. The sweep sets model shape and schedule on top of it.
  sweep.base = 'configs/tiny.py'
  # Fields of the training config set for every run, as in the config itself, e.g.
  # {'data': {'max_chars': 1_000_000}}; `--config.overrides.data.max_chars=...` on the CLI.
  sweep.overrides = ml_collections.ConfigDict()
  sweep.budgets = (1e12, 3e12)  # Training compute budgets, FLOPs per run (one isoFLOP curve each).
  # How FLOPs are counted (lm.scaling.flops_per_token_by_method): '6N' (Kaplan: 6 x
  # non-embedding params) or 'chinchilla' (every matmul, embeddings and attention included; the
  # honest count for small models, whose embeddings and output layer are a large share of the
  # compute).
  sweep.flops_method = 'chinchilla'
  sweep.tokens_per_param = 20.0  # Chinchilla's rule D ≈ 20 N: places the centre of each bracket.
  sweep.rule_params = 'total'  # Which lm.scaling.param_counts N the rule uses ('total': Chinchilla).
  sweep.sizes_per_budget = 5  # Model sizes trained per budget.
  sweep.size_span = 16.0  # Largest / smallest N at a budget (16: N*/4 ... 4 N*).

  # The model family: one width (d_model) determines the whole shape.
  sweep.family = f = ml_collections.ConfigDict()
  f.head_dim = 16  # d_model / num_heads, fixed; widths step by this much.
  f.aspect_ratio = 32.0  # d_model / num_layers (depth grows with width).
  f.min_layers = 1  # Depth never drops below this.
  f.heads_per_kv = 1  # Query heads per key/value head (1: MHA; >1: GQA).
  f.mlp_ratio = 8 / 3  # d_ff / d_model (8/3 keeps SwiGLU at the cost of a 4x GELU MLP).
  f.d_ff_multiple = 16  # d_ff is rounded to a multiple of this.
  f.min_width = 32  # Narrowest and widest models the family may use.
  f.max_width = 1024

  # Schedule and bookkeeping of each run.
  sweep.warmup_fraction = 0.1  # Linear warmup over this fraction of a run's steps.
  sweep.checkpoints_per_run = 4  # Checkpoints spread over a run: what a killed run resumes from.
  return sweep


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep and the numbers the fit needs from it."""
  name: str  # Also its directory under WORKDIR/runs.
  budget: float  # The FLOP budget it was planned for.
  overrides: dict  # Dotted training-config field -> value, on top of the base config.
  params: int
  non_embedding_params: int
  tokens: int  # Tokens actually trained: steps x batch_size x seq_len.
  flops: float  # tokens x FLOPs per token: the budget, up to rounding to whole steps.
  steps: int


def model_shape(width: int, family: ml_collections.ConfigDict) -> dict:
  """model.* fields of the family member `width` wide."""
  num_heads = width // family.head_dim
  d_ff = max(family.d_ff_multiple,
             family.d_ff_multiple * round(width * family.mlp_ratio / family.d_ff_multiple))
  return {'d_model': width, 'num_layers': max(family.min_layers, round(width / family.aspect_ratio)),
          'num_heads': num_heads, 'num_kv_heads': max(1, num_heads // family.heads_per_kv),
          'd_ff': d_ff}


def family_models(base: ml_collections.ConfigDict, family) -> list:
  """config.model of every family member, narrowest first."""
  widths = range(max(family.head_dim, family.min_width), family.max_width + 1, family.head_dim)
  models = []
  for width in widths:
    model = ml_collections.ConfigDict(base.model.to_dict())
    model.update(model_shape(width, family))
    models.append(model)
  return models


def bracket(budget: float, models: list, sweep, seq_len: int) -> list:
  """Indices into `models` of the sweep.sizes_per_budget sizes around this budget's N*.

  N* is the member whose tokens per parameter at this budget is closest (in log) to
  sweep.tokens_per_param; targets are spaced evenly in log N over size_span around it, and
  each takes the nearest member not taken yet.
  """
  log_n = [math.log(scaling.param_counts(m)[sweep.rule_params]) for m in models]
  log_ratio = [math.log(scaling.tokens_for_budget(budget, m, seq_len, sweep.flops_method)) - n
               for m, n in zip(models, log_n)]
  centre = min(range(len(models)),
               key=lambda i: abs(log_ratio[i] - math.log(sweep.tokens_per_param)))
  k, half_span = sweep.sizes_per_budget, math.log(sweep.size_span) / 2
  targets = [log_n[centre] + half_span * (2 * j / (k - 1) - 1) if k > 1 else log_n[centre]
             for j in range(k)]
  if targets[0] < log_n[0] - 0.35 or targets[-1] > log_n[-1] + 0.35:
    raise ValueError(
        f'budget {budget:.3g} FLOPs: N*={math.exp(log_n[centre]):.3g} and a span of '
        f'{sweep.size_span} need models from N={math.exp(targets[0]):.3g} to '
        f'{math.exp(targets[-1]):.3g}, beyond the family (sweep.family.min_width='
        f'{sweep.family.min_width}, max_width={sweep.family.max_width}); widen it or change '
        'the budget.')
  chosen = []
  for target in targets:
    free = [i for i in range(len(models)) if i not in chosen]
    chosen.append(min(free, key=lambda i: abs(log_n[i] - target)))
  return sorted(chosen)


def schedule(tokens: float, train: ml_collections.ConfigDict, seq_len: int, sweep) -> dict:
  """train.* fields of a run of `tokens` tokens: steps, warmup, and evaluation at the end."""
  steps = max(1, round(tokens / (train.batch_size * seq_len)))
  return {
      'train.steps': steps,
      'train.warmup_steps': min(steps, max(1, round(sweep.warmup_fraction * steps))),
      'train.eval_every': steps,
      'train.checkpoint_every': max(1, math.ceil(steps / sweep.checkpoints_per_run)),
      'train.log_every': max(1, min(train.log_every, steps)),
  }


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'data': {'max_chars': 1}} -> {'data.max_chars': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(flatten(dict(value), f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def nest(dotted: dict) -> dict:
  """{'data.max_chars': 1} -> {'data': {'max_chars': 1}}, as lm.config.load_config takes."""
  tree = {}
  for key, value in dotted.items():
    section, _, field = key.partition('.')
    tree.setdefault(section, {})[field] = value
  return tree


def run_config(sweep, overrides: dict) -> ml_collections.ConfigDict:
  """The training config of a run: the base config with `overrides` applied, validated."""
  config = config_lib.load_config(sweep.base, **nest(overrides))
  config_lib.validate(config)
  return config


def budget_tag(budget: float) -> str:
  """3e12 -> '3e12', 2.5e13 -> '2.5e13': short, sortable enough, and safe in a path."""
  return f'{budget:.3g}'.replace('e+', 'e')


def plan(sweep: ml_collections.ConfigDict, shared: dict = None) -> list:
  """Every run of the sweep, budgets ascending then sizes ascending.

  `shared` holds dotted overrides for all runs decided at launch (e.g. the shared tokenizer).
  """
  common = {**flatten(sweep.overrides), **(shared or {})}
  base = run_config(sweep, common)
  seq_len = base.data.seq_len
  models = family_models(base, sweep.family)
  runs = []
  for budget in sorted(sweep.budgets):
    for i in bracket(budget, models, sweep, seq_len):
      model = models[i]
      tokens = scaling.tokens_for_budget(budget, model, seq_len, sweep.flops_method)
      overrides = {**common, **{f'model.{k}': v for k, v in model_shape(model.d_model,
                                                                         sweep.family).items()},
                   **schedule(tokens, base.train, seq_len, sweep)}
      run_config(sweep, overrides)  # Raises now, naming the field, rather than in a job.
      steps = overrides['train.steps']
      trained = steps * base.train.batch_size * seq_len
      counts = scaling.param_counts(model)
      runs.append(Run(
          name=f'C{budget_tag(budget)}_d{model.d_model}_l{model.num_layers}', budget=budget,
          overrides=overrides, params=counts['total'],
          non_embedding_params=counts['non_embedding'], tokens=trained,
          flops=trained * scaling.flops_per_token_by_method(model, seq_len, sweep.flops_method),
          steps=steps))
  return runs
