"""Group relative policy optimisation (mode='grpo') of a trained or fine-tuned model.

  python -m lm.main --config configs/post/grpo.py --workdir /tmp/lm-grpo --config.init_from=/tmp/lm-sft

The policy starts from init_from, which is also the KL term's reference (config.post.reference
to name another); its shape and tokenizer come from there (config.model_from_init). Each step
completes batch_size / group_size prompts of post.data group_size times with lm.engine and
scores every completion against the others of its prompt: no value model. The default score,
offline on every machine, is a programmatic style preference on the standard library's
function prompts (lm.post.rewards.keyword_density); a real run names its own function
(post.reward_function=MODULE:NAME, called with the prompts, completions and the records' other
fields) or a reward model (post.reward_model), and points post.data at jsonl:GLOB prompts.
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.mode = 'grpo'
  config.model_from_init = True
  config.post.update(
      data='stdlib:functions', max_examples=2000, eval_fraction=0.05,
      reward_function='lm.post.rewards:keyword_density', max_new_tokens=24, temperature=1.0,
      group_size=4, update_epochs=1, minibatches=1, kl_coef=0.04, loss_normalization='token')
  config.data.seq_len = 96
  config.lora.targets = 'all'
  config.train.update(
      steps=100, batch_size=16, learning_rate=1e-4, warmup_steps=5, min_lr_ratio=1.0,
      weight_decay=0.0, log_every=5, eval_every=25, eval_batches=1, checkpoint_every=25)
  return config
