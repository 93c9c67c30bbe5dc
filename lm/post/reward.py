"""Reward models (mode='reward'): the language model with a scalar head (config.model
.reward_head) on the last token, the EOS, trained on (prompt, chosen, rejected) records with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), averaged over pairs.

Pairs are read and laid out as for DPO (lm.post.dpo.read_pairs), except that each row's inputs
run through the EOS: the reward is the head on the final hidden state there, as a
sequence-classification model reads the last token. The head is a parameter like any other, so
it is saved with the checkpoint, and a run started from a language model starts it fresh.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from lm import data as data_lib
from lm import model as model_lib
from lm.post import data as post_data
from lm.post import dpo

SIDES = dpo.SIDES


def rewards_and_aux(params, rows, *, graphdef, dropout_rng=None):
  """([B] the reward of each row: the head at its last real token (the EOS of an intact row),
  an MoE model's router statistics ({} if dense))."""
  last_B = jnp.maximum((rows['segment_ids'] > 0).sum(-1) - 1, 0)
  return model_lib.apply_reward(graphdef, params, rows['inputs'], rows['segment_ids'],
                                rows['positions'], last_B, dropout_rng=dropout_rng)


def rewards(params, rows, *, graphdef, dropout_rng=None):
  """[B] the reward of each row (rewards_and_aux's)."""
  return rewards_and_aux(params, rows, graphdef=graphdef, dropout_rng=dropout_rng)[0]


def loss_sums(params, batch, dropout_rng=None, *, graphdef):
  """Summed Bradley-Terry loss over the batch's pairs and its parts (lm.train.Objective's); an
  MoE model adds its router losses (dpo.with_moe_sums)."""
  rewards_2P, moe_aux = rewards_and_aux(params, dpo.both_sides(batch), graphdef=graphdef,
                                        dropout_rng=dropout_rng)
  chosen_P, rejected_P = jnp.split(rewards_2P, 2)
  valid_P = (batch['chosen_segment_ids'].sum(-1) > 0).astype(jnp.float32)  # Padding pairs: 0.
  loss_P = -jax.nn.log_sigmoid(chosen_P - rejected_P)
  sums = {
      'loss': (loss_P * valid_P).sum(),
      'pairs': valid_P.sum(),
      'accuracy': ((chosen_P > rejected_P) * valid_P).sum(),
      'margin': ((chosen_P - rejected_P) * valid_P).sum(),
      'chosen_reward': (chosen_P * valid_P).sum(),
      'rejected_reward': (rejected_P * valid_P).sum(),
  }
  return dpo.with_moe_sums(sums, moe_aux)


def objective(graphdef):
  """lm.train.Objective of a reward model: means over pairs of the loss, accuracy and margin."""
  return dpo.pair_objective(functools.partial(loss_sums, graphdef=graphdef))


def through_eos(example: post_data.Example, pad_id: int) -> post_data.Example:
  """The example with its last token (the EOS) also an input, so the head can read it."""
  return post_data.Example(np.append(example.tokens, np.int32(pad_id)),
                           np.append(example.trained, False))


def make_data(run, tokenizer, *, shard_index: int = 0, shard_count: int = 1) -> data_lib.Data:
  """config.post.data's pairs as lm.data.Data: a seeded eval_fraction held out (at least one
  pair), the rest shuffled each epoch."""
  config = run.config
  post, t, seq_len = config.post, config.train, config.data.seq_len
  pairs, counts = dpo.read_pairs(post, tokenizer, seq_len)  # seq_len tokens fill seq_len inputs.
  pairs = [tuple(through_eos(e, tokenizer.pad_id) for e in pair) for pair in pairs]
  train_pairs, eval_pairs = post_data.split(pairs, post.eval_fraction, t.seed)
  train = dpo.PairRows(train_pairs, seq_len, tokenizer.pad_id)
  held_out = dpo.PairRows(eval_pairs, seq_len, tokenizer.pad_id)
  stats = dict(vars(counts), pairs=len(pairs), train_pairs=len(train), eval_pairs=len(held_out),
               tokenizer=tokenizer.path)
  logging.info('Preference data: %s', stats)
  return post_data.as_data(train, held_out, tokenizer, t, stats, shard_index=shard_index,
                           shard_count=shard_count)
