"""Train/test contamination: word n-gram overlap of lm-eval tasks' documents with training data.

  python -m lm.eval contamination --tasks T1,T2 [--include_path DIR] --source SOURCE \\
      [--text_field text] [--n 13] [--limit N] [--max_docs N] [--output_path DIR]

A task document is flagged when one of its n-grams (13 by default, as in lm-eval's own
decontamination and GPT-3's) also occurs in a training document. A document's text is what a
leak would hold: its prompt and its gold answer (for multiple choice, the right choice's text),
zero-shot. SOURCE is any data.source form (lm/data.py: text:GLOB, jsonl:GLOB, tfds:NAME, stdlib).

The task documents' n-grams are the index and the training data streams past it, so memory grows
with the tasks, not with the training set. normalize_words and ngrams are pure and public, for the
data-preparation stage that removes contaminated training documents with the same definition.
"""

import argparse
from collections.abc import Iterable, Sequence
import functools
import hashlib
import itertools
import json
import logging
import os
import sys
import unicodedata

import tqdm

from lm.eval import cli

DEFAULT_N = 13
_EXAMPLES = 5  # Contaminated documents per task shown with an overlapping n-gram.


# ---------------------------------------------------------------------------------------------
# Words and n-grams.


@functools.cache
def _separators() -> dict[int, str | None]:
  """str.translate table: punctuation and symbols (categories P*, S*) become spaces; format
  characters (Cf: zero-width joiners, soft hyphens, byte order marks) vanish, being invisible."""
  table = {}
  for code in range(sys.maxunicode + 1):
    category = unicodedata.category(chr(code))
    if category[0] in 'PS':
      table[code] = ' '
    elif category == 'Cf':
      table[code] = None
  return table


def normalize_words(text: str) -> list[str]:
  """The words of `text` as contamination compares them: NFKC, case-folded, punctuation and
  symbols turned into spaces, split on whitespace.

  Follows lm-eval's Janitor (lm_eval/decontamination/janitor.py: lowercase, drop punctuation,
  split on whitespace) but for any script: Janitor folds ASCII case and drops ASCII punctuation
  only. Punctuation becomes a space rather than nothing, so 'Answer:3' and 'well-known' split in
  two. Words are not regex \\w runs: Devanagari vowel signs and viramas (Mn, Mc) are not \\w, and
  would cut a word at every matra; here they stay inside it. NFKC changes no Indic letter that NFC
  would not (both decompose the nukta letters U+0958-U+095F, so precomposed and decomposed
  spellings agree), and also folds ligatures and full-width forms (U+FB01 'fi', '２').
  """
  text = unicodedata.normalize('NFKC', text).casefold()
  return text.translate(_separators()).split()


def _gram_hash(gram: Sequence[str]) -> int:
  """64 bits, stable across runs and machines (unlike hash()), so sets of them can be saved.
  Words hold no '\\x1f': str.split() treats it as whitespace."""
  return int.from_bytes(hashlib.blake2b('\x1f'.join(gram).encode(), digest_size=8).digest(),
                        'little')


def _gram_hashes(words: Sequence[str], n: int) -> list[int]:
  """The hashes of ngrams(words, n), in the order of the words."""
  if len(words) < n:
    return [_gram_hash(words)] if words else []
  return [_gram_hash(words[i:i + n]) for i in range(len(words) - n + 1)]


def ngrams(words: Sequence[str], n: int) -> set[int]:
  """The hashes of the word n-grams of `words` (from normalize_words).

  Fewer than n words are one gram, the whole sequence, which matches only a text that normalizes
  to exactly the same words: a short test document is caught when a training document is that
  document, not when it sits inside a longer one. (lm-eval's Janitor gives short texts no n-grams,
  so they are never caught.) A short gram cannot equal an n-gram: it joins fewer words.
  """
  if n < 1:
    raise ValueError(f'n={n}: n-grams need n >= 1')
  return set(_gram_hashes(words, n))


# ---------------------------------------------------------------------------------------------
# Overlap.


