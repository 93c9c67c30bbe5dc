"""Direct preference optimisation (Rafailov et al., 2023): the policy against a frozen reference
on (prompt, chosen, rejected) records, in lm.train's loop.

Each pair is two rows laid out as lm.post.data lays out any example, [BOS] + encode(prompt) +
encode(chosen or rejected) + [EOS], the loss mask on the response and the EOS. A sequence's
log-probability is the sum over those tokens. With r = beta * (log pi - log ref) per sequence,
the loss per pair is

  sigmoid: -log sigmoid(r_chosen - r_rejected)
  ipo:     ((log-ratio margin per response token) - 1 / (2 beta))^2, the margin's log-ratios
           each divided by its response's token count (Azar et al., 2023, as TRL computes it)

averaged over the global batch's pairs (summed per micro-batch, divided once: gradient
accumulation changes nothing). The reference is config.post.reference (default init_from). Its
per-token log-probabilities are computed once per run, before training, for every pair, so no
second copy of the weights is held while training; they are computed one side of a train
step's micro-batch (config.train.batch_size / grad_accum_steps pairs) at a time, so that pass
never holds more than a step does. With LoRA the reference is the base with adapters off
(B = 0), i.e. the init checkpoint itself.
"""

import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoint as checkpoint_lib
from lm import data as data_lib
from lm import model as model_lib
from lm import sources as sources_lib
from lm.post import data as post_data

SIDES = ('chosen', 'rejected')


def token_logps(params, rows, *, graphdef, dropout_rng=None):
  """[B, T] log p(target) at each row's loss_mask tokens, 0 elsewhere."""
  logits_BTV = model_lib.apply(graphdef, params, rows['inputs'], rows['segment_ids'],
                               rows['positions'], dropout_rng=dropout_rng)
  return target_logps(logits_BTV, rows)


def target_logps(logits_BTV, rows):
  """[B, T] log p(target) from the logits at each row's loss_mask tokens, 0 elsewhere."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  target_logit_BT = jnp.take_along_axis(logits_BTV, rows['targets'][..., None], -1)[..., 0]
  return (target_logit_BT - jax.nn.logsumexp(logits_BTV, axis=-1)) * rows['loss_mask']


def both_sides(batch) -> dict:
  """The chosen rows then the rejected rows, as one batch of 2P rows."""
  return {name: jnp.concatenate([batch[f'chosen_{name}'], batch[f'rejected_{name}']])
          for name in post_data.ROW_FIELDS}


def loss_sums(params, batch, dropout_rng=None, *, graphdef, beta: float, loss_type: str):
  """Summed DPO loss over the batch's pairs and its parts (lm.train.Objective's contract); an
  MoE policy adds its router losses and statistics (with_moe_sums)."""
  rows = both_sides(batch)
  logits_BTV, moe_aux = model_lib.apply_with_aux(graphdef, params, rows['inputs'],
                                                 rows['segment_ids'], rows['positions'],
                                                 dropout_rng=dropout_rng)
  logps_2P = target_logps(logits_BTV, rows).sum(-1)
  chosen_P, rejected_P = jnp.split(logps_2P, 2)
  chosen_ratio_P = chosen_P - batch['chosen_ref_logp'].sum(-1)
  rejected_ratio_P = rejected_P - batch['rejected_ref_logp'].sum(-1)
  valid_P = (batch['chosen_loss_mask'].sum(-1) > 0).astype(jnp.float32)  # Padding pairs: 0.
  if loss_type == 'ipo':
    chosen_tokens_P = jnp.maximum(batch['chosen_loss_mask'].sum(-1), 1.0)
    rejected_tokens_P = jnp.maximum(batch['rejected_loss_mask'].sum(-1), 1.0)
    per_token_margin_P = chosen_ratio_P / chosen_tokens_P - rejected_ratio_P / rejected_tokens_P
    loss_P = (per_token_margin_P - 1 / (2 * beta)) ** 2
  else:
    loss_P = -jax.nn.log_sigmoid(beta * (chosen_ratio_P - rejected_ratio_P))
  chosen_reward_P, rejected_reward_P = beta * chosen_ratio_P, beta * rejected_ratio_P
  sums = {
      'loss': (loss_P * valid_P).sum(),
      'pairs': valid_P.sum(),
      'accuracy': ((chosen_reward_P > rejected_reward_P) * valid_P).sum(),
      'margin': ((chosen_reward_P - rejected_reward_P) * valid_P).sum(),
      'chosen_reward': (chosen_reward_P * valid_P).sum(),
      'rejected_reward': (rejected_reward_P * valid_P).sum(),
      'chosen_logp': (chosen_P * valid_P).sum(),
      'rejected_logp': (rejected_P * valid_P).sum(),
  }
  return with_moe_sums(sums, moe_aux)


def with_moe_sums(sums: dict, moe_aux: dict, count: str = 'pairs') -> tuple:
  """(objective, sums) of a post-training loss: sums['loss'], plus for an MoE model the router's
  load-balancing and z-losses (lm.train.moe_metric_sums, weighted by sums[count], the units the
  objective averages over) and their statistics, as pretraining adds them."""
  if not moe_aux:
    return sums['loss'], sums
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  moe_sums = train_lib.moe_metric_sums(moe_aux, sums[count])
  return sums['loss'] + moe_sums['moe_loss'], {**sums, **moe_sums}


def objective(graphdef, post):
  """lm.train.Objective of DPO: means over pairs of the loss, accuracy, margin and rewards."""
  return pair_objective(functools.partial(loss_sums, graphdef=graphdef, beta=post.beta,
                                          loss_type=post.loss_type))


def pair_objective(sums):
  """lm.train.Objective of a loss over preference pairs (DPO's, a reward model's): every sum a
  mean over the global batch's pairs, each pair two rows."""
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  return train_lib.Objective(
      sums=sums, count='pairs', loss='loss',
      eval_sums=lambda params, batch, token_bytes: sums(params, batch)[1],
      report=train_lib.mean_report('pairs', 'loss'), sequences_per_example=2)


