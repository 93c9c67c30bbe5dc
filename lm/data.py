"""Documents -> tokens -> packed fixed-length rows -> shuffled batches, exactly resumable.

The corpus is tokenized once into a single stream, [BOS] doc [EOS] [BOS] doc [EOS] ..., with the
documents in a seeded random order and exact duplicates dropped, and cached in WORKDIR/data. The
documents from the one starting nearest the last data.eval_fraction of the stream are held out,
so every document is wholly trained on or wholly held out, and none has a copy on the other side.
Each part is cut into rows: row i is the window part[i*L : i*L + L + 1] (L = data.seq_len), so
consecutive rows share one token. Training batches come from a grain pipeline whose iterator
state is a small JSON-serializable dict, saved with each checkpoint.

A mixture (data.mixture = 'NAME=SOURCE@WEIGHT; ...') does all of that per source, each with its
own cache in WORKDIR/data/NAME, and interleaves the sources' shuffled rows in the proportions of
the weights; Data.eval_sets then holds each source's held-out batches, for per-source metrics.

Sources and mixtures are read by lm/sources.py, the tokenizer and token streams cached by
lm/token_cache.py; this module cuts the streams into rows and batches them. A prepared:OUT source,
the token shards of `python -m lm.prepare`, is not tokenized: its stream is framed from their ids
(lm/token_cache.py), then split and batched like any other.

A batch is a dict of [batch, seq_len] numpy arrays:
  inputs, targets  int32    row[:-1] and row[1:]
  segment_ids      int32    which document of the row each input belongs to: 1, 2, ... (0: padding)
  positions        int32    position of the input within its document (0 at each BOS, row start)
  loss_mask        float32  1 where the target continues the input's document (0 at EOS -> BOS)
"""

from collections.abc import Callable, Sequence
import dataclasses
import os
from typing import Any

from absl import logging
import grain
import numpy as np

from lm import sources as sources_lib
from lm import token_cache
from lm import tokenizer as tokenizer_lib

# Re-exported, so that lm.data stays the one import for reading documents and sizing vocabularies.
DataError = sources_lib.DataError
SourceStats = sources_lib.SourceStats
iter_documents = sources_lib.iter_documents
check_source = sources_lib.check_source
MixtureSource = sources_lib.MixtureSource
parse_mixture = sources_lib.parse_mixture
tokenize_documents = token_cache.tokenize_documents
padded_vocab_size = tokenizer_lib.padded_vocab_size


# ---------------------------------------------------------------------------------------------
# Rows and batches.


class Rows:
  """Rows [start, stop) of a token stream: row i is stream[i*L : i*L + L + 1], a grain source."""

  def __init__(self, stream: np.ndarray, seq_len: int, start: int, stop: int):
    self.stream, self.seq_len, self.start, self.stop = stream, seq_len, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(f'row {index} out of range [0, {len(self)})')
    begin = (self.start + index) * self.seq_len
    return np.asarray(self.stream[begin:begin + self.seq_len + 1], np.int32)

  def __repr__(self) -> str:  # grain prints sources in its debug output.
    return f'Rows({self.start}:{self.stop}, seq_len={self.seq_len})'


def make_batch(rows_BxL1: np.ndarray, bos_id: int) -> dict[str, np.ndarray]:
  """Turns [batch, seq_len + 1] windows of the stream into model inputs (see module docstring)."""
  inputs_BxL = rows_BxL1[:, :-1].astype(np.int32)
  targets_BxL = rows_BxL1[:, 1:].astype(np.int32)
  starts_BxL = inputs_BxL == bos_id
  starts_BxL[:, 0] = True  # The row's first document starts at 0, even mid-document.
  segment_ids_BxL = np.cumsum(starts_BxL, axis=1, dtype=np.int32)
  index_L = np.arange(inputs_BxL.shape[1], dtype=np.int32)
  start_index_BxL = np.maximum.accumulate(np.where(starts_BxL, index_L, 0), axis=1)
  return dict(inputs=inputs_BxL, targets=targets_BxL, segment_ids=segment_ids_BxL,
              positions=index_L - start_index_BxL,
              loss_mask=(targets_BxL != bos_id).astype(np.float32))