def contamination(task_docs: dict[str, list[str]], training_texts: Iterable[str],
                  n: int = DEFAULT_N) -> dict:
  """Which task documents share an n-gram with a training text.

  task_docs is {task: [document text, ...]} (task_documents gives it); training_texts is read
  once, streamed. Returns {n, training_documents, tasks: {task: report}}, each report holding
  documents, contaminated_documents, contaminated_fraction, shared_ngrams (the task's documents'
  n-grams found in training, summed over documents), short_documents (fewer than n words, so
  checked for an exact match only), contaminated (all flagged document indices) and examples
  (the first few: doc, shared_ngrams, ngrams, ngram (the first shared one, as normalized text),
  training_document (the index of the first training text that holds a shared n-gram)).
  Raises ValueError when n < 1 or training_texts is empty.
  """
  if n < 1:
    raise ValueError(f'n={n}: n-grams need n >= 1')
  words = {task: [normalize_words(doc) for doc in docs] for task, docs in task_docs.items()}
  wanted = set()
  for doc_words in itertools.chain.from_iterable(words.values()):
    wanted.update(_gram_hashes(doc_words, n))
  first_seen = {}  # n-gram hash -> index of the first training text that holds it.
  training_documents = 0
  for index, text in enumerate(tqdm.tqdm(training_texts, desc='training documents', unit='doc',
                                         disable=None)):
    training_documents += 1
    for gram in ngrams(normalize_words(text), n) & wanted:
      first_seen.setdefault(gram, index)
  if not training_documents:
    raise ValueError('training_texts is empty: no training documents to compare with')
  return dict(n=n, training_documents=training_documents,
              tasks={task: _task_report(doc_words, n, first_seen)
                     for task, doc_words in words.items()})


def _task_report(docs_words: list[list[str]], n: int, first_seen: dict[int, int]) -> dict:
  """One task's entry of contamination()'s result."""
  contaminated, examples, shared_total = [], [], 0
  for index, doc_words in enumerate(docs_words):
    hashes = _gram_hashes(doc_words, n)
    shared = {h for h in hashes if h in first_seen}
    if not shared:
      continue
    contaminated.append(index)
    shared_total += len(shared)
    if len(examples) < _EXAMPLES:
      position = next(i for i, h in enumerate(hashes) if h in shared)
      examples.append(dict(doc=index, shared_ngrams=len(shared), ngrams=len(set(hashes)),
                           ngram=' '.join(doc_words[position:position + n]),
                           training_document=min(first_seen[h] for h in shared)))
  documents = len(docs_words)
  return dict(documents=documents, contaminated_documents=len(contaminated),
              contaminated_fraction=len(contaminated) / documents if documents else 0.0,
              shared_ngrams=shared_total,
              short_documents=sum(0 < len(w) < n for w in docs_words),
              contaminated=contaminated, examples=examples)


# ---------------------------------------------------------------------------------------------
# Task documents.


def task_documents(tasks: str | Sequence[str], include_path: str | None = None,
                   limit: int | None = None) -> dict[str, list[str]]:
  """{leaf task: the texts of its evaluation documents} (test split, else validation, as lm-eval
  evaluates), in lm-eval's document order, the first `limit` of each. Groups and tags expand to
  their tasks. Raises ValueError naming unknown tasks, FileNotFoundError for a missing
  include_path."""
  tasks = [tasks] if isinstance(tasks, str) else list(tasks)
  if include_path is not None and not os.path.exists(include_path):
    raise FileNotFoundError(f'include_path {include_path} does not exist (a folder of task YAMLs)')
  documents = {}
  for name, task in _load_tasks(tasks, include_path).items():
    docs = task.eval_docs
    count = len(docs) if limit is None else min(limit, len(docs))
    documents[name] = [document_text(task, docs[i]) for i in range(count)]
  return documents


