"""Direct preference optimisation (mode='dpo') of a trained or fine-tuned model.

  python -m lm.main --config configs/post/dpo.py --workdir /tmp/lm-dpo --config.init_from=/tmp/lm-sft

The policy starts from init_from, which is also the frozen reference (config.post.reference to
name another); the model's shape and tokenizer come from it (config.model_from_init). The
default data, offline on every machine, pairs each documented standard-library function's
signature and docstring with its own body (chosen) and the next function's (rejected)
(post.data='stdlib:function_pairs'). A real run points post.data at jsonl:GLOB records
({"prompt": ..., "chosen": ..., "rejected": ...}). Add --config.lora.rank=16
--config.train.trainable=lora for LoRA (the reference is then the base with adapters off).
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.mode = 'dpo'
  config.model_from_init = True
  config.post.update(data='stdlib:function_pairs', max_examples=2000, eval_fraction=0.05,
                     beta=0.1, loss_type='sigmoid')
  config.data.seq_len = 128
  config.lora.targets = 'all'
  config.train.update(
      steps=200, batch_size=16, learning_rate=5e-4, warmup_steps=20, min_lr_ratio=0.1,
      weight_decay=0.0, log_every=10, eval_every=50, eval_batches=8, checkpoint_every=100)
  return config
