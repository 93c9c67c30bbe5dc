"""Entry point: `python -m lm.main --config configs/NAME.py --workdir DIR [--config.a.b=v]`."""

import json
import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lm import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and caches.')
flags.mark_flags_as_required(['config', 'workdir'])


class _OnlyWarningsFromLibraries(std_logging.Filter):
  """Orbax logs every save step at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OnlyWarningsFromLibraries())
  try:
    if config.mode != 'sample':  # lm.train.setup validates the config (and the mode's name).
      from lm import train  # pylint: disable=g-import-not-at-top
      _, metrics = train.train(config, _WORKDIR.value)
      logging.info('done: %s', metrics)
      return
    config_lib.validate(config)
    from lm import generate  # pylint: disable=g-import-not-at-top
    results = generate.sample_from_config(config, _WORKDIR.value)
  except config_lib.input_errors() as e:
    sys.exit(f'error: {e}')
  for prompt, completions in results:
    for i, completion in enumerate(completions):
      score = '' if completion.score is None else f', score {completion.score:.3f}'
      print(f'=== prompt {prompt!r}, completion {i} ({completion.finish_reason}{score})')
      print(prompt + completion.text, flush=True)
  if config.sample.output:
    from lm import files  # pylint: disable=g-import-not-at-top
    records = [{'prompt': prompt, 'response': completion.text}
               for prompt, completions in results for completion in completions]
    files.write_atomically(config.sample.output, lambda f: f.writelines(
        json.dumps(record, ensure_ascii=False) + '\n' for record in records))
    logging.info('wrote %d records to %s', len(records), config.sample.output)


def run():
  app.run(main, flags_parser=config_lib.parse_flags)


if __name__ == '__main__':
  run()
