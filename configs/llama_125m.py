"""~125M-parameter Llama-shaped model (GPT-3 Small widths), for one GPU or a small TPU slice.

Point data.source at a real corpus, e.g. --config.data.source=tfds:lm1b.
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, d_ff=2048,
      max_seq_len=2048, dtype='bfloat16')
  config.train.update(
      steps=20_000, batch_size=256, learning_rate=6e-4, warmup_steps=1000, eval_every=1000,
      checkpoint_every=1000)
  config.data.update(source='tfds:lm1b', seq_len=2048, tokenizer_train_chars=200_000_000)
  return config
