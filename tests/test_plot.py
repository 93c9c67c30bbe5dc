"""lm.plot: loss curves from metrics.jsonl, including each data source's held-out loss."""

import json

import matplotlib.image
import pytest

from lm import plot


def _write_run(directory, rows):
  directory.mkdir()
  with open(directory / 'metrics.jsonl', 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return str(directory)


MIXTURE_ROWS = [
    {'step': 10, 'loss': 5.0, 'tokens_per_sec': 900.0},
    {'step': 20, 'loss': 4.0, 'tokens_per_sec': 950.0, 'eval_loss': 4.2, 'eval_hi_loss': 4.5,
     'eval_en_loss': 3.9, 'eval_hi_perplexity': 90.0},
    {'step': 30, 'loss': 3.5, 'tokens_per_sec': 940.0, 'eval_loss': 3.8, 'eval_hi_loss': 3.6,
     'eval_en_loss': 4.0},
]


def test_held_out_keys_put_the_overall_loss_first():
  assert plot.held_out_keys(MIXTURE_ROWS) == ['eval_loss', 'eval_hi_loss', 'eval_en_loss']
  assert plot.held_out_keys([{'step': 1, 'loss': 2.0}]) == []


def test_plot_draws_every_held_out_curve(tmp_path, monkeypatch):
  mixture = _write_run(tmp_path / 'mixture', MIXTURE_ROWS)
  plain = _write_run(tmp_path / 'plain', [{'step': 5, 'loss': 6.0, 'eval_loss': 6.1}])
  labels = []
  monkeypatch.setattr(plot.plt.Axes, 'legend',
                      lambda ax, *a, **k: labels.extend(ax.get_legend_handles_labels()[1]))
  out = plot.plot_runs([mixture, plain], str(tmp_path / 'loss.png'))
  assert labels == ['mixture train', 'mixture held-out', 'mixture held-out hi',
                    'mixture held-out en', 'plain train', 'plain held-out']
  height, width, _ = matplotlib.image.imread(out).shape
  assert (height, width) == (840, 960)  # 8 x 7 inches at 120 dpi.


def test_a_directory_without_metrics_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='is .* the --workdir of a run'):
    plot.plot_runs([str(tmp_path)], str(tmp_path / 'loss.png'))
