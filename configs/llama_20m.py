"""A ~17M-parameter Llama-shaped model (10.6M outside the embeddings) that trains on CPU.

The shape bench/train_throughput.py measures against PyTorch: d 384, 6 layers, 6 heads of 64,
d_ff 1024, vocab 8192, 256-token context, batch 8. Its corpus is the Python standard library's
own source (data.source='stdlib'), so it runs offline.
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.model.update(
      vocab_size=8192, d_model=384, num_layers=6, num_heads=6, num_kv_heads=6, d_ff=1024,
      max_seq_len=256, tie_embeddings=False)
  config.train.update(
      steps=2000, batch_size=8, learning_rate=1e-3, warmup_steps=100, log_every=10,
      eval_every=250, eval_batches=16, checkpoint_every=250)
  config.data.update(seq_len=256, max_chars=20_000_000, tokenizer_train_chars=5_000_000)
  return config
