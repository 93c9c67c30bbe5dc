"""Group relative policy optimisation (mode='grpo'; Shao et al., 2024): PPO without a critic,
each completion's advantage measured against the other completions of its prompt.

Rollouts (lm/post/rollout.py) complete every prompt post.group_size times. A completion's
advantage is its score's distance from its group's mean in units of the group's standard
deviation, (r - mean) / (std + 1e-4), the same for each of its tokens. Per token, with
ratio = pi / pi_old,

  loss = -min(A ratio, A clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon)) + kl_coef * KL,
  KL   = exp(ref - log pi) - (ref - log pi) - 1   (the k3 estimate: unbiased, never negative)

(kl_coef adapts towards post.kl_target when that is set, as PPO's does: rollout.KLController),
averaged over the whole (mini)batch's completion tokens (post.loss_normalization='token', as
DAPO and TRL's default) or over its completions of their own token means ('sequence', the
paper's): sums divided once per batch, so neither depends on how gradient accumulation cuts it.
With one update per rollout batch, kl_coef = 0 and 'sequence', the loss is exactly 0 (each
ratio is 1 and a group's advantages sum to 0), though its gradient is not.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import model as model_lib
from lm.post import dpo
from lm.post import rollout

EPSILON = 1e-4  # Keeps a group whose completions all score the same at advantage 0.


def group_advantages(scores_B, group_size: int):
  """[B] (score - its group's mean) / (its group's std + EPSILON), groups of consecutive rows;
  the sample standard deviation (n - 1), as TRL computes it."""
  groups_PG = np.asarray(scores_B, np.float32).reshape(-1, group_size)
  mean_P1 = groups_PG.mean(1, keepdims=True)
  std_P1 = groups_PG.std(1, ddof=1, keepdims=True)
  return ((groups_PG - mean_P1) / (std_P1 + EPSILON)).reshape(-1)


def finish(rows: dict, scores_B, kl_coef: float, post) -> tuple[dict, dict]:
  """The rollout's rows with each completion's group advantage on its tokens, and the KL term's
  coefficient (adapted towards post.kl_target, if set) as a [B, 1] column."""
  advantages_B = group_advantages(scores_B, post.group_size)
  rows = {**rows, 'advantages': (advantages_B[:, None] * rows['loss_mask']).astype(np.float32),
          'kl_coef': np.full((len(scores_B), 1), kl_coef, np.float32)}
  spread = np.asarray(scores_B).reshape(-1, post.group_size).std(1)
  return rows, {'groups_without_signal': float((spread == 0).mean())}


def loss_sums(params, batch, dropout_rng=None, *, graphdef, post):
  """Summed GRPO loss over the batch's tokens or sequences, and its parts (Objective's); an MoE
  policy adds its router losses (dpo.with_moe_sums)."""
  mask_BT = batch['loss_mask']
  logits_BTV, moe_aux = model_lib.apply_with_aux(graphdef, params, batch['inputs'],
                                                 batch['segment_ids'], batch['positions'],
                                                 dropout_rng=dropout_rng)
  logp_BT = dpo.target_logps(logits_BTV, batch)
  ratio_BT = jnp.exp((logp_BT - batch['old_logp']) * mask_BT)
  advantages_BT = batch['advantages']
  eps = post.clip_epsilon
  policy_BT = -jnp.minimum(advantages_BT * ratio_BT,
                           advantages_BT * jnp.clip(ratio_BT, 1 - eps, 1 + eps))
  log_ratio_ref_BT = (batch['ref_logp'] - logp_BT) * mask_BT
  kl_BT = jnp.exp(log_ratio_ref_BT) - log_ratio_ref_BT - 1
  loss_BT = policy_BT + batch['kl_coef'] * kl_BT
  parts = {'loss': loss_BT, 'policy_loss': policy_BT, 'token_kl': kl_BT,
           'clip_fraction': (jnp.abs(ratio_BT - 1) > eps).astype(jnp.float32)}
  tokens_B = mask_BT.sum(-1)
  if post.loss_normalization == 'sequence':
    per_sequence = lambda x_BT: ((x_BT * mask_BT).sum(-1) / jnp.maximum(tokens_B, 1.0)).sum()
    sums = {name: per_sequence(x) for name, x in parts.items()}
    sums['sequences'] = (tokens_B > 0).astype(jnp.float32).sum()
  else:
    sums = {name: (x * mask_BT).sum() for name, x in parts.items()}
    sums['tokens'] = tokens_B.sum()
  return dpo.with_moe_sums(sums, moe_aux, 'sequences' if 'sequences' in sums else 'tokens')


def objective(graphdef, post):
  """lm.train.Objective of GRPO: means over the (mini)batch's tokens or sequences."""
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  count = 'sequences' if post.loss_normalization == 'sequence' else 'tokens'
  sums = functools.partial(loss_sums, graphdef=graphdef, post=post)
  return train_lib.Objective(
      sums=sums, count=count, loss='loss',
      eval_sums=lambda params, batch, token_bytes: sums(params, batch)[1],
      report=train_lib.mean_report(count, 'loss'))


def make_data(run, tokenizer, *, shard_index: int = 0, shard_count: int = 1):
  """config.post.data's prompts, completed group_size times and scored as training runs."""
  return rollout.make_data(
      run, tokenizer, values=False,
      finish=functools.partial(finish, post=run.config.post),
      shard_index=shard_index, shard_count=shard_count)
