"""A Chinchilla-style isoFLOP sweep small enough for a 2-core CPU: 3 budgets x 5 sizes.

Models of 12k-330k parameters (widths 16-88, 1-3 layers) on the standard library's source with
a 512-piece tokenizer; about 27M tokens in all. Run it, then fit:
  python -m launch.sweep --config configs/sweeps/chinchilla_tiny.py --workdir /tmp/sweep
  python -m lm.scaling fit --results /tmp/sweep/results.csv --out /tmp/sweep/fit
"""

from launch.plan import base_sweep_config


def get_config():
  sweep = base_sweep_config()
  sweep.base = 'configs/tiny.py'
  sweep.overrides = {
      'model': {'vocab_size': 512, 'dtype': 'float32'},
      'data': {'seq_len': 64, 'max_chars': 6_000_000, 'tokenizer_train_chars': 1_000_000},
      'train': {'batch_size': 16, 'learning_rate': 5e-3, 'eval_batches': 16},
  }
  sweep.budgets = (3e11, 6e11, 1.2e12)
  sweep.flops_method = 'chinchilla'
  sweep.sizes_per_budget = 5
  sweep.size_span = 16.0
  # Head dimension 8 steps widths finely enough for 5 distinct sizes per budget at this scale.
  sweep.family.update(head_dim=8, aspect_ratio=32.0, min_width=16, max_width=256)
  return sweep
