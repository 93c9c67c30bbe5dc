"""Documents -> tokens -> packed fixed-length rows -> shuffled batches, exactly resumable.

The corpus is tokenized once into a single stream, [BOS] doc [EOS] [BOS] doc [EOS] ..., with the
documents in a seeded random order, and cached in WORKDIR/data. Row i is the window
stream[i*L : i*L + L + 1] (L = data.seq_len), so consecutive rows share one token and no token is
wasted. The last data.eval_fraction of the rows are held out. Training batches come from a grain
pipeline whose iterator state is a small JSON-serializable dict, saved with each checkpoint.

A batch is a dict of [batch, seq_len] numpy arrays:
  inputs, targets  int32    row[:-1] and row[1:]
  segment_ids      int32    which document of the row each input belongs to: 1, 2, ... (0: padding)
  positions        int32    position of the input within its document (0 at each BOS, row start)
  loss_mask        float32  1 where the target continues the input's document (0 at EOS -> BOS)
"""

from collections.abc import Callable, Iterable, Iterator
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import sys
import sysconfig
from typing import Any

from absl import logging
import grain
import numpy as np
import tqdm

from lm import files as files_lib
from lm import tokenizer as tokenizer_lib

_SOURCE_FORMS = ("'stdlib', 'text:GLOB', 'jsonl:GLOB', 'tfds:NAME[:SPLIT]' (e.g. 'tfds:lm1b', "
                 "'tfds:wiki40b/hi:train')")
_CACHE_VERSION = 1  # Bump when the token stream layout changes, to invalidate old caches.
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


def iter_documents(source: str, text_field: str = 'text', *, max_chars: int = 0,
                   stats: SourceStats | None = None) -> Iterator[str]:
  """Yields the documents of `source` (see data.source in configs/base.py) as strings.

  Stops once max_chars characters are read (0: no limit), cutting the last document. Counts go to
  `stats`. Raises ValueError for an unknown source or a corpus with no text; the source is checked
  here, the files as they are read.
  """
  kind, _, arg = source.partition(':')
  if source == 'stdlib':
    raw = (_decode(_read_bytes(path)) for path in _stdlib_files())
  elif kind == 'text' and arg:
    raw = (_decode(_read_bytes(path)) for path in _glob(arg, source))
  elif kind == 'jsonl' and arg:
    raw = _jsonl_documents(_glob(arg, source), text_field)
  elif kind == 'tfds' and arg:
    raw = _tfds_documents(arg, text_field)
  else:
    raise ValueError(
        f'data.source={source!r} is not a valid source; expected one of {_SOURCE_FORMS}.')
  return _counted(raw, source, max_chars, stats if stats is not None else SourceStats())


def _decode(data: bytes | str) -> tuple[str, bool]:
  """(text, whether it had non-UTF-8 bytes, which became U+FFFD)."""
  if isinstance(data, str):
    return data, False
  try:
    return data.decode('utf-8'), False
  except UnicodeDecodeError:
    return data.decode('utf-8', errors='replace'), True


def _counted(raw: Iterable[tuple[str, bool]], source: str, max_chars: int,
             stats: SourceStats) -> Iterator[str]:
  """Counts documents, skips empty ones, stops at max_chars; an empty corpus is an error."""
  for doc, non_utf8 in raw:
    stats.non_utf8_documents += non_utf8
    if not doc.strip():
      stats.empty_documents += 1
      continue
    if max_chars > 0:
      doc = doc[:max_chars - stats.chars]
    stats.documents += 1
    stats.chars += len(doc)
    yield doc
    if 0 < max_chars <= stats.chars:
      return
  if stats.documents == 0:
    raise ValueError(f'data.source={source!r} holds no text: {stats.empty_documents} documents, '
                     'all empty.')


def _glob(pattern: str, source: str) -> list[str]:
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise ValueError(f'data.source={source!r}: no files match {pattern!r}.')
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


def _source_fingerprint(source: str) -> str:
  """Changes when the files behind a local source change (paths, sizes, modification times)."""
  kind, _, arg = source.partition(':')
  if source == 'stdlib':
    return f'{sys.version} {sysconfig.get_paths()["stdlib"]}'
  if kind not in ('text', 'jsonl'):
    return ''
  digest = hashlib.sha256()
  for path in _glob(arg, source):
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


