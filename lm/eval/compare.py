"""Several checkpoints on the same tasks and data, side by side: one table and one bar chart.

  python -m lm.eval compare --checkpoints A,B[,C...] [--names base,extended] [--tasks T1,T2]
      [--include_path DIR] [--num_fewshot N] [--limit N] [--sources 'en=text:GLOB@1; hi=...']
      [--max_docs N] [--batch_size auto] [--dtype auto] --output_path DIR

Written for a base model next to its extended-vocabulary descendant (English and Hindi side by
side), where per-token numbers do not compare: --sources adds bits per byte per source
(lm/eval/perplexity.py), which does not depend on the tokenizer. Task rows are the harness's own
metrics (lm/eval/harness.py), with its stderr and its direction. Each checkpoint is loaded once,
for its tasks and sources, and freed before the next is loaded.

Writes compare.md (a row per metric, ↑/↓ its direction, the best checkpoint in bold),
compare.json (the rows and the settings) and compare.png (a panel per metric, a bar per
checkpoint, stderr error bars where the harness gives them).
"""

import argparse
import gc
import json
import math
import os
import sys

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import files as files_lib
from lm import generate as generate_lib
from lm.eval import cli
from lm.eval import harness
from lm.eval import perplexity

SOURCE_METRIC = 'bits_per_byte'  # The one tokenizer-independent row per source; lower is better.
OUTPUTS = ('compare.md', 'compare.json', 'compare.png')


def compare(checkpoints: dict[str, str], *, tasks=(), include_path: str | None = None,
            sources: str | None = None, text_field: str = 'text', max_docs: int = 0,
            max_chars: int = 0, context_len: int = 1, batch_size='auto', dtype: str = 'auto',
            max_length: int | None = None, **kwargs) -> dict[str, dict]:
  """{label: row} for `checkpoints` ({name: directory}) on `tasks` and on `sources` (a
  config.data.source or config.data.mixture spelling); kwargs go to harness.evaluate (num_fewshot,
  limit, ...).

  Labels are 'TASK/METRIC' ('TASK/METRIC (FILTER)' for a filter other than none) and
  'SOURCE/bits_per_byte'. A row holds kind ('task' or 'source'), its task or source and metric,
  higher_is_better (None when the harness does not say), values and stderr ({name: float or
  None}), best (the names of the best value; empty when all are equal or there is no direction)
  and, for sources, details ({name: all of perplexity.perplexity's numbers}).

  Everything that can be checked without a model is checked before the first checkpoint loads.
  """
  tasks = [t for t in (tasks.split(',') if isinstance(tasks, str) else tasks) if t]
  if len(checkpoints) < 2:
    raise ValueError(f'compare needs two or more checkpoints, got {len(checkpoints)}: '
                     f'{list(checkpoints.values())}')
  if not tasks and not sources:
    raise ValueError('nothing to compare on: give tasks (--tasks) or sources (--sources), or both')
  if context_len < 1:
    raise ValueError(f'context_len={context_len} must be >= 1 (tokens of overlap between windows)')
  manager = harness.make_task_manager(include_path) if tasks else None
  for checkpoint in checkpoints.values():
    _check_checkpoint(checkpoint)
  if tasks:
    harness.check_tasks(tasks, manager)
  documents = _read_sources(sources, text_field, max_docs, max_chars) if sources else {}

  per_checkpoint = {}
  for name, checkpoint in checkpoints.items():
    model = harness.LMEvalModel(checkpoint=checkpoint, batch_size=batch_size, dtype=dtype,
                                max_length=max_length)
    results = harness.evaluate(None, tasks, model=model, task_manager=manager,
                               **kwargs) if tasks else None
    scores = {source: perplexity.perplexity(model.scorer, docs, context_len=context_len,
                                            description=f'ppl {source} ({name})')
              for source, docs in documents.items()}
    task_rows, source_rows = _task_rows(results) if results else {}, _source_rows(scores)
    if task_rows.keys() & source_rows.keys():
      raise ValueError(f'rows {sorted(task_rows.keys() & source_rows.keys())} come from both a '
                       'task and a source; rename the source in sources')
    per_checkpoint[name] = task_rows | source_rows
    del model, results  # The next checkpoint may need all of the accelerator's memory.
    gc.collect()
  return _merge(per_checkpoint)


def _check_checkpoint(checkpoint: str) -> None:
  """FileNotFoundError unless the checkpoint's config.json and tokenizer exist (no weights read)."""
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f'checkpoint {checkpoint} does not exist (an lm checkpoint directory)')
  config = config_lib.checkpoint_config(checkpoint)
  generate_lib.find_tokenizer(checkpoint, config)


def _read_sources(sources: str, text_field: str, max_docs: int,
                  max_chars: int) -> dict[str, list[str]]:
  """The documents of each source, read once for all checkpoints; empty sources are errors."""
  if max_docs < 0 or max_chars < 0:
    raise ValueError('max_docs and max_chars must be >= 0 (0: no limit)')
  documents = perplexity.source_documents(sources, text_field=text_field, max_docs=max_docs,
                                          max_chars=max_chars)
  empty = [name for name, docs in documents.items() if not any(d.strip() for d in docs)]
  if empty:
    raise ValueError(f'sources {empty} of {sources!r} hold no text to score')
  return documents


