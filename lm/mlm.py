"""Masked language modelling (BERT's objective) for an encoder (config.model.kind='encoder').

Each row of a batch is corrupted on device: every real token (segment id > 0, so never padding)
is selected with probability config.mlm.mask_rate; of the selected, mask_token_rate are replaced
by the [MASK] piece, random_token_rate by a uniformly random id in [0, model.vocab_size), and the
rest kept. The encoder reads the corrupted row (batch['inputs'], the row's tokens 0 .. T-1) and is
scored on the original token at each selected position: the loss is the mean cross-entropy over
the selected tokens (BERT: 15%; 80/10/10). The selection is seeded by the train step's key and
the row's index, so a step's masks are the same on any mesh, and held-out batches use a fixed key.

  mask_tokens(...)     -> (corrupted inputs_BT, selected_BT): the pure corruption
  loss_sums(...)       summed cross-entropy, selected-token count and correct predictions
  objective(...)       the lm.train.Objective mode 'train' runs for an encoder
  mask_id(config)      the [MASK] piece's id, or ConfigError naming the tokenizer that lacks it
  data_config(...)     config.data with the tokenizer the pipeline trains holding [MASK]
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from lm import config as config_lib
from lm import model as model_lib
from lm import sources as sources_lib
from lm import token_cache
from lm import tokenizer as tokenizer_lib
from lm import train as train_lib

# Folded into the step's key for the masks, so they are independent of the model's dropout.
_MASK_STREAM = 0x6d6c6d


def mask_tokens(rng, tokens_BT, candidates_BT, *, mask_id: int, vocab_size: int,
                mask_rate: float, mask_token_rate: float, random_token_rate: float):
  """(inputs_BT, selected_BT): tokens_BT with the selected candidates replaced, and the boolean
  selection. Row b's draws come from fold_in(rng, b) alone, so a row's masks do not depend on
  the batch it is in, nor on how the batch is split over devices or micro-batches."""
  B, T = tokens_BT.shape

  def one_row(row):
    select_key, kind_key, random_key = jax.random.split(jax.random.fold_in(rng, row), 3)
    return (jax.random.uniform(select_key, (T,)), jax.random.uniform(kind_key, (T,)),
            jax.random.randint(random_key, (T,), 0, vocab_size, tokens_BT.dtype))

  select_BT, kind_BT, random_BT = jax.vmap(one_row)(jnp.arange(B))
  selected_BT = candidates_BT & (select_BT < mask_rate)
  inputs_BT = jnp.where(kind_BT < mask_token_rate, jnp.asarray(mask_id, tokens_BT.dtype),
                        jnp.where(kind_BT < mask_token_rate + random_token_rate, random_BT,
                                  tokens_BT))
  return jnp.where(selected_BT, inputs_BT, tokens_BT), selected_BT


def loss_sums(params, batch, rng, *, graphdef, mask_id: int, vocab_size: int,
              mlm: ml_collections.ConfigDict, z_loss: float = 0.0, label_smoothing: float = 0.0,
              dropout: bool = True):
  """(summed objective, sums, selected_BT) over the selected tokens of the batch's rows, as
  lm.train.loss_sums is over target tokens: sums holds 'nll', 'tokens' (selected),
  'mlm_accuracy' (selected tokens whose argmax is the original) and an MoE model's router
  statistics. dropout: rng also drives the model's dropout (training; held-out batches: False)."""
  tokens_BT = batch['inputs']
  inputs_BT, selected_BT = mask_tokens(
      jax.random.fold_in(rng, _MASK_STREAM), tokens_BT, batch['segment_ids'] > 0,
      mask_id=mask_id, vocab_size=vocab_size, mask_rate=mlm.mask_rate,
      mask_token_rate=mlm.mask_token_rate, random_token_rate=mlm.random_token_rate)
  logits_BTV, moe_aux = model_lib.apply_with_aux(
      graphdef, params, inputs_BT, batch['segment_ids'], batch['positions'],
      dropout_rng=rng if dropout else None)
  mask_BT = selected_BT.astype(jnp.float32)
  nll_BT, objective_BT = train_lib.token_objective(
      logits_BTV, tokens_BT, z_loss=z_loss, label_smoothing=label_smoothing)
  correct_BT = (jnp.argmax(logits_BTV, -1) == tokens_BT).astype(jnp.float32)
  sums = {'nll': (nll_BT * mask_BT).sum(), 'tokens': mask_BT.sum(),
          'mlm_accuracy': (correct_BT * mask_BT).sum()}
  objective = (objective_BT * mask_BT).sum()
  if moe_aux:
    moe_sums = train_lib.moe_metric_sums(moe_aux, sums['tokens'])
    objective = objective + moe_sums['moe_loss']
    sums.update(moe_sums)
  return objective, sums, selected_BT