def rows_of(stream: np.ndarray, seq_len: int) -> Rows:
  """All the whole rows of `stream` (its last < seq_len tokens may be in none)."""
  return Rows(stream, seq_len, 0, max(len(stream) - 1, 0) // seq_len)


def held_out_start(stream: np.ndarray, *, seq_len: int, eval_fraction: float, batch_size: int,
                   bos_id: int, eos_id: int) -> int:
  """Where the held-out documents begin: the document start nearest to where the last
  eval_fraction of the stream begins (len(stream) if eval_fraction is 0), so that no document is
  on both sides. Leaves at least one batch of train rows before it and one eval row after it.

  Where no document starts near enough to hold out between half and twice eval_fraction (one
  long text file, a few huge documents), the split falls back to that point inside a document,
  logged: its two parts then go to different splits, as the usual 90/10 cut of one text does.
  """
  num_tokens = len(stream)
  # Bounds on the start: one batch of train rows before it, one eval row after it.
  first = batch_size * seq_len + 1
  last = num_tokens - seq_len - 1 if eval_fraction > 0 else num_tokens
  if first > last:
    raise sources_lib.DataError(
        f'The corpus is too small: {num_tokens} tokens make {(num_tokens - 1) // seq_len} rows of '
        f'data.seq_len={seq_len}, but one batch of train.batch_size={batch_size} rows'
        f'{" plus one eval row" if eval_fraction > 0 else ""} needs '
        f'{first + (eval_fraction > 0) * (seq_len + 1)} tokens. Use more text (data.source, '
        'data.max_chars), or a smaller data.seq_len or train.batch_size.')
  if eval_fraction == 0:
    return num_tokens
  target = min(max(round(num_tokens * (1 - eval_fraction)), first), last)
  start = _document_start_near(stream, target, first, last, bos_id, eos_id)
  if start is None or not 0.5 <= (num_tokens - start) / (num_tokens - target) <= 2:
    logging.warning(
        'No document starts near token %d of %d, where the last data.eval_fraction=%g of the '
        'stream begins: the held-out split starts there, inside a document, whose two parts go '
        'to different splits. Use more, shorter documents to hold out whole ones.',
        target, num_tokens, eval_fraction)
    return target
  return start


def _document_start_near(stream: np.ndarray, target: int, first: int, last: int, bos_id: int,
                         eos_id: int) -> int | None:
  """The document start (a BOS right after an EOS) in [first, last] nearest `target`, the earlier
  of two as near; None if there is none. Reads outward from target, not the whole stream."""
  width = 1 << 16
  while True:
    begin, end = max(first, target - width), min(last, target + width)
    window = np.asarray(stream[begin - 1:end + 1])
    starts = begin + np.flatnonzero((window[1:] == bos_id) & (window[:-1] == eos_id))
    if len(starts):
      return int(starts[np.argmin(np.abs(starts - target))])
    if (begin, end) == (first, last):
      return None
    width *= 4


def train_iterator(rows: Rows, *, batch_size: int, seed: int, bos_id: int, shard_index: int = 0,
                   shard_count: int = 1) -> grain.DatasetIterator:
  """Shuffled batches of rows, reshuffled each epoch, forever; get_state() is JSON-serializable.

  With shard_count processes, global batch k is shuffled rows [k*B, (k+1)*B) and process p reads
  only its rows p, p + shard_count, ... of it: the global batch is the same for any process
  count, and the iterator state (batches consumed) means the same thing on every process.
  """
  return _batches(_shuffled_forever(rows, seed), batch_size=batch_size, bos_id=bos_id,
                  shard_index=shard_index, shard_count=shard_count)


def mixture_train_iterator(rows: dict[str, Rows], weights: dict[str, float], *, batch_size: int,
                           seed: int, bos_id: int, shard_index: int = 0,
                           shard_count: int = 1) -> grain.DatasetIterator:
  """Like train_iterator, over several sources: each is shuffled and repeated on its own (with a
  seed of its own), and grain's MapDataset.mix interleaves them so that source NAME supplies
  weights[NAME] / sum(weights) of the rows in any stretch of them (to one row, up to grain's
  rounding of the weights' ratios to integers with the smallest 100). Sharded like train_iterator.
  """
  mixed = grain.MapDataset.mix(
      [_shuffled_forever(rows[name], sources_lib.source_seed(seed, name)) for name in rows],
      [weights[name] for name in rows])
  return _batches(mixed, batch_size=batch_size, bos_id=bos_id, shard_index=shard_index,
                  shard_count=shard_count)


def _shuffled_forever(rows: Rows, seed: int) -> grain.MapDataset:
  return grain.MapDataset.source(rows).shuffle(seed=seed % 2**32).repeat()


def _batches(rows: grain.MapDataset, *, batch_size: int, bos_id: int, shard_index: int,
             shard_count: int) -> grain.DatasetIterator:
  """This process's slice of consecutive global batches of `rows` (see train_iterator)."""
  dataset = (rows.slice(slice(shard_index, None, shard_count))
             .batch(local_batch_size(batch_size, shard_count), drop_remainder=True)
             .map(lambda rows_BxL1: make_batch(rows_BxL1, bos_id)))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def local_batch_size(batch_size: int, shard_count: int) -> int:
  if batch_size % shard_count:
    raise sources_lib.DataError(f'train.batch_size={batch_size} is not divisible by the {shard_count} '
                     'processes that each read a slice of it')
  return batch_size // shard_count


def eval_batches(rows: Sequence[np.ndarray], n: int, *, batch_size: int, bos_id: int,
                 pad_id: int, shard_index: int = 0,
                 shard_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first n batches of the held-out rows (Rows, or mixture_eval_rows), in order. A short
  last batch is padded with rows of pad_id whose loss_mask and segment_ids are 0, so every batch
  has the same shape. With several processes, each gets its rows shard_index::shard_count of
  every batch."""
  if shard_count > 1:
    local_batch_size(batch_size, shard_count)
    return [{k: v[shard_index::shard_count] for k, v in batch.items()}
            for batch in eval_batches(rows, n, batch_size=batch_size, bos_id=bos_id,
                                      pad_id=pad_id)]
  batches = []
  for start in range(0, min(n * batch_size, len(rows)), batch_size):
    block = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
    num_pad = batch_size - len(block)
    batch = make_batch(np.stack(block + [np.full_like(block[0], pad_id)] * num_pad), bos_id)
    if num_pad:
      for name in ('segment_ids', 'positions', 'loss_mask'):
        batch[name][-num_pad:] = 0
    batches.append(batch)
  return batches


def mixture_eval_rows(rows: dict[str, Rows], weights: dict[str, float]) -> Sequence[np.ndarray]:
  """The sources' held-out rows interleaved in the proportions of the weights, each source's in
  order; it ends where the first source runs out, so that every prefix keeps the proportions."""
  names = [name for name in rows if len(rows[name])]
  if not names:
    return []
  return grain.MapDataset.mix([grain.MapDataset.source(rows[name]) for name in names],
                              [weights[name] for name in names])


# ---------------------------------------------------------------------------------------------
# Entry point.


@dataclasses.dataclass
class Data:
  """Everything the trainer needs from the data side.

  For a mixture, eval_batches(n) is the first n batches of the sources' held-out rows interleaved
  in the proportions of the weights (mixture_eval_rows), so its loss estimates the loss on the
  training mixture; eval_sets[NAME](n) is the first n batches of source NAME's held-out rows alone.
  Both follow eval_batches's contract (padded, this process's slice of every batch).
  """
  tokenizer: tokenizer_lib.Tokenizer
  train_iter: grain.DatasetIterator  # Batches forever; get_state()/set_state() for checkpoints.
  eval_batches: Callable[[int], list[dict[str, np.ndarray]]]  # n -> up to n held-out batches.
  token_bytes: np.ndarray  # int32[vocab_size]: UTF-8 bytes per token, for bits per byte.
  stats: dict[str, Any]  # Counts worth logging (JSON-serializable).
  # Mixture source name -> (n -> up to n of its held-out batches), in data.mixture's order;
  # empty without a mixture.
  eval_sets: dict[str, Callable[[int], list[dict[str, np.ndarray]]]] = dataclasses.field(
      default_factory=dict)
  # Modes that learn from their own samples (PPO, GRPO; lm/post/rollout.py): train_iter gives
  # prompts, rollout(state, local batch) -> (the rows to train on, host metrics) completes them
  # with the current policy, and evaluate(params) -> metrics replaces the held-out batches.
  rollout: Callable | None = None
  evaluate: Callable | None = None
  # Distillation (lm/distill.py): global batch -> the batch with the teacher's targets, computed
  # on device before each train step.
  augment: Callable | None = None


def _source_rows(data_config, source: str, where: str, tokenizer: tokenizer_lib.Tokenizer,
                 seed: int, batch_size: int,
                 directory: str) -> tuple[Rows, Rows, dict[str, Any]]:
  """(train rows, eval rows, counts) of one source, its tokens cached in `directory`."""
  stream, manifest, cached = token_cache.cached_tokens(data_config, source, where, tokenizer,
                                                      seed, directory)
  try:
    start = held_out_start(stream, seq_len=data_config.seq_len,
                           eval_fraction=data_config.eval_fraction, batch_size=batch_size,
                           bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
  except sources_lib.DataError as e:
    raise sources_lib.DataError(f'{where}: {e}') from e
  if manifest['non_utf8_documents']:
    logging.warning('%d documents of %s had bytes that are not UTF-8 (replaced by U+FFFD).',
                    manifest['non_utf8_documents'], where)
  if manifest['duplicate_documents']:
    logging.info('Dropped %d documents of %s that repeat earlier ones exactly.',
                 manifest['duplicate_documents'], where)
  train_rows = rows_of(stream[:start], data_config.seq_len)
  eval_rows = rows_of(stream[start:], data_config.seq_len)
  counts = dict(documents=manifest['documents'], chars=manifest['chars'], tokens=len(stream),
                empty_documents=manifest['empty_documents'],
                non_utf8_documents=manifest['non_utf8_documents'],
                duplicate_documents=manifest['duplicate_documents'], train_rows=len(train_rows),
                eval_rows=len(eval_rows), tokens_cached=cached)
  return train_rows, eval_rows, counts


def make_data(data_config, *, vocab_size: int, batch_size: int, seed: int, workdir: str,
              shard_index: int = 0, shard_count: int = 1) -> Data:
  """Builds (or reuses from WORKDIR) the tokenizer and token streams, and the iterators over them.

  `data_config` is config.data (lm/config.py); vocab_size, batch_size and seed are
  config.model.vocab_size, config.train.batch_size (global) and config.train.seed. Process
  shard_index of shard_count gets only its slice of every batch (see train_iterator). With a
  data.mixture, data.source is unused and data.text_field, max_chars and eval_fraction apply to
  each of its sources.

  stats holds counts (documents, chars, tokens, empty_documents, non_utf8_documents,
  duplicate_documents, train_rows, eval_rows; summed over a mixture's sources), the tokenizer's
  path, whether it was trained now, and whether all tokens came from the cache. A mixture adds
  sources: {NAME: {source, weight, share (its expected fraction of the training rows), the same
  counts, tokens_cached}}.
  """
  mixture = sources_lib.parse_mixture(data_config.mixture) if data_config.mixture else []
  tokenizer, trained = token_cache.cached_tokenizer(data_config, mixture, vocab_size, seed,
                                                    workdir)
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise sources_lib.DataError(f'Tokenizer {tokenizer.path!r} has no BOS or EOS piece (bos_id='
                     f'{tokenizer.bos_id}, eos_id={tokenizer.eos_id}); packing needs both.')
  # Without a mixture, data.source is one source named '' (cached in WORKDIR/data itself).
  entries = mixture or [sources_lib.MixtureSource('', data_config.source, 1.0)]
  train_rows, eval_rows, sources = {}, {}, {}
  for entry in entries:
    where = entry.where if mixture else f'data.source={entry.source!r}'
    train_rows[entry.name], eval_rows[entry.name], counts = _source_rows(
        data_config, entry.source, where, tokenizer, seed, batch_size,
        os.path.join(workdir, 'data', entry.name))
    sources[entry.name] = dict(source=entry.source, weight=entry.weight,
                               share=entry.weight / sum(e.weight for e in entries), **counts)
  stats = {name: sum(counts[name] for counts in sources.values())
           for name in ('documents', 'chars', 'tokens', 'empty_documents', 'non_utf8_documents',
                        'duplicate_documents', 'train_rows', 'eval_rows')}
  stats.update(tokenizer=tokenizer.path, tokenizer_trained=trained,
               tokens_cached=all(counts['tokens_cached'] for counts in sources.values()))
  if mixture:
    stats['sources'] = sources
  logging.info('Data: %s', stats)

  def batches_of(rows: Sequence[np.ndarray]) -> Callable[[int], list[dict[str, np.ndarray]]]:
    return lambda n: eval_batches(rows, n, batch_size=batch_size, bos_id=tokenizer.bos_id,
                                  pad_id=tokenizer.pad_id, shard_index=shard_index,
                                  shard_count=shard_count)

  batching = dict(batch_size=batch_size, seed=seed, bos_id=tokenizer.bos_id,
                  shard_index=shard_index, shard_count=shard_count)
  if not mixture:
    return Data(tokenizer=tokenizer, train_iter=train_iterator(train_rows[''], **batching),
                eval_batches=batches_of(eval_rows['']), token_bytes=tokenizer.token_bytes(),
                stats=stats)
  weights = {entry.name: entry.weight for entry in mixture}
  return Data(
      tokenizer=tokenizer,
      train_iter=mixture_train_iterator(train_rows, weights, **batching),
      eval_batches=batches_of(mixture_eval_rows(eval_rows, weights)),
      token_bytes=tokenizer.token_bytes(),
      stats=stats,
      eval_sets={name: batches_of(rows) for name, rows in eval_rows.items()})
