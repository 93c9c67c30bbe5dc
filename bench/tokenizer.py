"""Extending an English tokenizer with Hindi: tokens per word, exactness, merge time, encode speed.

  python bench/tokenizer.py [--data_dir ../shared/data] [--base_vocab 32000] [--add_vocab 16000]

On the real text in --data_dir (english/tinyshakespeare.txt and hindi/ltrc_classical_hindi.txt;
see its SOURCES.md), as one would extend Llama-2's tokenizer: trains a Llama-2-style BPE base
(lm.tokenizer.train_model) on all the English and a Hindi BPE model on the first 90% of the Hindi
lines, then merges the Hindi pieces into the base (merge_models, with the English as --check).
Measured, with the held-out last 10% of the Hindi lines (other works) as the Hindi text:
- fertility of base and merged on both texts (targets: Hindi tokens per word cut >= 3x; the
  English tokenized bit-identically, line by line, as the data pipeline sees it);
- how many English lines a merge without --check would have changed, and why it may;
- the merge's time;
- encode throughput: MB of UTF-8 per CPU-second on one thread, in --rounds rounds that alternate
  between the models so that load from other processes falls on both alike; the best round (the
  least disturbed) and the median. CPU time, not wall time, as the cores may be shared. Target:
  the merged model within 10% of the base on English, best against best.
Prints a table and writes bench/results/tokenizer.json. The data is never copied into the repo:
the splits and models live in a temporary directory.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import sentencepiece as spm

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from lm import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position

ENGLISH, HINDI = 'english/tinyshakespeare.txt', 'hindi/ltrc_classical_hindi.txt'


def _lines(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return [line for line in f.read().splitlines() if line]


def _write_lines(path: str, lines: list[str]) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def _timed(fn, *args, clock=time.perf_counter, **kwargs):
  start = clock()
  result = fn(*args, **kwargs)
  return result, clock() - start


def _changed_lines(model_a: str, model_b: str, lines: list[str]) -> int:
  a, b = (spm.SentencePieceProcessor(model_file=m) for m in (model_a, model_b))
  return sum(x != y for x, y in zip(a.Encode(lines), b.Encode(lines)))


def _encode_speed(models: dict[str, str], lines: list[str], rounds: int) -> dict[str, dict]:
  """MB per CPU-second of each model encoding all lines on one thread, the models taking turns."""
  processors = {name: spm.SentencePieceProcessor(model_file=path) for name, path in models.items()}
  megabytes = sum(len(line.encode('utf-8')) for line in lines) / 1e6
  seconds = {name: [] for name in models}
  for _ in range(rounds):
    for name, sp in processors.items():
      seconds[name].append(_timed(sp.Encode, lines, num_threads=1, clock=time.process_time)[1])
  return {name: dict(best=megabytes / min(times), median=megabytes / statistics.median(times))
          for name, times in seconds.items()}


def run(data_dir: str, work: str, base_vocab: int, add_vocab: int, rounds: int) -> dict:
  english = os.path.join(data_dir, ENGLISH)
  hindi_lines = _lines(os.path.join(data_dir, HINDI))
  split = len(hindi_lines) * 9 // 10
  hindi_train = _write_lines(os.path.join(work, 'hindi_train.txt'), hindi_lines[:split])
  hindi_test = _write_lines(os.path.join(work, 'hindi_held_out.txt'), hindi_lines[split:])

  base, base_s = _timed(tokenizer_lib.train_model, [english], base_vocab,
                        os.path.join(work, 'base'))
  add, add_s = _timed(tokenizer_lib.train_model, [hindi_train], add_vocab,
                      os.path.join(work, 'hindi'))
  merged = os.path.join(work, 'merged.model')
  summary, merge_s = _timed(tokenizer_lib.merge_models, base['model'], add['model'], merged,
                            check=english)
  unchecked = os.path.join(work, 'unchecked.model')
  _, unchecked_merge_s = _timed(tokenizer_lib.merge_models, base['model'], add['model'], unchecked)

  models = dict(base=base['model'], merged=merged)
  rows = tokenizer_lib.fertility(models, dict(english=english, hindi=hindi_test))
  fert = {(r['model'], r['text']): r for r in rows}
  english_lines = _lines(english)
  speed = {text: _encode_speed(models, lines, rounds)
           for text, lines in (('english', english_lines), ('hindi', _lines(hindi_test)))}
  return dict(
      train_s=dict(base=base_s, hindi=add_s), merge=summary, merge_s=merge_s,
      merge_without_check_s=unchecked_merge_s, fertility=rows,
      hindi_tokens_per_word_cut=(fert['base', 'hindi']['tokens_per_word'] /
                                 fert['merged', 'hindi']['tokens_per_word']),
      english_lines=len(english_lines),
      english_lines_changed=_changed_lines(base['model'], merged, english_lines),
      english_lines_changed_without_check=_changed_lines(base['model'], unchecked, english_lines),
      encode_mb_per_cpu_s=speed,
      merged_vs_base_speed=speed['english']['merged']['best'] / speed['english']['base']['best'])


def _print_report(r: dict) -> None:
  print(tokenizer_lib.format_fertility(r['fertility']))
  m = r['merge']
  print(f'\nmerge: base {m["base_size"]} + added {m["added"]} = {m["final_size"]} pieces; skipped '
        f'{m["skipped_duplicates"]} duplicates, {m["skipped_special"]} special, '
        f'{m["skipped_in_check_text"]} found in the English; {r["merge_s"]:.2f} s with --check, '
        f'{r["merge_without_check_s"]:.2f} s without')
  print(f'Hindi tokens per word cut {r["hindi_tokens_per_word_cut"]:.2f}x (target >= 3x)')
  print(f'English lines tokenized differently: {r["english_lines_changed"]} of '
        f'{r["english_lines"]} (target 0); without --check: '
        f'{r["english_lines_changed_without_check"]}')
  for text, speed in r['encode_mb_per_cpu_s'].items():
    base, merged = speed['base'], speed['merged']
    print(f'encode {text}, MB per CPU-second (best / median of rounds): base {base["best"]:.2f} / '
          f'{base["median"]:.2f}, merged {merged["best"]:.2f} / {merged["median"]:.2f} '
          f'({merged["best"] / base["best"] - 1:+.1%} best)')
  print(f'merged vs base speed on English: {r["merged_vs_base_speed"]:.3f} (target 0.9 or more)')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default=os.path.join(_ROOT, '..', 'shared', 'data'))
  parser.add_argument('--base_vocab', type=int, default=32000, help="Llama-2's size")
  parser.add_argument('--add_vocab', type=int, default=16000)
  parser.add_argument('--rounds', type=int, default=9, help='encode timings per model and text')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results', 'tokenizer.json'))
  args = parser.parse_args()
  missing = [p for p in (ENGLISH, HINDI) if not os.path.isfile(os.path.join(args.data_dir, p))]
  if missing:
    print(f'skipping: {", ".join(missing)} not found under --data_dir={args.data_dir}')
    return

  with tempfile.TemporaryDirectory() as work:
    report = run(args.data_dir, work, args.base_vocab, args.add_vocab, args.rounds)
  report.update(
      date=datetime.datetime.now().isoformat(timespec='seconds'),
      machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                   load_avg_at_end=os.getloadavg()),
      sentencepiece=spm.__version__, data_dir=os.path.abspath(args.data_dir),
      base_vocab=args.base_vocab, add_vocab=args.add_vocab)
  _print_report(report)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
