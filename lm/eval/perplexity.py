"""Perplexity and bits per byte of a checkpoint on any data source.

  python -m lm.eval ppl --checkpoint DIR --source SOURCE [--text_field text] [--max_docs N]
      [--max_chars N] [--context_len 1] [--batch_size auto] [--dtype auto] [--output_path DIR]

SOURCE is any config.data.source (`text:GLOB`, `jsonl:GLOB`, `tfds:NAME`, `stdlib`) or a
config.data.mixture ('hi=text:...@0.5; en=text:...@0.5': each source reported on its own, weights
ignored). Each document is scored whole, BOS first, in the harness's rolling windows of
max_length (lm/eval/scoring.py), so the numbers match lm-eval's loglikelihood_rolling tasks.

Bits per byte divides the total negative log-likelihood by the documents' UTF-8 bytes, not by
tokens: it does not depend on the tokenizer, so a base model and its extended-vocabulary
descendant compare fairly (a tokenizer with 3x fewer Hindi tokens per word has a 3x higher
per-token loss for the same bits per byte). Word perplexity (per word, counted as lm-eval counts them) is
tokenizer-independent too; token perplexity is not, and is reported for reference.
"""

import argparse
from collections.abc import Iterable
import json
import math
import os
import re
import sys

from lm import data as data_lib
from lm import files as files_lib
from lm.eval import cli

METRICS = ('bits_per_byte', 'word_perplexity', 'token_perplexity')


def perplexity(scorer, documents: Iterable[str], *, context_len: int = 1,
               description: str = 'ppl') -> dict:
  """Totals and metrics of `documents` under `scorer` (a lm.eval.scoring.Scorer)."""
  texts = [d for d in documents if d.strip()]
  if not texts:
    raise ValueError('no documents to score (the source is empty, or holds only whitespace)')
  tokens = scorer.tokenizer.encode_batch(texts)
  logprobs = scorer.rolling_loglikelihood(tokens, context_len=context_len,
                                          description=description)
  nll = -sum(logprobs)
  counts = dict(documents=len(texts), tokens=sum(map(len, tokens)),
                bytes=sum(len(t.encode('utf-8')) for t in texts),
                words=sum(len(re.split(r'\s+', t)) for t in texts))  # As lm-eval counts.
  return dict(
      **counts, nll=nll,
      bits_per_byte=nll / math.log(2) / counts['bytes'],
      word_perplexity=math.exp(min(nll / max(counts['words'], 1), 700.0)),
      token_perplexity=math.exp(min(nll / counts['tokens'], 700.0)),
      tokens_per_word=counts['tokens'] / max(counts['words'], 1))


def source_documents(source: str, *, text_field: str = 'text', max_docs: int = 0,
                     max_chars: int = 0) -> dict[str, list[str]]:
  """{name: documents} of a data source (name 'all') or of each entry of a mixture."""
  if '=' in source.split(':')[0] or ';' in source:
    entries = [(m.name, m.source, m.where) for m in data_lib.parse_mixture(source)]
  else:
    entries = [('all', source, f'--source={source!r}')]
  documents = {}
  for name, entry, where in entries:
    docs = []
    for doc in data_lib.iter_documents(entry, text_field, max_chars=max_chars, where=where):
      docs.append(doc)
      if max_docs and len(docs) >= max_docs:
        break
    documents[name] = docs
  return documents


def evaluate_source(scorer, source: str, *, text_field: str = 'text', max_docs: int = 0,
                    max_chars: int = 0, context_len: int = 1) -> dict[str, dict]:
  """{name: perplexity(...)} for a source or each source of a mixture (see the module doc)."""
  return {name: perplexity(scorer, docs, context_len=context_len, description=f'ppl {name}')
          for name, docs in source_documents(source, text_field=text_field, max_docs=max_docs,
                                             max_chars=max_chars).items()}


def format_table(results: dict[str, dict]) -> str:
  """A markdown table: one row per source."""
  lines = ['| source | documents | tokens | bytes | bits/byte | word ppl | token ppl | '
           'tokens/word |', '|' + '---|' * 8]
  for name, r in results.items():
    lines.append(f'| {name} | {r["documents"]} | {r["tokens"]} | {r["bytes"]} | '
                 f'{r["bits_per_byte"]:.4f} | {r["word_perplexity"]:.2f} | '
                 f'{r["token_perplexity"]:.2f} | {r["tokens_per_word"]:.2f} |')
  return '\n'.join(lines) + '\n'


def _parser() -> argparse.ArgumentParser:
  parser = cli.Parser(
      prog='python -m lm.eval ppl', description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='Any lm checkpoint directory.')
  parser.add_argument('--source', required=True,
                      help='A config.data.source or config.data.mixture spelling.')
  cli.add_text_flags(parser)
  cli.add_model_flags(parser)
  parser.add_argument('--output_path', default=None,
                      help='Directory for perplexity.json and perplexity.md.')
  return parser


def main(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  from lm import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from lm.eval import scoring  # pylint: disable=g-import-not-at-top
  try:
    if args.max_docs < 0 or args.max_chars < 0:
      raise ValueError('--max_docs and --max_chars must be >= 0 (0: no limit)')
    documents = source_documents(args.source, text_field=args.text_field,
                                 max_docs=args.max_docs, max_chars=args.max_chars)
    scorer = scoring.Scorer.load(args.checkpoint, dtype=args.dtype, batch_size=args.batch_size,
                                 max_length=args.max_length)
    if not 1 <= args.context_len <= scorer.max_length:
      raise ValueError(f'--context_len={args.context_len} must be between 1 and max_length='
                       f'{scorer.max_length}')
    results = {name: perplexity(scorer, docs, context_len=args.context_len,
                                description=f'ppl {name}') for name, docs in documents.items()}
  except (ValueError, FileNotFoundError, checkpoint_lib.CheckpointError) as e:
    sys.exit(f'error: {e}')
  table = format_table(results)
  print(table, end='')
  if args.output_path:
    os.makedirs(args.output_path, exist_ok=True)
    report = dict(checkpoint=os.path.abspath(args.checkpoint), source=args.source,
                  max_length=scorer.max_length, context_len=args.context_len, results=results)
    for name, text in (('perplexity.json', json.dumps(report, indent=2) + '\n'),
                       ('perplexity.md', table)):
      files_lib.write_atomically(os.path.join(args.output_path, name),
                                 lambda f, text=text: f.write(text))
    print(f'wrote {args.output_path}/perplexity.json and perplexity.md')
