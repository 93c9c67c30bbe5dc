"""Train or sample from a checkpoint's saved config.json: data, where a config.py is code.

  python -m lm.main --config configs/from_checkpoint.py:DIR --workdir NEW [--config.a.b=...]
  python -m lm.main --config DIR/config.json --workdir NEW [--config.a.b=...]   # the same

DIR is a training workdir or an lm.convert / lm.vocab output: the run starts from its weights
(config.init_from=DIR) with its model shape and tokenizer (lm.config.config_from_checkpoint).
"""

from lm import config as config_lib


def get_config(checkpoint: str):
  return config_lib.config_from_checkpoint(checkpoint)
