"""What the `python -m lm.eval` subcommands share on the command line."""

import argparse
import sys


class Parser(argparse.ArgumentParser):
  """argparse with a usage mistake reported as one `error: ...` line (exit status 1), like every
  other input error of lm's commands."""

  def error(self, message):
    sys.exit(f'error: {message}')


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  """How a checkpoint is loaded and batched (lm.eval.scoring.Scorer's arguments)."""
  parser.add_argument('--batch_size', default='auto', help="Rows per batch, or 'auto'.")
  parser.add_argument('--max_length', type=int, default=None,
                      help="Tokens the model sees at most (default: the model's max_seq_len).")
  parser.add_argument('--dtype', default='auto', help='auto, float32 or bfloat16.')


def add_text_flags(parser: argparse.ArgumentParser) -> None:
  """How documents are read from a data source and scored (lm.eval.perplexity)."""
  parser.add_argument('--text_field', default='text', help='The text field of jsonl/tfds.')
  parser.add_argument('--max_docs', type=int, default=0, help='Documents per source (0: all).')
  parser.add_argument('--max_chars', type=int, default=0,
                      help='Characters per source (0: all); the last document is cut.')
  parser.add_argument('--context_len', type=int, default=1,
                      help='Tokens of overlap between rolling windows (the harness uses 1).')
