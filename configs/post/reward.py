"""A reward model (mode='reward'): a trained model with a scalar head on the last token, fit to
preference pairs with the Bradley-Terry loss.

  python -m lm.main --config configs/post/reward.py --workdir /tmp/lm-rm --config.init_from=/tmp/lm-sft

The shape and tokenizer come from init_from (config.model_from_init); the head starts fresh and
is saved with the checkpoint (config.model.reward_head=True in its config.json). The default
data, offline on every machine, pairs each documented standard-library function's signature and
docstring with its own body (chosen) and the next function's (rejected). A real run points
post.data at jsonl:GLOB records ({"prompt": ..., "chosen": ..., "rejected": ...}).
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.mode = 'reward'
  config.model_from_init = True
  config.model.reward_head = True
  config.post.update(data='stdlib:function_pairs', max_examples=2000, eval_fraction=0.05)
  config.data.seq_len = 128
  config.lora.targets = 'all'
  config.train.update(
      steps=200, batch_size=16, learning_rate=5e-4, warmup_steps=20, min_lr_ratio=0.1,
      weight_decay=0.0, log_every=10, eval_every=50, eval_batches=8, checkpoint_every=100)
  return config
