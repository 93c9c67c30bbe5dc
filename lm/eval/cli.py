"""What the `python -m lm.eval` subcommands share on the command line."""

import argparse
import sys


class Parser(argparse.ArgumentParser):
  """argparse with a usage mistake reported as one `error: ...` line (exit status 1), like every
  other input error of lm's commands."""

  def error(self, message):
    sys.exit(f'error: {message}')
