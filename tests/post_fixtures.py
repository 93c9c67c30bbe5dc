"""Shared pieces of the reinforcement-learning tests (mode='ppo', 'grpo')."""

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import train as train_lib


def rl_config(checkpoint: str, mode: str, **post):
  """A tiny PPO or GRPO run from `checkpoint` on the standard library's function prompts, scored
  by lm.post.rewards.vowel_share (dense, so a few dozen steps show learning)."""
  config = config_lib.config_from_checkpoint(checkpoint)
  config.mode = mode
  config.model.dtype = 'float32'
  config.model.value_head = mode == 'ppo'
  config.data.seq_len = 40
  config.post.update(data='stdlib:functions', max_examples=300, eval_fraction=0.1,
                     reward_function='lm.post.rewards:vowel_share', max_new_tokens=8,
                     group_size=8 if mode == 'grpo' else 1, kl_coef=0.1, rollout_slots=16)
  config.post.update(post)
  config.train.update(steps=4, batch_size=16, learning_rate=1e-3, warmup_steps=1,
                      weight_decay=0.0, log_every=2, eval_every=1000, eval_batches=1,
                      checkpoint_every=1000)
  return config


def init_params(run):
  """The run's parameters as training starts them: config.init_from's, sharded like the run's."""
  init_from = run.config.init_from
  return checkpoint_lib.restore_params(
      init_from, train_lib.init_from_target(init_from, run.abstract_state().params))
