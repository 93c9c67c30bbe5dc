"""Hindi and English web text: every field of lm/prepare/config.py at its default.

  python -m lm.prepare --config configs/prepare/default.py --workdir OUT \
      --config.source='jsonl:/data/web/*.jsonl' [--config.workers=8]
"""

from lm.prepare.config import base_config


def get_config():
  return base_config()