def _task_rows(results: dict) -> dict[str, dict]:
  """The harness's numeric metrics as rows of one checkpoint (values and stderr are floats)."""
  rows = {}
  for task, metrics in results['results'].items():
    directions = results.get('higher_is_better', {}).get(task, {})
    for key, value in metrics.items():
      metric, comma, filter_name = key.partition(',')
      if not comma or metric.endswith('_stderr') or not _is_number(value):
        continue
      stderr = metrics.get(f'{metric}_stderr,{filter_name}')
      label = f'{task}/{metric}' + ('' if filter_name == 'none' else f' ({filter_name})')
      rows[label] = dict(kind='task', task=task, metric=metric, filter=filter_name,
                         higher_is_better=directions.get(metric), value=float(value),
                         stderr=float(stderr) if _is_number(stderr) else None)
  return rows


def _source_rows(scores: dict[str, dict]) -> dict[str, dict]:
  rows = {}
  for source, numbers in scores.items():
    rows[f'{source}/{SOURCE_METRIC}'] = dict(
        kind='source', source=source, metric=SOURCE_METRIC, higher_is_better=False,
        value=float(numbers[SOURCE_METRIC]), stderr=None, details=numbers)
  return rows


def _merge(per_checkpoint: dict[str, dict[str, dict]]) -> dict[str, dict]:
  """One row per label with a value per checkpoint (None where a checkpoint lacks the metric)."""
  names = list(per_checkpoint)
  labels = list(dict.fromkeys(label for rows in per_checkpoint.values() for label in rows))
  merged = {}
  for label in labels:
    first = next(rows[label] for rows in per_checkpoint.values() if label in rows)
    row = {k: v for k, v in first.items() if k not in ('value', 'stderr', 'details')}
    own = {name: per_checkpoint[name].get(label, {}) for name in names}
    row['values'] = {name: own[name].get('value') for name in names}
    row['stderr'] = {name: own[name].get('stderr') for name in names}
    if first['kind'] == 'source':
      row['details'] = {name: own[name].get('details') for name in names}
    row['best'] = best_names(row['values'], row['higher_is_better'])
    merged[label] = row
  return merged


def best_names(values: dict[str, float | None], higher_is_better: bool | None) -> list[str]:
  """The names holding the best value; none when the direction is unknown or all values tie."""
  present = {n: v for n, v in values.items() if v is not None and not math.isnan(v)}
  if higher_is_better is None or len(set(present.values())) < 2:
    return []
  best = (max if higher_is_better else min)(present.values())
  return [n for n, v in present.items() if v == best]


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Outputs.

def _format_number(value: float | None) -> str:
  if value is None or math.isnan(value):
    return 'n/a'
  if abs(value) >= 1e6:
    return f'{value:.4g}'
  return f'{value:.4f}' if abs(value) < 100 else f'{value:.1f}'


def _direction(higher_is_better: bool | None) -> str:
  return {True: '↑', False: '↓'}.get(higher_is_better, '')


