"""~1.1B-parameter Llama-shaped model (TinyLlama-1.1B shape: GQA with 4 kv heads)."""

from lm.config import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, d_ff=5632,
      max_seq_len=2048, dtype='bfloat16', remat=True, scan_layers=True)
  config.train.update(
      steps=100_000, batch_size=512, learning_rate=4e-4, warmup_steps=2000, eval_every=2000,
      checkpoint_every=2000)
  config.data.update(source='tfds:lm1b', seq_len=2048, tokenizer_train_chars=200_000_000)
  return config
