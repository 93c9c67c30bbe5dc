"""configs/tiny.py as an encoder: the same blocks attending both ways, trained as a masked LM.

15% of the tokens of each row are selected (80% shown as [MASK], 10% as a random token, 10% as
they are) and predicted (config.mlm, lm/mlm.py); the tokenizer trained on first use gets the
[MASK] piece. Trains offline on CPU:

  python -m lm.main --config configs/encoder_tiny.py --workdir /tmp/lm-encoder

(the same as `--config configs/tiny.py --config.model.kind=encoder`).
"""

import os

from lm.config import load_config


def get_config():
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))
  config.unlock()
  config.model.kind = 'encoder'
  config.mlm.update(mask_rate=0.15, mask_token_rate=0.8, random_token_rate=0.1)
  return config