def format_table(rows: dict[str, dict]) -> str:
  """Markdown: a row per metric, a column per checkpoint, ± the stderr, the best in bold."""
  if not rows:
    return ''
  names = list(next(iter(rows.values()))['values'])
  lines = ['| metric | | ' + ' | '.join(names) + ' |', '| --- | :-: |' + ' ---: |' * len(names)]
  for label, row in rows.items():
    cells = []
    for name in names:
      cell = _format_number(row['values'][name])
      if row['stderr'][name] is not None:
        cell += f' ± {_format_number(row["stderr"][name])}'
      cells.append(f'**{cell}**' if name in row['best'] else cell)
    lines.append(f'| {label} | {_direction(row["higher_is_better"])} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot(rows: dict[str, dict], path: str) -> str:
  """A PNG with a panel per metric (each on its own scale: accuracy, BLEU and bits per byte do not
  share an axis), a bar per checkpoint, stderr error bars, the best bar edged in black."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  if not rows:
    raise ValueError('no rows to plot')
  names = list(next(iter(rows.values()))['values'])
  columns = min(4, len(rows))
  lines = math.ceil(len(rows) / columns)
  width = max(3.0, 0.7 * len(names) + 1.2)
  fig = Figure(figsize=(width * columns, 3.0 * lines))
  FigureCanvasAgg(fig)
  colors = [f'C{i % 10}' for i in range(len(names))]
  for i, (label, row) in enumerate(rows.items()):
    ax = fig.add_subplot(lines, columns, i + 1)
    values = [row['values'][n] if row['values'][n] is not None else math.nan for n in names]
    errors = [row['stderr'][n] or 0.0 for n in names]
    bars = ax.bar(range(len(names)), values, color=colors,
                  yerr=errors if any(errors) else None, capsize=4,
                  edgecolor=['black' if n in row['best'] else 'none' for n in names],
                  linewidth=2)
    ax.bar_label(bars, labels=[_format_number(v) for v in values], fontsize=7,
                 padding=2 if not any(errors) else 6)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0, fontsize=8)
    direction = {True: 'higher is better', False: 'lower is better'}.get(
        row['higher_is_better'], '')
    ax.set_title(f'{label} {_direction(row["higher_is_better"])}', fontsize=9)
    if direction:
      ax.set_ylabel(direction, fontsize=7)
    ax.margins(y=0.15)
    if all(v >= 0 for v in values if not math.isnan(v)):
      ax.set_ylim(bottom=0)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def write_outputs(rows: dict[str, dict], output_path: str, **settings) -> list[str]:
  """compare.md, compare.json ({'settings': settings, 'rows': rows}) and compare.png."""
  os.makedirs(output_path, exist_ok=True)
  table_path, json_path, png_path = (os.path.join(output_path, name) for name in OUTPUTS)
  table = format_table(rows)
  report = json.dumps(dict(settings=settings, rows=rows), indent=1, ensure_ascii=False) + '\n'
  files_lib.write_atomically(table_path, lambda f: f.write(table), encoding='utf-8')
  files_lib.write_atomically(json_path, lambda f: f.write(report), encoding='utf-8')
  plot(rows, png_path)
  return [table_path, json_path, png_path]


# ---------------------------------------------------------------------------------------------
# Command line.

def _limit(text: str) -> int | float:
  """lm-eval's --limit: a count of documents, or a fraction of each task below 1."""
  value = float(text)
  return int(value) if value >= 1 else value


def _parser() -> argparse.ArgumentParser:
  parser = cli.Parser(prog='python -m lm.eval compare', description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoints', required=True,
                      help='Comma-separated lm checkpoint directories, two or more.')
  parser.add_argument('--names', default='',
                      help='Comma-separated column names, one per checkpoint (default: from the '
                      'paths).')
  parser.add_argument('--tasks', default='', help='Comma-separated lm-eval task names.')
  parser.add_argument('--include_path', default=None, help='A folder of extra task YAMLs.')
  parser.add_argument('--num_fewshot', type=int, default=None, help='Few-shot examples per task.')
  parser.add_argument('--limit', type=_limit, default=None,
                      help='Documents per task (a fraction below 1), for quick looks.')
  parser.add_argument('--sources', default='',
                      help="A config.data.source or mixture ('en=text:GLOB@1; hi=jsonl:GLOB@1'; "
                      'weights ignored): a bits-per-byte row per source.')
  cli.add_text_flags(parser)
  cli.add_model_flags(parser)
  parser.add_argument('--output_path', required=True,
                      help='Directory for compare.md, compare.json and compare.png.')
  return parser


def default_names(checkpoints: list[str]) -> list[str]:
  """The shortest path tails that tell the checkpoints apart ('run1/checkpoints/1000'), numbered
  when the same path is given twice."""
  parts = [os.path.normpath(os.path.abspath(c)).split(os.sep) for c in checkpoints]
  for depth in range(1, max(map(len, parts)) + 1):
    names = ['/'.join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  tails = [p[-1] for p in parts]
  return [f'{tail}#{i + 1}' for i, tail in enumerate(tails)]


def main(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  paths = [c.strip() for c in args.checkpoints.split(',') if c.strip()]
  tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  names = [n.strip() for n in args.names.split(',')] if args.names else default_names(paths)
  if len(paths) < 2:
    sys.exit(f'error: --checkpoints needs two or more comma-separated directories, got {paths}')
  if len(names) != len(paths):
    sys.exit(f'error: --names gives {len(names)} names ({names}) for {len(paths)} checkpoints')
  if len(set(names)) != len(names):
    sys.exit(f'error: --names repeats a name: {names}')
  evaluate_kwargs = {k: v for k, v in (('num_fewshot', args.num_fewshot), ('limit', args.limit))
                     if v is not None}
  try:
    rows = compare(dict(zip(names, paths)), tasks=tasks, include_path=args.include_path,
                   sources=args.sources or None, text_field=args.text_field,
                   max_docs=args.max_docs, max_chars=args.max_chars, context_len=args.context_len,
                   batch_size=args.batch_size, dtype=args.dtype, max_length=args.max_length,
                   **evaluate_kwargs)
  except (ValueError, FileNotFoundError, checkpoint_lib.CheckpointError) as e:
    sys.exit(f'error: {e}')
  print(format_table(rows), end='')
  settings = dict(checkpoints={n: os.path.abspath(p) for n, p in zip(names, paths)},
                  tasks=tasks, include_path=args.include_path, sources=args.sources,
                  max_docs=args.max_docs, max_chars=args.max_chars,
                  context_len=args.context_len, dtype=args.dtype, **evaluate_kwargs)
  for path in write_outputs(rows, args.output_path, **settings):
    print(f'wrote {path}')
