"""Hindi and English web text: every field of lm/prepare/config.py at its default.

  python -m lm.prepare --config configs/prepare/default.py --workdir OUT \
      --config.source='jsonl:/data/web/*.jsonl' [--config.workers=8]

The last stage tokenizes the kept documents into OUT/tokens/ for training with
--config.data.source=prepared:OUT, with a tokenizer of config.tokenize.vocab_size pieces trained
on them, or --config.tokenize.tokenizer=MODEL; --config.tokenize.enabled=False skips it.
"""

from lm.prepare.config import base_config


def get_config():
  return base_config()