class PairRows:
  """Preference pairs as rows: chosen_* and rejected_* arrays [P, seq_len] laid out like
  lm.post.data.PackedRows' (one example per row), and chosen_ref_logp / rejected_ref_logp
  [P, seq_len], the reference's per-token log-probabilities (fill_reference_logps), rank 2 like
  every other array so that a batch shards one way."""

  def __init__(self, pairs: list[tuple], seq_len: int, pad_id: int):
    self.arrays = {}
    for side, examples in zip(SIDES, zip(*pairs)):
      rows = post_data.PackedRows(examples, seq_len, pack=False, pad_id=pad_id)
      self.arrays.update({f'{side}_{k}': v for k, v in rows.arrays.items()})
      self.arrays[f'{side}_ref_logp'] = np.zeros((len(pairs), seq_len), np.float32)

  def __len__(self):
    return len(self.arrays['chosen_ref_logp'])

  def __getitem__(self, index):
    return {name: array[index] for name, array in self.arrays.items()}


def read_pairs(post, tokenizer, max_tokens: int) -> tuple[list[tuple], post_data.Counts]:
  """(chosen Example, rejected Example) of each distinct record of config.post.data."""
  counts, seen, pairs = post_data.Counts(), set(), []
  where = f'config.post.data={post.data!r}'
  for location, record in post_data.read_records(post.data, where):
    if post.max_examples and counts.records >= post.max_examples:
      break
    counts.records += 1
    fields = (post.prompt_field, post.chosen_field, post.rejected_field)
    for name, field in zip(('prompt_field', 'chosen_field', 'rejected_field'), fields):
      if not isinstance(record.get(field), str):
        raise sources_lib.DataError(f'{location}: no string field config.post.{name}={field!r} '
                                    f'(found {sorted(record)})')
    key = tuple(record[f] for f in fields)
    if key in seen:
      counts.duplicates += 1
      continue
    seen.add(key)
    pair = tuple(post_data.encode_example([(record[fields[0]], False), (record[field], True)],
                                          tokenizer, max_tokens, counts) for field in fields[1:])
    if None not in pair:
      pairs.append(pair)
  if counts.records == 0:
    raise sources_lib.DataError(f'{where} holds no records')
  if len(pairs) < 2:
    raise sources_lib.DataError(
        f'{where}: {len(pairs)} usable pairs of {counts.records} records ({counts.duplicates} '
        f'duplicates, {counts.dropped_empty} responses truncated away): at least one to train on '
        'and one to hold out')
  return pairs, counts


def reference_params(run):
  """The frozen reference: config.post.reference's parameters (default init_from), sharded like
  the run's, with the leaves that checkpoint lacks (fresh LoRA adapters, B = 0, so they change
  nothing; a scalar head) initialised as lm.train initialises them for init_from."""
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  config = run.config
  path = config.post.reference or config.init_from
  if not path:
    raise sources_lib.DataError('config.mode=dpo needs a reference: config.post.reference or '
                                'config.init_from (the model the policy starts from)')
  abstract = run.abstract_state().params
  restored = checkpoint_lib.restore_params(path, train_lib.init_from_target(path, abstract))
  return complete_params(run)(restored)


