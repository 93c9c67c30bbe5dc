"""Proximal policy optimisation (mode='ppo') of a trained or fine-tuned model against a score.

  python -m lm.main --config configs/post/ppo.py --workdir /tmp/lm-ppo --config.init_from=/tmp/lm-sft \
      [--config.post.reward_model=/tmp/lm-rm]

The policy starts from init_from, which is also the KL penalty's reference (config.post.reference
to name another); its shape and tokenizer come from there (config.model_from_init), and a value
head sharing its trunk starts at zero. Each step completes batch_size prompts of post.data with
lm.engine, scores them and makes update_epochs passes over them. The default score, offline on
every machine, is a programmatic style preference on the standard library's function prompts
(lm.post.rewards.keyword_density); a real run names a reward model (mode='reward' output) in
post.reward_model and clears post.reward_function, and points post.data at jsonl:GLOB prompts.
Add --config.lora.rank=16 --config.train.trainable=lora for LoRA (the reference is then the base
with adapters off, and the value head trains with the adapters).
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.mode = 'ppo'
  config.model_from_init = True
  config.model.value_head = True
  config.post.update(
      data='stdlib:functions', max_examples=2000, eval_fraction=0.05,
      reward_function='lm.post.rewards:keyword_density', max_new_tokens=24, temperature=1.0,
      group_size=1, update_epochs=4, minibatches=2, kl_coef=0.05, kl_target=0.0,
      value_coef=0.1, gamma=1.0, gae_lambda=0.95)
  config.data.seq_len = 96
  config.lora.targets = 'all'
  config.train.update(
      steps=100, batch_size=16, learning_rate=1e-4, warmup_steps=5, min_lr_ratio=1.0,
      weight_decay=0.0, log_every=5, eval_every=25, eval_batches=1, checkpoint_every=25)
  return config
