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

A batch is a dict of [batch, seq_len] numpy arrays:
  inputs, targets  int32    row[:-1] and row[1:]
  segment_ids      int32    which document of the row each input belongs to: 1, 2, ... (0: padding)
  positions        int32    position of the input within its document (0 at each BOS, row start)
  loss_mask        float32  1 where the target continues the input's document (0 at EOS -> BOS)
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
import re
import sys
import sysconfig
from typing import Any
import zlib

from absl import logging
import grain
import numpy as np
import tqdm

from lm import files as files_lib
from lm import tokenizer as tokenizer_lib

_SOURCE_FORMS = ("'stdlib', 'text:GLOB', 'jsonl:GLOB', 'tfds:NAME[:SPLIT]' (e.g. 'tfds:lm1b', "
                 "'tfds:wiki40b/hi:train')")
_CACHE_VERSION = 2  # Bump when the token stream layout changes, to invalidate old caches.
_CHUNK_CHARS = 4_000_000  # Characters handed to SentencePiece per batch encode call.


# ---------------------------------------------------------------------------------------------
# Documents.


@dataclasses.dataclass
class SourceStats:
  """What reading a source found; filled in as iter_documents runs."""
  documents: int = 0  # Non-empty documents yielded.
  chars: int = 0  # Characters yielded (after any max_chars cut).
  empty_documents: int = 0  # Documents skipped because they hold only whitespace.
  non_utf8_documents: int = 0  # Documents with bytes that are not UTF-8, decoded as U+FFFD.
  duplicate_documents: int = 0  # Documents skipped as exact copies of earlier ones.


def iter_documents(source: str, text_field: str = 'text', *, max_chars: int = 0,
                   drop_duplicates: bool = False, stats: SourceStats | None = None,
                   where: str = '') -> Iterator[str]:
  """Yields the documents of `source` (see data.source in configs/base.py) as strings.

  Stops once max_chars characters are read (0: no limit), cutting the last document. With
  drop_duplicates, a document identical to one yielded before is skipped (and counts toward
  nothing but stats.duplicate_documents). Counts go to `stats`. Raises ValueError for an unknown
  source or a corpus with no text; the source is checked here, the files as they are read. Errors
  name `where` (default: data.source=SOURCE).
  """
  where = where or f'data.source={source!r}'
  check_source(source, where)
  kind, _, arg = source.partition(':')
  if source == 'stdlib':
    raw = (_decode(_read_bytes(path)) for path in _stdlib_files())
  elif kind == 'text':
    raw = (_decode(_read_bytes(path)) for path in _glob(arg, where))
  elif kind == 'jsonl':
    raw = _jsonl_documents(_glob(arg, where), text_field)
  else:
    raw = _tfds_documents(arg, text_field)
  return _counted(raw, where, max_chars, drop_duplicates,
                  stats if stats is not None else SourceStats())


def check_source(source: str, where: str = '') -> None:
  """Raises ValueError, naming `where`, unless `source` has a form iter_documents reads. Reads no
  files: a glob that matches nothing passes here and fails when read."""
  kind, _, arg = source.partition(':')
  if source != 'stdlib' and not (kind in ('text', 'jsonl', 'tfds') and arg):
    raise ValueError(f'{where or f"data.source={source!r}"} is not a valid source; expected one '
                     f'of {_SOURCE_FORMS}.')


def _decode(data: bytes | str) -> tuple[str, bool]:
  """(text, whether it had non-UTF-8 bytes, which became U+FFFD)."""
  if isinstance(data, str):
    return data, False
  try:
    return data.decode('utf-8'), False
  except UnicodeDecodeError:
    return data.decode('utf-8', errors='replace'), True


def _counted(raw: Iterable[tuple[str, bool]], where: str, max_chars: int, drop_duplicates: bool,
             stats: SourceStats) -> Iterator[str]:
  """Counts documents, skips empty ones (and repeated ones, if asked), stops at max_chars; an
  empty corpus is an error."""
  seen = set()  # 128-bit digests of the documents yielded, when dropping duplicates.
  for doc, non_utf8 in raw:
    stats.non_utf8_documents += non_utf8
    if not doc.strip():
      stats.empty_documents += 1
      continue
    if max_chars > 0:
      doc = doc[:max_chars - stats.chars]
    if drop_duplicates:
      digest = hashlib.blake2b(doc.encode('utf-8', 'surrogatepass'), digest_size=16).digest()
      if digest in seen:
        stats.duplicate_documents += 1
        continue
      seen.add(digest)
    stats.documents += 1
    stats.chars += len(doc)
    yield doc
    if 0 < max_chars <= stats.chars:
      return
  if stats.documents == 0:
    raise ValueError(f'{where} holds no text: {stats.empty_documents} documents, all empty.')


