"""The small run the training-loop tests share (tests/test_train.py, test_moe.py, test_mlm.py,
test_encoder_decoder.py, test_distill.py): a two-block d_model 64 model on 64-token rows of the
standard library's source, 12 steps of 8 rows, evaluating at 6 and checkpointing every 4."""

from lm import config as config_lib


def small_run(tokenizer: str = '', **train):
  """The run's config; train's fields override config.train's."""
  config = config_lib.base_config()
  config.model.update(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      d_ff=128, max_seq_len=64, tie_embeddings=True, dtype='float32')
  config.train.update({
      'steps': 12, 'batch_size': 8, 'learning_rate': 3e-3, 'warmup_steps': 2, 'log_every': 2,
      'eval_every': 6, 'eval_batches': 2, 'checkpoint_every': 4, **train})
  config.data.update(seq_len=64, max_chars=300_000, tokenizer_train_chars=300_000,
                     tokenizer=tokenizer)
  return config