def eval_sums(params, batch, token_bytes_V, *, seed: int, **kwargs):
  """Held-out sums with masks from a fixed key (the same corruption at every evaluation), and
  'bytes', the UTF-8 bytes of the selected original tokens (bits per byte over them)."""
  _, sums, selected_BT = loss_sums(params, batch, jax.random.key(seed), dropout=False, **kwargs)
  return {**sums, 'bytes': (token_bytes_V[batch['inputs']] * selected_BT).sum()}


def report(totals: dict, prefix: str) -> dict:
  """PREFIX_loss, _perplexity, _bits_per_byte over the selected tokens, and _mlm_accuracy."""
  out = train_lib.language_model_report(totals, prefix)
  out[f'{prefix}_mlm_accuracy'] = totals['mlm_accuracy'] / max(totals['tokens'], 1.0)
  return out


def objective(graphdef, config: ml_collections.ConfigDict) -> train_lib.Objective:
  """The masked-LM objective of config (config.mlm, config.train's z_loss and label_smoothing),
  counted in selected tokens; raises ConfigError when the tokenizer has no [MASK] piece."""
  kwargs = dict(graphdef=graphdef, mask_id=mask_id(config),
                vocab_size=config.model.vocab_size, mlm=config.mlm)
  sums = functools.partial(loss_sums, z_loss=config.train.z_loss,
                           label_smoothing=config.train.label_smoothing, **kwargs)
  return train_lib.Objective(
      sums=lambda params, batch, rng: sums(params, batch, rng)[:2],
      count='tokens', loss='nll',
      eval_sums=functools.partial(eval_sums, seed=config.train.seed, **kwargs), report=report)


def mask_id(config: ml_collections.ConfigDict) -> int:
  """The id of the [MASK] piece the run's tokenizer has: data.tokenizer's (ConfigError if it has
  none), or tokenizer.MASK_ID in the one the pipeline trains for an encoder (data_config)."""
  d, vocab_size = config.data, config.model.vocab_size
  how = (f'train one with it (python -m lm.tokenizer train --user_defined_symbols='
         f"'{tokenizer_lib.MASK_PIECE}' ...), or add it to yours with python -m lm.tokenizer "
         'merge --base YOURS --add A_MODEL_WITH_IT --out MERGED (and python -m lm.vocab '
         'extend-checkpoint for a checkpoint trained on yours); or leave config.data.tokenizer '
         'empty and the pipeline trains one with it')
  if d.tokenizer:
    found = tokenizer_lib.Tokenizer(d.tokenizer).piece_id(tokenizer_lib.MASK_PIECE)
    if found < 0:
      raise config_lib.ConfigError(
          f"config.model.kind='encoder' needs a {tokenizer_lib.MASK_PIECE} piece, but "
          f'config.data.tokenizer={d.tokenizer!r} has none: {how}')
  elif sources_lib.prepared_sources(d):
    raise config_lib.ConfigError(
        f"config.model.kind='encoder' on prepared sources {sources_lib.prepared_sources(d)}: set "
        f"config.data.tokenizer to their shards' tokenizer, which needs a "
        f'{tokenizer_lib.MASK_PIECE} piece ({how})')
  else:
    found = tokenizer_lib.MASK_ID
  if found >= vocab_size:
    raise config_lib.ConfigError(
        f'the {tokenizer_lib.MASK_PIECE} piece has id {found}, outside '
        f'config.model.vocab_size={vocab_size}')
  return found


def data_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """config.data for an encoder's run: with data.tokenizer empty, the tokenizer the pipeline
  trains (or reuses) in workdir/tokenizer, with the [MASK] piece, named as data.tokenizer so that
  lm.data takes it as given; otherwise config.data itself (mask_id checked its tokenizer)."""
  d = config.data
  if d.tokenizer or sources_lib.prepared_sources(d):
    return d
  mixture = sources_lib.parse_mixture(d.mixture) if d.mixture else []
  tokenizer, _ = token_cache.cached_tokenizer(
      d, mixture, config.model.vocab_size, config.train.seed, workdir,
      user_symbols=(tokenizer_lib.MASK_PIECE,))
  if tokenizer.piece_id(tokenizer_lib.MASK_PIECE) != tokenizer_lib.MASK_ID:
    raise tokenizer_lib.TokenizerError(
        f'{tokenizer.path} holds {tokenizer_lib.MASK_PIECE} at id '
        f'{tokenizer.piece_id(tokenizer_lib.MASK_PIECE)}, not {tokenizer_lib.MASK_ID}')
  d = d.copy_and_resolve_references()
  d.tokenizer = tokenizer.path
  return d