def _glob(pattern: str, where: str) -> list[str]:
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise ValueError(f'{where}: no files match {pattern!r}.')
  return paths


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _stdlib_files() -> list[str]:
  """The standard library's own .py files, sorted: real text present on every machine."""
  root = sysconfig.get_paths()['stdlib']
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in ('site-packages', 'dist-packages', '__pycache__')]
    paths += [os.path.join(directory, f) for f in files if f.endswith('.py')]
  return sorted(paths)


def _jsonl_documents(paths: list[str], text_field: str) -> Iterator[tuple[str, bool]]:
  """One document per non-blank line, the string under text_field."""
  for path in paths:
    with open(path, 'rb') as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        text, non_utf8 = _decode(line)
        try:
          record = json.loads(text)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{line_number}: not a JSON line ({e}).') from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
          found = sorted(record) if isinstance(record, dict) else type(record).__name__
          raise ValueError(f'{path}:{line_number}: no string field data.text_field='
                           f'{text_field!r} (found {found}).')
        text = record[text_field]
        try:
          text.encode('utf-8')
        except UnicodeEncodeError:  # Lone surrogates written as \udXXX escapes.
          text, non_utf8 = text.encode('utf-8', errors='replace').decode('utf-8'), True
        yield text, non_utf8


def _tfds_documents(arg: str, text_field: str) -> Iterator[tuple[str, bool]]:
  """Reads with tfds.data_source (random access over array_record files; TensorFlow not needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # Slow import.
  name, _, split = arg.partition(':')
  examples = tfds.data_source(name, split=split or 'train')
  for index in range(len(examples)):
    example = examples[index]
    if text_field not in example:
      raise ValueError(f'tfds:{arg} example {index} has no field data.text_field={text_field!r} '
                       f'(found {sorted(example)}).')
    text = example[text_field]
    yield _decode(text.item() if isinstance(text, np.ndarray) else text)


# ---------------------------------------------------------------------------------------------
# Mixtures: several sources, each with a weight.


@dataclasses.dataclass(frozen=True)
class MixtureSource:
  """One entry NAME=SOURCE@WEIGHT of data.mixture."""
  name: str  # Names its metrics (eval_NAME_loss, ...) and its cache, WORKDIR/data/NAME.
  source: str  # Any form data.source takes.
  weight: float  # The source supplies weight / sum(weights) of the training rows.

  @property
  def where(self) -> str:
    """How error messages name this entry."""
    return f'config.data.mixture entry {self.name}={self.source!r}'


def parse_mixture(text: str) -> list[MixtureSource]:
  """config.data.mixture, 'NAME=SOURCE@WEIGHT; ...', as a list; reads no files.

  NAME is what comes before the first '=', WEIGHT what comes after the last '@' (so sources may
  hold either). Raises ValueError naming the entry that is malformed.
  """
  def error(entry: str, problem: str) -> ValueError:
    return ValueError(f'config.data.mixture={text!r}: entry {entry!r} {problem}')

  sources = []
  for entry in text.split(';'):
    entry = entry.strip()
    if not entry:  # Allows a trailing ';'.
      continue
    name, equals, rest = (part.strip() for part in entry.partition('='))
    source, at, weight_text = (part.strip() for part in rest.rpartition('@'))
    if not equals or not at:
      raise error(entry, f'lacks {"=" if not equals else "@"}; expected NAME=SOURCE@WEIGHT, e.g. '
                  "'hi=text:/data/hi/*.txt@0.8'")
    if not re.fullmatch(r'[A-Za-z0-9_]+', name):
      raise error(entry, f'has the name {name!r}; names become metric names (eval_NAME_loss), so '
                  'use letters, digits and _ only')
    if name in [s.name for s in sources]:
      raise error(entry, f'repeats the name {name!r}')
    try:
      weight = float(weight_text)
    except ValueError:
      weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
      raise error(entry, f'has the weight {weight_text!r}; expected a positive number')
    check_source(source, f'config.data.mixture={text!r}: entry {entry!r} has source={source!r}, '
                 'which')
    sources.append(MixtureSource(name, source, weight))
  if not sources:
    raise ValueError(f'config.data.mixture={text!r} holds no entries; expected '
                     "'NAME=SOURCE@WEIGHT; ...', or empty to use data.source alone.")
  return sources


def _source_seed(seed: int, name: str) -> int:
  """A seed of its own for each source of a mixture, stable under reordering the entries."""
  return zlib.crc32(f'{seed}:{name}'.encode())


# ---------------------------------------------------------------------------------------------
# Tokens: one stream for the whole corpus, cached in the workdir.


def tokenize_documents(docs: Iterable[str], tokenizer: tokenizer_lib.Tokenizer, *, seed: int,
                       total_chars: int | None = None) -> np.ndarray:
  """The token stream: [BOS] doc [EOS] for every doc, in a seeded random order.

  The stream is uint16 when the vocabulary fits, else uint32. Documents are shuffled so that the
  held-out tail of the stream is a random sample of the corpus, not its last files.
  """
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
  pieces, lengths, chunk, chunk_chars = [], [], [], 0
  with tqdm.tqdm(total=total_chars, unit='char', unit_scale=True, desc='tokenizing',
                 disable=None) as progress:
    for doc in itertools.chain(docs, [None]):
      if doc is not None:
        chunk.append(doc)
        chunk_chars += len(doc)
      if chunk and (doc is None or chunk_chars >= _CHUNK_CHARS):
        ids = tokenizer.encode_batch(chunk)
        pieces.append(_frame_documents(ids, tokenizer.bos_id, tokenizer.eos_id, dtype))
        lengths += [len(doc_ids) + 2 for doc_ids in ids]
        progress.update(chunk_chars)
        chunk, chunk_chars = [], 0
  stream = np.concatenate(pieces)
  return _shuffle_documents(stream, np.array(lengths, np.int64), seed)


def _frame_documents(ids: list[list[int]], bos: int, eos: int, dtype: type) -> np.ndarray:
  """Concatenates [bos] + doc + [eos] for each doc, without a Python loop over tokens."""
  lengths = np.array([len(doc_ids) + 2 for doc_ids in ids], np.int64)
  ends = np.cumsum(lengths)
  frame = np.zeros(int(ends[-1]), bool)
  frame[ends - lengths] = frame[ends - 1] = True
  stream = np.empty(len(frame), dtype)
  stream[ends - lengths], stream[ends - 1] = bos, eos
  stream[~frame] = np.fromiter(itertools.chain.from_iterable(ids), dtype,
                               count=len(frame) - 2 * len(ids))
  return stream


def _shuffle_documents(stream: np.ndarray, lengths: np.ndarray, seed: int) -> np.ndarray:
  ends = np.cumsum(lengths)
  order = np.random.default_rng(seed).permutation(len(lengths))
  shuffled, position = np.empty_like(stream), 0
  for start, end in zip((ends - lengths)[order].tolist(), ends[order].tolist()):
    shuffled[position:position + end - start] = stream[start:end]
    position += end - start
  return shuffled


def _source_fingerprint(source: str, where: str = '') -> str:
  """Changes when the files behind a local source change (paths, sizes, modification times)."""
  kind, _, arg = source.partition(':')
  if source == 'stdlib':
    return f'{sys.version} {sysconfig.get_paths()["stdlib"]}'
  if kind not in ('text', 'jsonl'):
    return ''
  digest = hashlib.sha256()
  for path in _glob(arg, where or f'data.source={source!r}'):
    stat = os.stat(path)
    digest.update(f'{os.path.abspath(path)} {stat.st_size} {stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


def _file_sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _cached_tokens(data_config, source: str, where: str, tokenizer: tokenizer_lib.Tokenizer,
                   seed: int, directory: str) -> tuple[np.ndarray, dict[str, Any], bool]:
  """(stream memmap, manifest, whether the cache was reused) of one source, cached in
  `directory`; rebuilds when the inputs changed. Errors name `where`."""
  tokens_path = os.path.join(directory, 'tokens.npy')
  manifest_path = os.path.join(directory, 'manifest.json')
  key = dict(version=_CACHE_VERSION, source=source, text_field=data_config.text_field,
             max_chars=data_config.max_chars, seed=seed,
             source_fingerprint=_source_fingerprint(source, where),
             tokenizer_sha256=_file_sha256(tokenizer.path))
  manifest = _read_json(manifest_path)
  if manifest is not None and manifest.get('key') == key and os.path.exists(tokens_path):
    stream = np.load(tokens_path, mmap_mode='r')
    if len(stream) == manifest['tokens']:
      return stream, manifest, True
  logging.info('Tokenizing %s into %s', where, tokens_path)
  source_stats = SourceStats()
  docs = iter_documents(source, data_config.text_field, max_chars=data_config.max_chars,
                        drop_duplicates=True, stats=source_stats, where=where)
  stream = tokenize_documents(docs, tokenizer, seed=seed,
                              total_chars=data_config.max_chars or None)
  files_lib.write_atomically(tokens_path, lambda f: np.save(f, stream), mode='wb')
  manifest = dict(key=key, tokenizer=tokenizer.path, tokens=len(stream),
                  **dataclasses.asdict(source_stats))
  files_lib.write_atomically(manifest_path, lambda f: json.dump(manifest, f, indent=2))
  return np.load(tokens_path, mmap_mode='r'), manifest, False


def padded_vocab_size(pieces: int) -> int:
  """Embedding rows for a tokenizer of `pieces` pieces, rounded up to a multiple of 128 so the
  vocab dimension tiles evenly in matmuls; the extra rows are never inputs or targets."""
  return -(-pieces // 128) * 128


def _cached_tokenizer(data_config, mixture: list[MixtureSource], vocab_size: int, seed: int,
                      workdir: str) -> tuple[tokenizer_lib.Tokenizer, bool]:
  """(tokenizer, whether it was trained now): data.tokenizer, or one trained on the corpus.

  For a mixture, the training text samples each source's share of data.tokenizer_train_chars
  (weight / sum of weights; all of a source smaller than its share).
  """
  if data_config.tokenizer:
    tokenizer = tokenizer_lib.Tokenizer(data_config.tokenizer)
    if vocab_size not in (tokenizer.vocab_size, padded_vocab_size(tokenizer.vocab_size)):
      raise ValueError(
          f'model.vocab_size={vocab_size} but data.tokenizer={data_config.tokenizer!r} has '
          f'{tokenizer.vocab_size} pieces; set model.vocab_size={tokenizer.vocab_size} (or '
          f'{padded_vocab_size(tokenizer.vocab_size)}, padded for faster matmuls).')
    return tokenizer, False
  model_path = os.path.join(workdir, 'tokenizer', 'spm.model')
  manifest_path = os.path.join(workdir, 'tokenizer', 'manifest.json')
  key = dict(text_field=data_config.text_field, max_chars=data_config.max_chars,
             train_chars=data_config.tokenizer_train_chars, vocab_size=vocab_size, seed=seed)
  if mixture:
    key['mixture'] = [dict(dataclasses.asdict(s), source_fingerprint=_source_fingerprint(
        s.source, s.where)) for s in mixture]
  else:
    key.update(source=data_config.source,
               source_fingerprint=_source_fingerprint(data_config.source))
  if _read_json(manifest_path) == key and os.path.exists(model_path):
    return tokenizer_lib.Tokenizer(model_path), False
  if os.path.exists(model_path):
    logging.warning('Replacing %s, trained with other data settings than %s: checkpoints in this '
                    'workdir that used it no longer match the tokens.', model_path, key)
  logging.info('Training a %d-piece tokenizer on data.%s into %s', vocab_size,
               f'mixture={data_config.mixture!r}' if mixture else f'source={data_config.source!r}',
               model_path)
  train_chars = data_config.tokenizer_train_chars
  if mixture:
    total_weight = sum(s.weight for s in mixture)
    texts = []
    for s in mixture:
      docs = iter_documents(s.source, data_config.text_field, max_chars=data_config.max_chars,
                            where=s.where)
      share = max(1, round(train_chars * s.weight / total_weight)) if train_chars > 0 else 0
      texts += tokenizer_lib.sample_texts(docs, share, _source_seed(seed, s.name))
    train_chars = 0  # Sampled already.
  else:
    texts = iter_documents(data_config.source, data_config.text_field,
                           max_chars=data_config.max_chars)
  tokenizer = tokenizer_lib.train_tokenizer(texts, vocab_size, model_path, max_chars=train_chars,
                                            seed=seed)
  files_lib.write_atomically(manifest_path, lambda f: json.dump(key, f, indent=2))
  return tokenizer, True


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
  on both sides. Leaves at least one batch of train rows before it and one eval row after it."""
  num_tokens = len(stream)
  # Bounds on the start: one batch of train rows before it, one eval row after it.
  first = batch_size * seq_len + 1
  last = num_tokens - seq_len - 1 if eval_fraction > 0 else num_tokens
  if first > last:
    raise ValueError(
        f'The corpus is too small: {num_tokens} tokens make {(num_tokens - 1) // seq_len} rows of '
        f'data.seq_len={seq_len}, but one batch of train.batch_size={batch_size} rows'
        f'{" plus one eval row" if eval_fraction > 0 else ""} needs '
        f'{first + (eval_fraction > 0) * (seq_len + 1)} tokens. Use more text (data.source, '
        'data.max_chars), or a smaller data.seq_len or train.batch_size.')
  if eval_fraction == 0:
    return num_tokens
  target = min(max(round(num_tokens * (1 - eval_fraction)), first), last)
  start = _document_start_near(stream, target, first, last, bos_id, eos_id)
  if start is None:
    raise ValueError(
        f'The corpus is too small to hold out whole documents: of its {num_tokens} tokens, none '
        f'from token {first} (after one batch of train.batch_size={batch_size} rows of '
        f'data.seq_len={seq_len}) to token {last} (before one eval row) starts a document. Use '
        'more documents (data.source, data.max_chars), or a smaller data.seq_len or '
        'train.batch_size.')
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
      [_shuffled_forever(rows[name], _source_seed(seed, name)) for name in rows],
      [weights[name] for name in rows])
  return _batches(mixed, batch_size=batch_size, bos_id=bos_id, shard_index=shard_index,
                  shard_count=shard_count)