def _cached_tokens(data_config, tokenizer: tokenizer_lib.Tokenizer, seed: int,
                   workdir: str) -> tuple[np.ndarray, dict[str, Any], bool]:
  """(stream memmap, manifest, whether the cache was reused); rebuilds when the inputs changed."""
  tokens_path = os.path.join(workdir, 'data', 'tokens.npy')
  manifest_path = os.path.join(workdir, 'data', 'manifest.json')
  key = dict(version=_CACHE_VERSION, source=data_config.source, text_field=data_config.text_field,
             max_chars=data_config.max_chars, seed=seed,
             source_fingerprint=_source_fingerprint(data_config.source),
             tokenizer_sha256=_file_sha256(tokenizer.path))
  manifest = _read_json(manifest_path)
  if manifest is not None and manifest.get('key') == key and os.path.exists(tokens_path):
    stream = np.load(tokens_path, mmap_mode='r')
    if len(stream) == manifest['tokens']:
      return stream, manifest, True
  logging.info('Tokenizing data.source=%r into %s', data_config.source, tokens_path)
  source_stats = SourceStats()
  docs = iter_documents(data_config.source, data_config.text_field,
                        max_chars=data_config.max_chars, stats=source_stats)
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


def _cached_tokenizer(data_config, vocab_size: int, seed: int,
                      workdir: str) -> tuple[tokenizer_lib.Tokenizer, bool]:
  """(tokenizer, whether it was trained now): data.tokenizer, or one trained on the corpus."""
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
  key = dict(source=data_config.source, text_field=data_config.text_field,
             max_chars=data_config.max_chars, source_fingerprint=_source_fingerprint(
                 data_config.source), train_chars=data_config.tokenizer_train_chars,
             vocab_size=vocab_size, seed=seed)
  if _read_json(manifest_path) == key and os.path.exists(model_path):
    return tokenizer_lib.Tokenizer(model_path), False
  if os.path.exists(model_path):
    logging.warning('Replacing %s, trained with other data settings than %s: checkpoints in this '
                    'workdir that used it no longer match the tokens.', model_path, key)
  logging.info('Training a %d-piece tokenizer on data.source=%r into %s', vocab_size,
               data_config.source, model_path)
  docs = iter_documents(data_config.source, data_config.text_field,
                        max_chars=data_config.max_chars)
  tokenizer = tokenizer_lib.train_tokenizer(docs, vocab_size, model_path,
                                            max_chars=data_config.tokenizer_train_chars, seed=seed)
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


