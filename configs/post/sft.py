"""Supervised fine-tuning (mode='sft') of a trained model on prompt/response pairs.

  python -m lm.main --config configs/tiny.py --workdir /tmp/lm-tiny        # pretrain first
  python -m lm.main --config configs/post/sft.py --workdir /tmp/lm-sft --config.init_from=/tmp/lm-tiny

The model's shape and tokenizer come from init_from (config.model_from_init); the default data,
offline on every machine, is the standard library's documented functions: prompt = signature
and docstring, response = the body (post.data='stdlib:functions'). A real run points
post.data at jsonl:GLOB records ({"prompt": ..., "response": ...}, or post.template /
post.chat_template for other shapes) and init_from at its base model. Full fine-tuning; add
--config.lora.rank=16 --config.train.trainable=lora for LoRA.
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.mode = 'sft'
  config.model_from_init = True
  config.post.update(data='stdlib:functions', max_examples=4000, eval_fraction=0.05, pack=True)
  config.data.seq_len = 128
  config.lora.targets = 'all'
  config.train.update(
      steps=200, batch_size=16, learning_rate=1e-3, warmup_steps=20, min_lr_ratio=0.1,
      weight_decay=0.0, log_every=10, eval_every=50, eval_batches=8, checkpoint_every=100)
  return config
