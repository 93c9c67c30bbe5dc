"""configs/tiny.py as an encoder-decoder (T5's family), trained on span corruption.

An encoder of four bidirectional blocks and a decoder of four causal blocks with cross-attention,
sharing the embedding table. Each row of 128 tokens loses 15% of them in spans of mean length 3
(6 spans): the encoder reads the other 109 with a sentinel piece <extra_id_K> in place of each
span, and EOS (116 tokens); the decoder writes <extra_id_0> span_0 <extra_id_1> span_1 ... EOS
(26 tokens). The tokenizer trained on first use gets the sentinel pieces. Trains offline on CPU:

  python -m lm.main --config configs/t5_tiny.py --workdir /tmp/lm-t5
  python -m lm.main --config configs/t5_tiny.py --workdir /tmp/lm-t5 --config.mode=sample \\
      --config.sample.prompt='def add(a, b):<extra_id_0> a + b' --config.sample.temperature=0

(the same as `--config configs/tiny.py --config.model.kind=encoder_decoder`).
"""

import os

from lm.config import load_config


def get_config():
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))
  config.unlock()
  config.model.update(kind='encoder_decoder', encoder_layers=4, shared_embeddings=True)
  config.span_corruption.update(noise_density=0.15, mean_noise_span_length=3.0, sentinels=100)
  return config
