"""Entry point: `python -m lm.prepare --config configs/prepare/NAME.py --workdir OUT
[--config.a.b=v]`, preparing pretraining text into OUT (see lm/prepare/__init__.py)."""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lm import config as lm_config

_CONFIG = config_flags.DEFINE_config_file('config', None,
                                          'Path to a config file (configs/prepare/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory; run again to resume.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  try:
    # pylint: disable=g-import-not-at-top
    from lm import sources
    from lm import tokenizer
    from lm.prepare import config as config_lib
    from lm.prepare import pipeline
    errors = (config_lib.ConfigError, sources.DataError, tokenizer.TokenizerError,
              FileNotFoundError)
  except ModuleNotFoundError as e:
    sys.exit(f"error: lm.prepare needs the package {e.name}: pip install -e '.[prepare]'")
  try:
    report = pipeline.prepare(_CONFIG.value, _WORKDIR.value)
  except errors as e:
    sys.exit(f'error: {e}')
  shards = report.get('tokens')
  tokens = f'; {shards["tokens"]:,} tokens in {shards["shards"]} shards' if shards else ''
  print(f'kept {report["documents_out"]:,} of {report["documents_in"]:,} documents '
        f'({report["words_out"]:,} of {report["words_in"]:,} words{tokens}); '
        f'see {_WORKDIR.value}/report.json and decisions.jsonl', flush=True)


def run():
  app.run(main, flags_parser=lm_config.parse_flags)
