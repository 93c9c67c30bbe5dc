"""~6.7B-parameter Llama-2-7B-shaped model. Needs a sharded mesh: it does not fit one device."""

from lm.config import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, d_ff=11008,
      max_seq_len=4096, norm_eps=1e-5, dtype='bfloat16', remat=True, scan_layers=True)
  config.train.update(
      steps=250_000, batch_size=1024, learning_rate=3e-4, warmup_steps=2000, eval_every=5000,
      checkpoint_every=2000)
  config.data.update(source='tfds:lm1b', seq_len=4096, tokenizer_train_chars=200_000_000)
  return config
