"""Loss curves as a PNG: `python -m lm.plot WORKDIR [WORKDIR ...] [--out loss.png]`.

Reads each WORKDIR/metrics.jsonl and draws training and held-out loss against step (one colour
per run), with throughput beneath. A run on a data mixture also logs each source's held-out loss
(eval_NAME_loss, e.g. eval_hi_loss and eval_en_loss); each gets a line style of its own, so
forgetting of one language while another improves shows in the picture.
"""

import argparse
import os
import re

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from lm import metrics as metrics_lib


_STYLES = ('o--', 's:', '^-.', 'v--', 'D:')


def held_out_keys(rows: list[dict]) -> list[str]:
  """eval_loss first, then each source's eval_NAME_loss, in the order they first appear."""
  keys = {}
  for row in rows:
    keys.update(dict.fromkeys(k for k in row if re.fullmatch(r'eval_(\w+_)?loss', k)))
  return sorted(keys, key=lambda k: k != 'eval_loss')


def plot_runs(workdirs: list[str], out: str) -> str:
  fig, (loss_ax, speed_ax) = plt.subplots(
      2, 1, figsize=(8, 7), sharex=True, gridspec_kw={'height_ratios': [3, 1]})
  for i, workdir in enumerate(workdirs):
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} does not exist: is {workdir} the --workdir of a run?')
    rows = metrics_lib.read_metrics(path)
    label = os.path.basename(os.path.normpath(workdir))
    color = f'C{i}'
    train = [(r['step'], r['loss']) for r in rows if r.get('loss') is not None]
    held_out = {key: [(r['step'], r[key]) for r in rows if r.get(key) is not None]
                for key in held_out_keys(rows)}
    speed = [(r['step'], r['tokens_per_sec']) for r in rows if r.get('tokens_per_sec')]
    if train:
      loss_ax.plot(*zip(*train), color=color, alpha=0.8, label=f'{label} train')
    for j, (key, points) in enumerate(held_out.items()):
      if points:
        source = key[len('eval_'):-len('_loss')]
        name = 'held-out' if not source else f'held-out {source}'
        loss_ax.plot(*zip(*points), _STYLES[j % len(_STYLES)], color=color,
                     label=f'{label} {name}')
    if speed:
      speed_ax.plot(*zip(*speed), color=color)
  loss_ax.set_ylabel('cross-entropy (nats/token)')
  loss_ax.grid(alpha=0.3)
  loss_ax.legend()
  speed_ax.set_ylabel('tokens/s')
  speed_ax.set_xlabel('step')
  speed_ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+', help='run directories holding metrics.jsonl')
  parser.add_argument('--out', help='PNG path (default: FIRST_WORKDIR/loss.png)')
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.workdirs[0], 'loss.png')
  print(plot_runs(args.workdirs, out))


if __name__ == '__main__':
  main()