def _shuffled_forever(rows: Rows, seed: int) -> grain.MapDataset:
  return grain.MapDataset.source(rows).shuffle(seed=seed % 2**32).repeat()


def _batches(rows: grain.MapDataset, *, batch_size: int, bos_id: int, shard_index: int,
             shard_count: int) -> grain.DatasetIterator:
  """This process's slice of consecutive global batches of `rows` (see train_iterator)."""
  dataset = (rows.slice(slice(shard_index, None, shard_count))
             .batch(_local_batch_size(batch_size, shard_count), drop_remainder=True)
             .map(lambda rows_BxL1: make_batch(rows_BxL1, bos_id)))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def _local_batch_size(batch_size: int, shard_count: int) -> int:
  if batch_size % shard_count:
    raise ValueError(f'train.batch_size={batch_size} is not divisible by the {shard_count} '
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
    _local_batch_size(batch_size, shard_count)
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


def _source_rows(data_config, source: str, where: str, tokenizer: tokenizer_lib.Tokenizer,
                 seed: int, batch_size: int,
                 directory: str) -> tuple[Rows, Rows, dict[str, Any]]:
  """(train rows, eval rows, counts) of one source, its tokens cached in `directory`."""
  stream, manifest, cached = _cached_tokens(data_config, source, where, tokenizer, seed,
                                            directory)
  try:
    start = held_out_start(stream, seq_len=data_config.seq_len,
                           eval_fraction=data_config.eval_fraction, batch_size=batch_size,
                           bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from e
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
  mixture = parse_mixture(data_config.mixture) if data_config.mixture else []
  tokenizer, trained = _cached_tokenizer(data_config, mixture, vocab_size, seed, workdir)
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise ValueError(f'Tokenizer {tokenizer.path!r} has no BOS or EOS piece (bos_id='
                     f'{tokenizer.bos_id}, eos_id={tokenizer.eos_id}); packing needs both.')
  # Without a mixture, data.source is one source named '' (cached in WORKDIR/data itself).
  entries = mixture or [MixtureSource('', data_config.source, 1.0)]
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