def complete_params(run):
  """Jitted: restored parameters -> all of the run's, the leaves they lack initialised by
  lm.train.init_state (what config.init_from's get). Only those leaves are computed (XLA drops
  the rest of the init, and the optimizer state, which is not returned) and the restored ones
  are donated and passed through: no second copy of the model is ever held."""
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  init_state = functools.partial(train_lib.init_state, run.cfg, run.optimizer,
                                 run.config.train.seed, trained=run.trained)
  return jax.jit(lambda params: init_state(params).params, out_shardings=run.shardings.params,
                 donate_argnums=0)


def reference_batch_size(config) -> int:
  """Pairs per reference pass: the train step's micro-batch (config.train.batch_size /
  config.train.grad_accum_steps), so the reference pass never holds more than a step does."""
  return config.train.batch_size // config.train.grad_accum_steps


def reference_logps(run):
  """token_logps jitted for run's parameters and batch sharding: the reference pass, one side
  ([reference_batch_size, seq_len] rows) of a micro-batch of pairs at a time."""
  return jax.jit(functools.partial(token_logps, graphdef=run.graphdef),
                 in_shardings=(run.shardings.params, run.batch_sharding))


def fill_reference_logps(run, params, rows: PairRows, batch_size: int | None = None,
                         logps=None) -> None:
  """Writes the reference's per-token log-probabilities of every pair into rows, `batch_size`
  pairs (default reference_batch_size: the train step's micro-batch) at a time, one side per
  pass, the last batch padded. `logps` is reference_logps(run) (pass one to reuse its
  compilation across calls). The next pass is dispatched before the last one's result is
  fetched, so the device does not wait on the host."""
  batch_size = batch_size or reference_batch_size(run.config)
  logps = logps or reference_logps(run)
  pending = None  # (side, start, stop, device result) not yet written.
  for start in range(0, len(rows), batch_size):
    stop = min(start + batch_size, len(rows))
    for side in SIDES:
      block = {k: rows.arrays[f'{side}_{k}'][start:stop] for k in post_data.ROW_FIELDS}
      pad = batch_size - (stop - start)
      block = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in block.items()}
      with run.active():
        out = logps(params, block)
      if pending is not None:
        _write_logps(rows, *pending)
      pending = side, start, stop, out
  if pending is not None:
    _write_logps(rows, *pending)


def _write_logps(rows: PairRows, side: str, start: int, stop: int, logps_BT) -> None:
  rows.arrays[f'{side}_ref_logp'][start:stop] = jax.device_get(logps_BT)[:stop - start]


def make_data(run, tokenizer, *, shard_index: int = 0, shard_count: int = 1) -> data_lib.Data:
  """config.post.data's pairs as lm.data.Data, with the reference's log-probabilities: a seeded
  eval_fraction held out (at least one pair), the rest shuffled each epoch."""
  config = run.config
  post, t, seq_len = config.post, config.train, config.data.seq_len
  pairs, counts = read_pairs(post, tokenizer, seq_len + 1)
  train_pairs, eval_pairs = post_data.split(pairs, post.eval_fraction, t.seed)
  train = PairRows(train_pairs, seq_len, tokenizer.pad_id)
  held_out = PairRows(eval_pairs, seq_len, tokenizer.pad_id)
  start = time.perf_counter()
  reference, logps = reference_params(run), reference_logps(run)
  for rows in (train, held_out):  # One compilation for both.
    fill_reference_logps(run, reference, rows, logps=logps)
  del reference
  stats = dict(vars(counts), pairs=len(pairs), train_pairs=len(train), eval_pairs=len(held_out),
               reference=post.reference or config.init_from,
               reference_logps_s=round(time.perf_counter() - start, 2), tokenizer=tokenizer.path)
  logging.info('Preference data: %s', stats)
  if counts.truncated_prompts or counts.truncated_responses:
    logging.warning('%d responses lost prompt context from the left and %d were cut at their end,'
                    ' at data.seq_len=%d', counts.truncated_prompts, counts.truncated_responses,
                    seq_len)
  return post_data.as_data(train, held_out, tokenizer, t, stats, shard_index=shard_index,
                           shard_count=shard_count)
