"""Proximal policy optimisation from a scalar score (mode='ppo'): InstructGPT's recipe, as TRL's
PPOTrainer computes it, in lm.train's loop.

Rollouts (lm/post/rollout.py) give each completion token the policy's log-probability and value
at sampling time (old_logp, old_values) and the reference's (ref_logp). Token t's reward is the
KL penalty -kl_coef * (old_logp_t - ref_logp_t), plus the score on the completion's last
token. Generalised advantage estimation (gamma, gae_lambda) over the completion gives
advantages A_t and returns R_t = A_t + old_values_t; the advantages are whitened over the batch's
tokens (post.whiten_advantages). Per token, with ratio = pi / pi_old,

  policy loss  max(-A ratio, -A clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon))
  value loss   0.5 max((V - R)^2, (old_values + clip(V - old_values, +-value_clip) - R)^2)

and the loss is policy + value_coef * value, averaged over the (mini)batch's completion tokens.
The critic is a value head on the policy's own trunk (config.model.value_head), so one forward
pass gives both, and a LoRA run trains the head with the adapters. kl_coef adapts towards
post.kl_target when that is set (rollout.KLController).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import model as model_lib
from lm.post import dpo
from lm.post import rollout


def advantages_and_returns(rewards_BT, values_BT, mask_BT, gamma: float, lam: float):
  """GAE over each row's masked (contiguous) positions: (advantages, returns), 0 off the mask.

  The value after a row's last masked position is 0: the episode ends with the completion.
  """
  B, T = rewards_BT.shape
  advantages_BT = np.zeros((B, T), np.float32)
  running_B = np.zeros(B, np.float32)
  for t in reversed(range(T)):
    next_mask_B = mask_BT[:, t + 1] if t + 1 < T else np.zeros(B, np.float32)
    next_value_B = values_BT[:, t + 1] * next_mask_B if t + 1 < T else np.zeros(B, np.float32)
    delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
    running_B = delta_B + gamma * lam * next_mask_B * running_B
    advantages_BT[:, t] = running_B * mask_BT[:, t]
  return advantages_BT, (advantages_BT + values_BT) * mask_BT


def whiten(x_BT, mask_BT):
  """x to mean 0 and standard deviation 1 over the mask's entries (0 elsewhere)."""
  n = max(mask_BT.sum(), 1.0)
  mean = (x_BT * mask_BT).sum() / n
  var = (((x_BT - mean) * mask_BT) ** 2).sum() / n
  return (x_BT - mean) / np.sqrt(var + 1e-8) * mask_BT


def finish(rows: dict, scores_B, kl_coef: float, post) -> tuple[dict, dict]:
  """The rollout's rows with advantages and returns; the per-token rewards' metrics."""
  mask_BT = rows['loss_mask']
  kl_BT = (rows['old_logp'] - rows['ref_logp']) * mask_BT
  rewards_BT = -kl_coef * kl_BT
  last_B = mask_BT.shape[1] - 1 - np.argmax(mask_BT[:, ::-1], axis=1)
  rewards_BT[np.arange(len(scores_B)), last_B] += scores_B
  advantages_BT, returns_BT = advantages_and_returns(rewards_BT, rows['old_values'], mask_BT,
                                                     post.gamma, post.gae_lambda)
  if post.whiten_advantages:
    advantages_BT = whiten(advantages_BT, mask_BT)
  rows = {**rows, 'advantages': advantages_BT.astype(np.float32),
          'returns': returns_BT.astype(np.float32)}
  return rows, {'non_score_reward': float((-kl_coef * kl_BT).sum(-1).mean())}


def loss_sums(params, batch, dropout_rng=None, *, graphdef, post):
  """Summed PPO loss over the batch's completion tokens and its parts (lm.train.Objective's); an
  MoE policy adds its router losses (dpo.with_moe_sums)."""
  logits_BTV, values_BT, moe_aux = model_lib.apply_with_values(
      graphdef, params, batch['inputs'], batch['segment_ids'], batch['positions'],
      dropout_rng=dropout_rng)
  mask_BT = batch['loss_mask']
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  logp_BT = jnp.take_along_axis(logits_BTV, batch['targets'][..., None], -1)[..., 0] - log_z_BT
  log_ratio_BT = (logp_BT - batch['old_logp']) * mask_BT
  ratio_BT = jnp.exp(log_ratio_BT)
  advantages_BT = batch['advantages']
  eps = post.clip_epsilon
  policy_BT = jnp.maximum(-advantages_BT * ratio_BT,
                          -advantages_BT * jnp.clip(ratio_BT, 1 - eps, 1 + eps))
  old_values_BT, returns_BT = batch['old_values'], batch['returns']
  clipped_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -post.value_clip,
                                        post.value_clip)
  value_BT = 0.5 * jnp.maximum((values_BT - returns_BT) ** 2, (clipped_BT - returns_BT) ** 2)
  entropy_BT = log_z_BT - (jax.nn.softmax(logits_BTV, axis=-1) * logits_BTV).sum(-1)
  masked = lambda x_BT: (x_BT * mask_BT).sum()
  sums = {
      'loss': masked(policy_BT + post.value_coef * value_BT),
      'tokens': mask_BT.sum(),
      'policy_loss': masked(policy_BT),
      'value_loss': masked(value_BT),
      'clip_fraction': masked((jnp.abs(ratio_BT - 1) > eps).astype(jnp.float32)),
      'value_clip_fraction': masked(
          (jnp.abs(values_BT - old_values_BT) > post.value_clip).astype(jnp.float32)),
      'entropy': masked(entropy_BT),
      'approx_kl': masked(0.5 * log_ratio_BT ** 2),
      'value': masked(values_BT),
  }
  return dpo.with_moe_sums(sums, moe_aux, 'tokens')


def objective(graphdef, post):
  """lm.train.Objective of PPO: every sum a mean over the (mini)batch's completion tokens."""
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  sums = functools.partial(loss_sums, graphdef=graphdef, post=post)
  return train_lib.Objective(
      sums=sums, count='tokens', loss='loss',
      eval_sums=lambda params, batch, token_bytes: sums(params, batch)[1],
      report=train_lib.mean_report('tokens', 'loss'))


def make_data(run, tokenizer, *, shard_index: int = 0, shard_count: int = 1):
  """config.post.data's prompts, completed and scored by lm.post.rollout as training runs."""
  return rollout.make_data(
      run, tokenizer, values=True,
      finish=functools.partial(finish, post=run.config.post),
      shard_index=shard_index, shard_count=shard_count)
