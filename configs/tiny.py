"""A small Llama-shaped model that trains offline on CPU in about two minutes.

Its corpus is the Python standard library's own source (data.source='stdlib'): real text that is
on every machine, so the run needs no download.
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=2048, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384,
      max_seq_len=128, tie_embeddings=True)
  config.train.update(
      steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=30, log_every=10,
      eval_every=100, eval_batches=16, checkpoint_every=100)
  config.data.update(seq_len=128, max_chars=6_000_000, tokenizer_train_chars=3_000_000,
                     eval_fraction=0.05)
  return config
