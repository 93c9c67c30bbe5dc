"""OUT/report.json and OUT/report.png: documents and words in and out of each stage, per
language and per rule, with each stage's speed, and the tokens the tokenize stage wrote.

A rule is a drop reason up to its first ': ' ('near_duplicate: of ID ...' counts as
near_duplicate). Seconds are those spent in the stage's decisions, summed over tasks, so
documents_per_second and mb_per_second are per worker; wall_seconds are each pass's.
"""

import glob
import json
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

_TOTALS = ('documents_in', 'documents_out', 'words_in', 'words_out', 'bytes_in', 'bytes_out')


def _summaries(folder: str, stage: str) -> list[dict]:
  out = []
  for path in sorted(glob.glob(os.path.join(folder, stage, '?????.json'))):
    with open(path, encoding='utf-8') as f:
      out.append(json.load(f))
  return out


def stage_totals(folder: str, stage: str) -> dict[str, int]:
  """documents_in, ... of a stage over all tasks and languages."""
  totals = dict.fromkeys(_TOTALS, 0)
  for summary in _summaries(folder, stage):
    for counts in summary['languages'].values():
      for key in _TOTALS:
        totals[key] += counts[key]
  return totals


def _stage(folder: str, stage: str) -> dict:
  languages, counters, seconds = {}, {}, 0.0
  for summary in _summaries(folder, stage):
    seconds += summary['seconds']
    for key, value in summary['counters'].items():
      counters[key] = counters.get(key, 0) + value
    for language, counts in summary['languages'].items():
      into = languages.setdefault(language, dict.fromkeys(_TOTALS, 0))
      for key in _TOTALS:
        into[key] += counts[key]
      if 'tokens_out' in counts:  # The tokenize stage's.
        into['tokens_out'] = into.get('tokens_out', 0) + counts['tokens_out']
  removed = {}
  for path in sorted(glob.glob(os.path.join(folder, stage, '?????.jsonl'))):
    with open(path, encoding='utf-8') as f:
      for r in map(json.loads, f):
        rule = r['reason'].split(': ', 1)[0]
        into = removed.setdefault(rule, dict(documents=0, words=0, bytes=0, languages={}))
        into['documents'] += 1
        into['words'] += r['words']
        into['bytes'] += r['bytes']
        into['languages'][r['language']] = into['languages'].get(r['language'], 0) + 1
  totals = {key: sum(c[key] for c in languages.values()) for key in _TOTALS}
  if any('tokens_out' in c for c in languages.values()):
    totals['tokens_out'] = sum(c.get('tokens_out', 0) for c in languages.values())
  return dict(
      name=stage, **totals, languages=dict(sorted(languages.items())),
      removed=dict(sorted(removed.items(), key=lambda kv: -kv[1]['documents'])),
      counters=counters, seconds=round(seconds, 4),
      documents_per_second=round(totals['documents_in'] / seconds, 1) if seconds else None,
      mb_per_second=round(totals['bytes_in'] / 1e6 / seconds, 3) if seconds else None)


def build(folder: str, stage_names: list[str], *, inputs, tasks: int, workers: int,
          wall_seconds: dict[str, float], decisions: dict[str, int], dedup_path: str,
          manifest: dict | None = None) -> dict:
  """The report; with the token shards' `manifest`, also tokens_out, tokens per language and
  `tokens` (the tokenizer, the shards and their counts)."""
  stages = [_stage(folder, name) for name in stage_names]
  last = stages[-1]
  report = dict(
      inputs=[dict(name=n, source=s) for n, s in inputs],
      documents_in=stages[0]['documents_in'], documents_out=last['documents_out'],
      words_in=stages[0]['words_in'], words_out=last['words_out'],
      bytes_in=stages[0]['bytes_in'], bytes_out=last['bytes_out'],
      languages={language: dict(documents=c['documents_out'], words=c['words_out'],
                                bytes=c['bytes_out'],
                                **({'tokens': c['tokens_out']} if 'tokens_out' in c else {}))
                 for language, c in last['languages'].items()},
      read=stages[0]['counters'], stages=stages, decisions=decisions, tasks=tasks,
      workers=workers, wall_seconds={k: round(v, 3) for k, v in wall_seconds.items()})
  if manifest is not None:
    report['tokens_out'] = manifest['tokens']
    report['tokens'] = dict(
        {key: manifest[key] for key in ('tokenizer', 'tokenizer_sha256', 'vocab_size', 'dtype',
                                        'documents', 'tokens', 'chars', 'languages')},
        shards=len(manifest['shards']))
  if os.path.exists(dedup_path):
    with open(dedup_path, encoding='utf-8') as f:
      report['dedup'] = json.load(f)
  total = sum(wall_seconds.values())
  report['end_to_end'] = dict(
      seconds=round(total, 3),
      documents_per_second=round(report['documents_in'] / total, 1) if total else None,
      mb_per_second=round(report['bytes_in'] / 1e6 / total, 3) if total else None)
  return report


def plot(report: dict, out: str) -> str:
  """Documents and words remaining after each stage, one line per language and one for all."""
  stages = report['stages']
  names = [s['name'] for s in stages]
  languages = sorted(lang for lang, c in stages[-1]['languages'].items()
                     if c['documents_out'] and lang != 'und')
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, unit in zip(axes, ('documents', 'words')):
    ax.plot(names, [s[f'{unit}_out'] for s in stages], 'o-', color='k', label='all')
    for i, language in enumerate(languages):
      ax.plot(names, [s['languages'].get(language, {}).get(f'{unit}_out', 0) for s in stages],
              's--', color=f'C{i}', label=language)
    ax.set_title(f'{unit} kept after each stage (of {report[f"{unit}_in"]:,} in)')
    ax.set_ylim(bottom=0)
    ax.tick_params(axis='x', rotation=45)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out
