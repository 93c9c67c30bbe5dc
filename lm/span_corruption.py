"""T5's span corruption (Raffel et al. 2020) for an encoder-decoder (model.kind='encoder_decoder').

A row of `length` tokens (data.seq_len, a window of the token stream like any training row) is
cut into alternating spans, starting with kept tokens and ending with noise: num_noise =
round(length * noise_density) noise tokens (clipped to [1, length - 1]) in num_spans =
max(1, round(num_noise / mean_noise_span_length)) spans, the kept and the noise tokens each cut
into num_spans non-empty spans at random (T5's random_spans_noise_mask). The encoder reads the row
with noise span K replaced by the sentinel piece <extra_id_K>, then EOS; the decoder predicts each
noise span after its sentinel, then EOS (T5's noise_span_to_unique_sentinel and
nonnoise_span_to_unique_sentinel):

  row      a b c d e f g h i j
  noise        c d         i j
  inputs   a b <extra_id_0> e f g h <extra_id_1> EOS
  targets  <extra_id_0> c d <extra_id_1> i j EOS

As in T5's code, the targets hold no closing sentinel after the last span (the paper's Figure 2
shows one): the row always ends with noise, so its last span runs to the row's end, and EOS
follows it. The counts depend only on `length`, so inputs (num_kept + num_spans + 1 tokens) and
targets (num_noise + num_spans + 1) have static shapes and corruption runs on device, under jit,
in the train step. Sentinel K has id sentinel_first + K: the tokenizer holds the pieces
<extra_id_0>, <extra_id_1>, ... consecutively (T5 counts down from the vocabulary's end instead).

  lengths(...)                  Lengths(num_noise, num_spans, inputs, targets) of a row
  raw_length_for_inputs(...)    longest row whose inputs fit (T5's compute_input_and_target_lengths)
  noise_mask(rng, length, ...)  [length] bool, T5's distribution
  corrupt(rng, tokens_BT, ...)  (inputs_BI, targets_BO), row b from fold_in(rng, b)
  reconstruct(inputs, targets)  the row again (host side; tests, reading samples)
  objective(graphdef, config)   the lm.train.Objective mode 'train' runs for an encoder_decoder
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import config as config_lib
from lm import model as model_lib
from lm import sources as sources_lib
from lm import token_cache
from lm import tokenizer as tokenizer_lib
from lm import train as train_lib

SENTINEL_PIECE = '<extra_id_{}>'


def sentinel_pieces(n: int) -> tuple[str, ...]:
  """The pieces of sentinels 0 .. n-1: <extra_id_0>, ... (T5's and HF's spelling)."""
  return tuple(SENTINEL_PIECE.format(k) for k in range(n))


@dataclasses.dataclass(frozen=True)
class Lengths:
  """Token counts of one corrupted row of `length` tokens."""
  num_noise: int
  num_spans: int
  inputs: int  # Kept tokens, a sentinel per span, EOS.
  targets: int  # Noise tokens, a sentinel per span, EOS.


def lengths(length: int, noise_density: float = 0.15,
            mean_noise_span_length: float = 3.0) -> Lengths:
  """The counts of a row of `length` tokens: T5's, noise clipped to [1, length - 1] and at least
  one span, rounded half to even in Python floats as T5's compute_input_and_target_lengths does
  (T5's mask rounds float32 products, which differ at a few exact halves, e.g. 190 * 0.15: 29
  noise tokens there, 28 here and in T5's lengths). ValueError names the argument when no row of
  that length can be corrupted so."""
  if not 0 < noise_density < 1:
    raise ValueError(f'noise_density={noise_density}: expected a share in (0, 1)')
  if not mean_noise_span_length >= 1:
    raise ValueError(f'mean_noise_span_length={mean_noise_span_length}: expected at least 1')
  if length < 2:
    raise ValueError(f'length={length}: a row needs at least 2 tokens (one kept, one noise)')
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  num_kept = length - num_noise
  if num_spans > num_kept:
    raise ValueError(f'length={length}: {num_spans} noise spans need as many kept spans before '
                     f'them, but only {num_kept} tokens are kept')
  return Lengths(num_noise, num_spans, num_kept + num_spans + 1, num_noise + num_spans + 1)


def raw_length_for_inputs(inputs_length: int, noise_density: float = 0.15,
                          mean_noise_span_length: float = 3.0) -> int:
  """The longest row whose corrupted inputs are at most inputs_length tokens (T5's
  compute_input_and_target_lengths: 512 -> 568, whose targets are 114). Two differences: no row
  is shortened at noise_density=0.5 to make the targets fit inputs_length too, and the counts
  are the mask's, at least one span (T5's helper rounds short rows to none: 8 -> 8, here 7)."""
  def inputs(length):
    try:
      return lengths(length, noise_density, mean_noise_span_length).inputs
    except ValueError:
      if not 0 < noise_density < 1 or not mean_noise_span_length >= 1:
        raise
      return None  # No row of this length can be corrupted so.

  length = max(inputs_length - 1, 2)  # Its inputs fit: num_spans <= num_noise.
  if inputs(length) is None or inputs(length) > inputs_length:
    raise ValueError(
        f'inputs_length={inputs_length}: no row corrupts to that few tokens with '
        f'noise_density={noise_density}, mean_noise_span_length={mean_noise_span_length}')
  # inputs(length) never decreases with length (each step adds at most one noise token).
  while (fits := inputs(length + 1)) is not None and fits <= inputs_length:
    length += 1
  return length


def _random_segmentation(key, num_items: int, num_segments: int):
  """[num_segments] lengths >= 1 summing to num_items, uniformly over such segmentations: the
  segments after the first start at a random choice of num_segments - 1 of items 1 ..
  num_items - 1, the ranks < num_segments - 1 of a random permutation (T5 shuffles as many ones
  among zeros; the same distribution), numbered by a cumsum."""
  if num_items == 1:
    return jnp.ones((1,), jnp.int32)
  first_N = jax.random.permutation(key, num_items - 1) < num_segments - 1
  segment_N = jnp.cumsum(jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                          first_N.astype(jnp.int32)]))
  return jax.ops.segment_sum(jnp.ones((num_items,), jnp.int32), segment_N, num_segments)


def noise_mask(rng, length: int, noise_density: float = 0.15,
               mean_noise_span_length: float = 3.0):
  """[length] bool: True at the noise tokens, num_noise of them in num_spans spans alternating
  with as many kept spans, kept first (T5's random_spans_noise_mask without random_roll): the
  noise and the kept tokens are each cut by _random_segmentation, from two keys split off rng."""
  n = lengths(length, noise_density, mean_noise_span_length)
  noise_key, kept_key = jax.random.split(rng)
  noise_S = _random_segmentation(noise_key, n.num_noise, n.num_spans)
  kept_S = _random_segmentation(kept_key, length - n.num_noise, n.num_spans)
  span_lengths = jnp.stack([kept_S, noise_S], axis=1).reshape(-1)  # kept_0 noise_0 kept_1 ...
  span_starts = jnp.cumsum(span_lengths)[:-1]
  starts_T = jnp.zeros((length,), jnp.int32).at[span_starts].set(1)
  return jnp.cumsum(starts_T) % 2 == 1


def _replace_spans(tokens_T, spans_T, sentinel_first: int, size: int):
  """T5's noise_span_to_unique_sentinel: each span of spans_T (True runs) becomes one sentinel,
  the K-th span sentinel_first + K; the result compacted to `size` tokens."""
  previous_T = jnp.concatenate([jnp.zeros((1,), bool), spans_T[:-1]])
  first_T = spans_T & ~previous_T
  sentinel_T = sentinel_first + jnp.cumsum(first_T.astype(tokens_T.dtype)) - 1
  tokens_T = jnp.where(first_T, sentinel_T.astype(tokens_T.dtype), tokens_T)
  keep_T = ~(spans_T & previous_T)
  slot_T = jnp.where(keep_T, jnp.cumsum(keep_T) - 1, size)  # Dropped tokens land out of range.
  return jnp.zeros((size,), tokens_T.dtype).at[slot_T].set(tokens_T, mode='drop')


def corrupt(rng, tokens_BT, *, sentinel_first: int, eos_id: int, noise_density: float = 0.15,
            mean_noise_span_length: float = 3.0):
  """(inputs_BI, targets_BO) int32 of every row of tokens_BT (module docstring), with I and O
  lengths(T, ...).inputs and .targets. Row b's noise mask comes from fold_in(rng, b) alone: it
  follows the row's index, never its tokens nor the other rows, so it is the same however the
  batch is sharded over devices (a permuted batch gets the masks in the old order)."""
  tokens_BT = jnp.asarray(tokens_BT)
  if tokens_BT.ndim != 2:
    raise ValueError(f'tokens_BT of shape {tokens_BT.shape}: expected [batch, length]')
  tokens_BT = tokens_BT.astype(jnp.int32)
  B, T = tokens_BT.shape
  n = lengths(T, noise_density, mean_noise_span_length)

  def one_row(row, tokens_T):
    noise_T = noise_mask(jax.random.fold_in(rng, row), T, noise_density, mean_noise_span_length)
    eos = jnp.full((1,), eos_id, jnp.int32)
    inputs = _replace_spans(tokens_T, noise_T, sentinel_first, n.inputs - 1)
    targets = _replace_spans(tokens_T, ~noise_T, sentinel_first, n.targets - 1)
    return jnp.concatenate([inputs, eos]), jnp.concatenate([targets, eos])

  return jax.vmap(one_row)(jnp.arange(B), tokens_BT)


def reconstruct(inputs_I, targets_O, *, sentinel_first: int, num_sentinels: int,
                eos_id: int) -> np.ndarray:
  """The row that `corrupt` made inputs_I and targets_O from: sentinel K of the inputs replaced
  by the tokens after sentinel K in the targets (both without their final EOS; EOS inside the
  row is a token like any other). The row itself must hold no id in [sentinel_first,
  sentinel_first + num_sentinels): ValueError when the sentinels are not 0, 1, ... in both."""
  inputs, targets = np.asarray(inputs_I), np.asarray(targets_O)
  if inputs.ndim != 1 or targets.ndim != 1:
    raise ValueError(f'inputs of shape {inputs.shape} and targets of shape {targets.shape}: '
                     'expected one row of each')
  if not len(inputs) or not len(targets) or inputs[-1] != eos_id or targets[-1] != eos_id:
    raise ValueError(f'inputs and targets of a corrupted row both end with EOS ({eos_id})')
  inputs, targets = inputs[:-1], targets[:-1]
  is_sentinel_I = (inputs >= sentinel_first) & (inputs < sentinel_first + num_sentinels)
  is_sentinel_O = (targets >= sentinel_first) & (targets < sentinel_first + num_sentinels)
  for name, tokens, is_sentinel in [('inputs', inputs, is_sentinel_I),
                                    ('targets', targets, is_sentinel_O)]:
    order = tokens[is_sentinel] - sentinel_first
    if not np.array_equal(order, np.arange(len(order))):
      raise ValueError(f'the sentinels of the {name} are {order.tolist()}, not 0, 1, ... (does '
                       'the row hold sentinel ids?)')
  if is_sentinel_I.sum() != is_sentinel_O.sum():
    raise ValueError(f'the inputs hold {is_sentinel_I.sum()} sentinels, the targets '
                     f'{is_sentinel_O.sum()}')
  if len(targets) and not is_sentinel_O[0]:
    raise ValueError(f'the targets start with {targets[0]}: expected sentinel {sentinel_first}')
  spans = np.split(targets, np.flatnonzero(is_sentinel_O))[1:]  # Each led by its sentinel.
  row = np.split(inputs, np.flatnonzero(is_sentinel_I))  # Pieces after the first lead with one.
  row = [row[0]] + [np.concatenate([span[1:], piece[1:]]) for span, piece in zip(spans, row[1:])]
  return np.concatenate(row).astype(inputs.dtype)

# ---------------------------------------------------------------------------------------------
# The training objective of config.model.kind='encoder_decoder'.

# Folded into the step's key for the noise masks, so they are independent of the model's dropout.
_SPAN_STREAM = 0x737063


def loss_sums(params, batch, rng, *, graphdef, sentinel_first: int, eos_id: int, start_id: int,
              span: ml_collections.ConfigDict, z_loss: float = 0.0,
              label_smoothing: float = 0.0, dropout: bool = True):
  """(summed objective, sums, targets_BO) over the target tokens of the batch's corrupted rows:
  sums holds 'nll', 'tokens' (targets), 'target_accuracy' (targets whose argmax is right) and an
  MoE model's router statistics. The decoder reads the targets shifted right after start_id."""
  inputs_BI, targets_BO = corrupt(
      jax.random.fold_in(rng, _SPAN_STREAM), batch['inputs'], sentinel_first=sentinel_first,
      eos_id=eos_id, noise_density=span.noise_density,
      mean_noise_span_length=span.mean_noise_span_length)
  B = targets_BO.shape[0]
  targets_in_BO = jnp.concatenate(
      [jnp.full((B, 1), start_id, targets_BO.dtype), targets_BO[:, :-1]], axis=1)
  logits_BOV, moe_aux = model_lib.apply_encoder_decoder(
      graphdef, params, inputs_BI, targets_in_BO, dropout_rng=rng if dropout else None)
  nll_BO, objective_BO = train_lib.token_objective(
      logits_BOV, targets_BO, z_loss=z_loss, label_smoothing=label_smoothing)
  correct_BO = (jnp.argmax(logits_BOV, -1) == targets_BO).astype(jnp.float32)
  sums = {'nll': nll_BO.sum(), 'tokens': jnp.asarray(nll_BO.size, jnp.float32),
          'target_accuracy': correct_BO.sum()}
  objective = objective_BO.sum()
  if moe_aux:
    moe_sums = train_lib.moe_metric_sums(moe_aux, sums['tokens'])
    objective = objective + moe_sums['moe_loss']
    sums.update(moe_sums)
  return objective, sums, targets_BO


def eval_sums(params, batch, token_bytes_V, *, seed: int, num_sentinels: int, **kwargs):
  """Held-out sums with noise from a fixed key (the same corruption at every evaluation), and
  'bytes', the UTF-8 bytes of the original text the targets hold (sentinels and EOS excluded),
  so bits per byte is the loss over the corrupted text's bytes."""
  _, sums, targets_BO = loss_sums(params, batch, jax.random.key(seed), dropout=False, **kwargs)
  first = kwargs['sentinel_first']
  text_BO = (((targets_BO < first) | (targets_BO >= first + num_sentinels))
             & (targets_BO != kwargs['eos_id']))
  return {**sums, 'bytes': (token_bytes_V[targets_BO] * text_BO).sum()}


def report(totals: dict, prefix: str) -> dict:
  """PREFIX_loss, _perplexity, _bits_per_byte over the targets, and _target_accuracy."""
  out = train_lib.language_model_report(totals, prefix)
  out[f'{prefix}_target_accuracy'] = totals['target_accuracy'] / max(totals['tokens'], 1.0)
  return out


def objective(graphdef, config: ml_collections.ConfigDict) -> train_lib.Objective:
  """Span corruption as config says (config.span_corruption, config.train's z_loss and
  label_smoothing), counted in target tokens; ConfigError when the tokenizer lacks sentinels."""
  first, eos_id = sentinel_ids(config)
  kwargs = dict(graphdef=graphdef, sentinel_first=first, eos_id=eos_id,
                start_id=config.model.decoder_start_id, span=config.span_corruption)
  sums = functools.partial(loss_sums, z_loss=config.train.z_loss,
                           label_smoothing=config.train.label_smoothing, **kwargs)
  return train_lib.Objective(
      sums=lambda params, batch, rng: sums(params, batch, rng)[:2],
      count='tokens', loss='nll',
      eval_sums=functools.partial(eval_sums, seed=config.train.seed,
                                  num_sentinels=config.span_corruption.sentinels, **kwargs),
      report=report)


def sentinel_ids(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(id of <extra_id_0>, EOS id) in the run's tokenizer: data.tokenizer's, which must hold
  config.span_corruption.sentinels consecutive sentinel pieces (ConfigError naming it
  otherwise), or the one the pipeline trains for an encoder_decoder (data_config)."""
  d, span = config.data, config.span_corruption
  pieces = sentinel_pieces(span.sentinels)
  how = (f'train one with them (python -m lm.tokenizer train --user_defined_symbols='
         f"'{pieces[0]},...,{pieces[-1]}' ...), or leave config.data.tokenizer empty and the "
         'pipeline trains one with them')
  if d.tokenizer:
    tokenizer = tokenizer_lib.Tokenizer(d.tokenizer)
  elif sources_lib.prepared_sources(d):
    raise config_lib.ConfigError(
        f"config.model.kind='encoder_decoder' on prepared sources "
        f"{sources_lib.prepared_sources(d)}: set config.data.tokenizer to their shards' "
        f'tokenizer, which needs the sentinel pieces {pieces[0]}..{pieces[-1]} ({how})')
  else:
    return FIRST_SENTINEL_ID, _PIPELINE_EOS_ID
  ids = [tokenizer.piece_id(piece) for piece in pieces]
  first = ids[0]
  if first < 0 or ids != list(range(first, first + len(ids))):
    missing = [p for p, i in zip(pieces, ids) if i < 0]
    raise config_lib.ConfigError(
        f"config.model.kind='encoder_decoder' needs config.span_corruption.sentinels="
        f'{span.sentinels} consecutive pieces {pieces[0]}..{pieces[-1]}, but '
        f'config.data.tokenizer={d.tokenizer!r} '
        + (f'lacks {missing[:3]}{"..." if len(missing) > 3 else ""}' if missing
           else 'holds them at ids that are not consecutive') + f': {how}')
  if first + len(ids) > config.model.vocab_size:
    raise config_lib.ConfigError(
        f'the sentinel pieces reach id {first + len(ids) - 1}, outside '
        f'config.model.vocab_size={config.model.vocab_size}')
  return first, tokenizer.eos_id


# SentencePiece gives user-defined symbols the ids right after its four special pieces (unk,
# BOS, EOS, pad), so in the tokenizer the pipeline trains <extra_id_0> is 4 and EOS is 2.
FIRST_SENTINEL_ID, _PIPELINE_EOS_ID = 4, 2


def data_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """config.data for an encoder_decoder's run: with data.tokenizer empty, the tokenizer the
  pipeline trains (or reuses) in workdir/tokenizer, holding the sentinel pieces, named as
  data.tokenizer; otherwise config.data itself (sentinel_ids checked its tokenizer)."""
  d = config.data
  if d.tokenizer or sources_lib.prepared_sources(d):
    return d
  pieces = sentinel_pieces(config.span_corruption.sentinels)
  mixture = sources_lib.parse_mixture(d.mixture) if d.mixture else []
  tokenizer, _ = token_cache.cached_tokenizer(
      d, mixture, config.model.vocab_size, config.train.seed, workdir, user_symbols=pieces)
  if (tokenizer.piece_id(pieces[0]), tokenizer.eos_id) != (FIRST_SENTINEL_ID, _PIPELINE_EOS_ID):
    raise tokenizer_lib.TokenizerError(
        f'{tokenizer.path} holds {pieces[0]} at id {tokenizer.piece_id(pieces[0])} and EOS at '
        f'{tokenizer.eos_id}, not {FIRST_SENTINEL_ID} and {_PIPELINE_EOS_ID}')
  d = d.copy_and_resolve_references()
  d.tokenizer = tokenizer.path
  return d