def _load_tasks(tasks: list[str], include_path: str | None) -> dict:
  """{leaf task name: lm-eval Task}."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top  # Slow import.
  if include_path is not None:
    # Indexing lm-eval's own ~10k task files takes seconds. Tasks and groups all under
    # include_path skip it; a group there that names built-in tasks fails to load here, and is
    # loaded below. Tags are left out: one may span both.
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(t in local.all_subtasks or t in local.all_groups for t in tasks):
      try:
        return local.load(tasks)['tasks']
      except Exception:  # pylint: disable=broad-except  # Whatever it was, the full index decides.
        pass
  manager = TaskManager(include_path=include_path)
  unknown = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
  if unknown:
    raise ValueError(f'unknown task(s) {unknown}: not among the harness\'s tasks nor those under '
                     '--include_path (python -m lm.eval ls tasks lists them)')
  return manager.load(tasks)['tasks']


def document_text(task, doc) -> str:
  """The prompt of `doc` followed by its gold answer, joined as lm-eval joins them (the task's
  target_delimiter), without few-shot examples or a description."""
  text, target = task.doc_to_text(doc), task.doc_to_target(doc)
  if task.OUTPUT_TYPE == 'multiple_choice':
    choices = task.doc_to_choice(doc)
    if getattr(task, 'multiple_input', 0):  # doc_to_text picks the right context among choices.
      text = choices[text]
    else:
      target = _first(target)
      target = choices[target] if isinstance(target, int) else target
  target = _first(target)
  return f'{text}{task.config.target_delimiter}{target}' if target != '' else str(text)


def _first(target):
  """A task with several gold answers (a list) is represented by its first."""
  return target[0] if isinstance(target, list) and target else target


# ---------------------------------------------------------------------------------------------
# Reports.


def markdown_table(result: dict) -> str:
  """One row per task, then the overlapping n-gram of the first contaminated documents."""
  n = result['n']
  lines = [f'{n}-gram overlap with {result.get("source", "the training data")} '
           f'({result["training_documents"]} training documents)', '',
           f'| task | documents | contaminated | fraction | shared {n}-grams | '
           f'short (< {n} words) | first contaminated |',
           '| --- | ---: | ---: | ---: | ---: | ---: | --- |']
  for task, report in result['tasks'].items():
    first = ', '.join(str(e['doc']) for e in report['examples'])
    lines.append(f'| {task} | {report["documents"]} | {report["contaminated_documents"]} | '
                 f'{report["contaminated_fraction"]:.1%} | {report["shared_ngrams"]} | '
                 f'{report["short_documents"]} | {first or "-"} |')
  examples = [(task, e) for task, report in result['tasks'].items() for e in report['examples']]
  if examples:
    lines += ['', 'Examples (doc: shared/all n-grams, training document, first shared n-gram):']
    lines += [f'- {task} {e["doc"]}: {e["shared_ngrams"]}/{e["ngrams"]}, training document '
              f'{e["training_document"]}: "{e["ngram"]}"' for task, e in examples]
  return '\n'.join(lines) + '\n'


def write_outputs(result: dict, output_path: str) -> list[str]:
  """contamination.json and contamination.md in output_path, each written atomically."""
  from lm import files  # pylint: disable=g-import-not-at-top
  paths = [os.path.join(output_path, name) for name in ('contamination.json', 'contamination.md')]
  files.write_atomically(paths[0], lambda f: json.dump(result, f, indent=1, ensure_ascii=False),
                         encoding='utf-8')
  files.write_atomically(paths[1], lambda f: f.write(markdown_table(result)), encoding='utf-8')
  return paths


# ---------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = cli.Parser(prog='python -m lm.eval contamination', description=__doc__.split('\n\n')[0])
  parser.add_argument('--tasks', required=True, help='comma-separated tasks, groups or tags')
  parser.add_argument('--include_path', default=None, help='a folder of extra task YAMLs')
  parser.add_argument('--source', required=True,
                      help='training data: text:GLOB, jsonl:GLOB, tfds:NAME[:SPLIT] or stdlib')
  parser.add_argument('--text_field', default='text', help='field of jsonl and tfds records')
  parser.add_argument('--n', type=int, default=DEFAULT_N, help='words per n-gram')
  parser.add_argument('--limit', type=int, default=None, help='first N documents of each task')
  parser.add_argument('--max_docs', type=int, default=None, help='first N training documents')
  parser.add_argument('--output_path', default='',
                      help='folder for contamination.json and contamination.md')
  return parser


def main(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  if not tasks:
    sys.exit(f'error: --tasks {args.tasks!r} names no task; expected e.g. --tasks hellaswag,piqa')
  for flag, value in (('--n', args.n), ('--limit', args.limit), ('--max_docs', args.max_docs)):
    if value is not None and value < 1:
      sys.exit(f'error: {flag} {value}: expected a positive number')
  if args.include_path is not None and not os.path.exists(args.include_path):
    sys.exit(f'error: --include_path {args.include_path} does not exist (a folder of task YAML '
             'files)')
  from lm import data  # pylint: disable=g-import-not-at-top
  # Loading a task warns about its metrics' defaults, which an overlap count never uses.
  logging.getLogger('lm_eval.api.task').setLevel(logging.ERROR)
  try:
    # Checks the source's form and that its files exist before the tasks load.
    training = data.iter_documents(args.source, args.text_field, where=f'--source={args.source!r}')
    docs = task_documents(tasks, args.include_path, args.limit)
    result = contamination(docs, itertools.islice(training, args.max_docs), args.n)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  result = dict(source=args.source, text_field=args.text_field, max_docs=args.max_docs,
                limit=args.limit, include_path=args.include_path, **result)
  print(markdown_table(result), end='')
  if args.output_path:
    for path in write_outputs(result, args.output_path):
      print(f'wrote {path}')