def split_rows(num_tokens: int, seq_len: int, eval_fraction: float,
               batch_size: int) -> tuple[int, int]:
  """(train rows, eval rows). Eval gets eval_fraction of the rows rounded up to whole batches,
  but never so many that fewer than one train batch is left."""
  num_rows = (num_tokens - 1) // seq_len
  num_eval = 0
  if eval_fraction > 0:
    num_eval = -(-int(np.ceil(eval_fraction * num_rows)) // batch_size) * batch_size
    num_eval = min(num_eval, num_rows - batch_size)
  if num_rows - num_eval < batch_size or (eval_fraction > 0 and num_eval < 1):
    needed = batch_size + (eval_fraction > 0)
    raise ValueError(
        f'The corpus is too small: {num_tokens} tokens make {num_rows} rows of data.seq_len='
        f'{seq_len}, but one batch of train.batch_size={batch_size} rows'
        f'{" plus one eval row" if eval_fraction > 0 else ""} needs {needed}. Use more text '
        '(data.source, data.max_chars), or a smaller data.seq_len or train.batch_size.')
  return num_rows - num_eval, num_eval


def train_iterator(rows: Rows, *, batch_size: int, seed: int, bos_id: int, shard_index: int = 0,
                   shard_count: int = 1) -> grain.DatasetIterator:
  """Shuffled batches of rows, reshuffled each epoch, forever; get_state() is JSON-serializable.

  With shard_count processes, global batch k is shuffled rows [k*B, (k+1)*B) and process p reads
  only its rows p, p + shard_count, ... of it: the global batch is the same for any process
  count, and the iterator state (batches consumed) means the same thing on every process.
  """
  dataset = (grain.MapDataset.source(rows)
             .shuffle(seed=seed % 2**32)
             .repeat()
             .slice(slice(shard_index, None, shard_count))
             .batch(_local_batch_size(batch_size, shard_count), drop_remainder=True)
             .map(lambda rows_BxL1: make_batch(rows_BxL1, bos_id)))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def _local_batch_size(batch_size: int, shard_count: int) -> int:
  if batch_size % shard_count:
    raise ValueError(f'train.batch_size={batch_size} is not divisible by the {shard_count} '
                     'processes that each read a slice of it')
  return batch_size // shard_count


def eval_batches(rows: Rows, n: int, *, batch_size: int, bos_id: int, pad_id: int,
                 shard_index: int = 0, shard_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first n batches of the held-out rows, in order. A short last batch is padded with rows
  of pad_id whose loss_mask and segment_ids are 0, so every batch has the same shape. With
  several processes, each gets its rows shard_index::shard_count of every batch."""
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


# ---------------------------------------------------------------------------------------------
# Entry point.


@dataclasses.dataclass
class Data:
  """Everything the trainer needs from the data side."""
  tokenizer: tokenizer_lib.Tokenizer
  train_iter: grain.DatasetIterator  # Batches forever; get_state()/set_state() for checkpoints.
  eval_batches: Callable[[int], list[dict[str, np.ndarray]]]  # n -> up to n held-out batches.
  token_bytes: np.ndarray  # int32[vocab_size]: UTF-8 bytes per token, for bits per byte.
  stats: dict[str, Any]  # Counts worth logging (JSON-serializable).


def make_data(data_config, *, vocab_size: int, batch_size: int, seed: int, workdir: str,
              shard_index: int = 0, shard_count: int = 1) -> Data:
  """Builds (or reuses from WORKDIR) the tokenizer and token stream, and the iterators over it.

  `data_config` is config.data (lm/config.py); vocab_size, batch_size and seed are
  config.model.vocab_size, config.train.batch_size (global) and config.train.seed. Process
  shard_index of shard_count gets only its slice of every batch (see train_iterator).
  """
  tokenizer, trained = _cached_tokenizer(data_config, vocab_size, seed, workdir)
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise ValueError(f'Tokenizer {tokenizer.path!r} has no BOS or EOS piece (bos_id='
                     f'{tokenizer.bos_id}, eos_id={tokenizer.eos_id}); packing needs both.')
  stream, manifest, cached = _cached_tokens(data_config, tokenizer, seed, workdir)
  seq_len = data_config.seq_len
  num_train, num_eval = split_rows(len(stream), seq_len, data_config.eval_fraction, batch_size)
  train_rows = Rows(stream, seq_len, 0, num_train)
  eval_rows = Rows(stream, seq_len, num_train, num_train + num_eval)
  stats = dict(documents=manifest['documents'], chars=manifest['chars'], tokens=len(stream),
               empty_documents=manifest['empty_documents'],
               non_utf8_documents=manifest['non_utf8_documents'], train_rows=num_train,
               eval_rows=num_eval, tokenizer=tokenizer.path, tokenizer_trained=trained,
               tokens_cached=cached)
  if stats['non_utf8_documents']:
    logging.warning('%d documents of data.source=%r had bytes that are not UTF-8 (replaced by '
                    'U+FFFD).', stats['non_utf8_documents'], data_config.source)
  logging.info('Data: %s', stats)
  return Data(
      tokenizer=tokenizer,
      train_iter=train_iterator(train_rows, batch_size=batch_size, seed=seed,
                                bos_id=tokenizer.bos_id, shard_index=shard_index,
                                shard_count=shard_count),
      eval_batches=lambda n: eval_batches(eval_rows, n, batch_size=batch_size,
                                          bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id,
                                          shard_index=shard_index, shard_count=shard_count),
      token_bytes=tokenizer.token_bytes(),
      stats=stats)
