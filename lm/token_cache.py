"""The workdir's caches, each rebuilt when what it was built from changes.

  WORKDIR/tokenizer/     spm.model, trained on the corpus when data.tokenizer is empty (or, when
                         a source is prepared:OUT, a copy of the tokenizer of its shards), and
                         manifest.json, the settings and sources it was trained with.
  DIR/                   a source's token stream: tokens.npy, [BOS] doc [EOS] ... for its
                         documents, exact duplicates dropped, in a seeded random order; and
                         manifest.json, its key (source, files, tokenizer, settings) and counts.
                         DIR is WORKDIR/data, or WORKDIR/data/NAME for mixture source NAME.

A prepared:OUT source (lm.prepare's token shards, lm/prepare/shards.py) is not tokenized: its
stream is framed from the token ids in the shards, once their tokenizer is checked to be the run's.

This module alone knows the files' names: others list or copy a cache with cache_files and
copy_cache.
"""

from collections.abc import Iterable
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
from typing import Any

from absl import logging
import numpy as np
import tqdm

from lm import files as files_lib
from lm import sources as sources_lib
from lm import tokenizer as tokenizer_lib

_CACHE_VERSION = 2  # Bump when the token stream layout changes, to invalidate old caches.
_CHUNK_CHARS = 4_000_000  # Characters handed to SentencePiece per batch encode call.
_TOKENS, _MANIFEST = 'tokens.npy', 'manifest.json'  # A token cache's files.


# ---------------------------------------------------------------------------------------------
# Tokens: one stream per source.


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


def cache_files(directory: str) -> list[str]:
  """The paths of the token cache in `directory` (whether or not they exist yet)."""
  return [os.path.join(directory, name) for name in (_TOKENS, _MANIFEST)]


def copy_cache(source_dir: str, target_dir: str) -> None:
  """Gives target_dir the token cache files of source_dir that it lacks, as hard links where the
  filesystem allows (else copies). cached_tokens rebuilds them if they do not fit its inputs."""
  for source, target in zip(cache_files(source_dir), cache_files(target_dir)):
    if os.path.exists(source) and not os.path.exists(target):
      os.makedirs(target_dir, exist_ok=True)
      try:
        os.link(source, target)
      except OSError:
        shutil.copyfile(source, target)


def _file_sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def prepared_stream(directory: str, shards_manifest: dict[str, Any], where: str,
                    tokenizer: tokenizer_lib.Tokenizer, *, seed: int,
                    max_chars: int = 0) -> tuple[np.ndarray, sources_lib.SourceStats]:
  """(stream, counts) of lm.prepare's shards in `directory`, from the token ids they hold: the
  stream tokenize_documents makes of the documents' text, [BOS] doc [EOS] in a seeded random order,
  exact duplicates (equal ids) dropped. With max_chars, whole documents in that order until they
  hold max_chars characters."""
  from lm.prepare import shards  # pylint: disable=g-import-not-at-top
  stats, seen, docs, chars = sources_lib.SourceStats(), set(), [], []
  for record in shards.iter_records(directory, shards_manifest, where):
    digest = hashlib.blake2b(record.ids.tobytes(), digest_size=16).digest()
    if digest in seen:
      stats.duplicate_documents += 1
      continue
    seen.add(digest)
    docs.append(record.ids)
    chars.append(record.chars)
  if not docs:
    raise sources_lib.DataError(f'{where} holds no documents')
  order = np.random.default_rng(seed).permutation(len(docs))
  if max_chars > 0:
    taken = np.cumsum(np.asarray(chars, np.int64)[order])
    order = order[:int(np.searchsorted(taken, max_chars)) + 1]
  stream = np.empty(sum(len(docs[i]) + 2 for i in order.tolist()),
                    np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
  position = 0
  for i in order.tolist():
    n = len(docs[i])
    stream[position], stream[position + n + 1] = tokenizer.bos_id, tokenizer.eos_id
    stream[position + 1:position + n + 1] = docs[i]
    position += n + 2
  stats.documents, stats.chars = len(order), sum(chars[i] for i in order.tolist())
  return stream, stats


def cached_tokens(data_config, source: str, where: str, tokenizer: tokenizer_lib.Tokenizer,
                  seed: int, directory: str) -> tuple[np.ndarray, dict[str, Any], bool]:
  """(stream memmap, manifest, whether the cache was reused) of one source, cached in
  `directory`; rebuilds when the inputs changed. The manifest holds the SourceStats counts.
  Errors name `where`; for a prepared:OUT source, also a tokenizer that is not its shards'."""
  tokens_path, manifest_path = cache_files(directory)
  prepared = sources_lib.is_prepared(source)
  if prepared:
    from lm.prepare import shards  # pylint: disable=g-import-not-at-top
    out = source.partition(':')[2]
    shards_manifest = shards.read_manifest(out, where)
    shards.check_tokenizer(out, shards_manifest, tokenizer.path, where)
  key = dict(version=_CACHE_VERSION, source=source, text_field=data_config.text_field,
             max_chars=data_config.max_chars, seed=seed,
             source_fingerprint=sources_lib.source_fingerprint(source, where),
             tokenizer_sha256=_file_sha256(tokenizer.path))
  manifest = _read_json(manifest_path)
  if manifest is not None and manifest.get('key') == key and os.path.exists(tokens_path):
    stream = np.load(tokens_path, mmap_mode='r')
    if len(stream) == manifest['tokens']:
      return stream, manifest, True
  if prepared:
    logging.info('Packing the token shards of %s into %s', where, tokens_path)
    stream, source_stats = prepared_stream(out, shards_manifest, where, tokenizer, seed=seed,
                                           max_chars=data_config.max_chars)
  else:
    logging.info('Tokenizing %s into %s', where, tokens_path)
    source_stats = sources_lib.SourceStats()
    docs = sources_lib.iter_documents(source, data_config.text_field,
                                      max_chars=data_config.max_chars, drop_duplicates=True,
                                      stats=source_stats, where=where)
    stream = tokenize_documents(docs, tokenizer, seed=seed,
                                total_chars=data_config.max_chars or None)
  files_lib.write_atomically(tokens_path, lambda f: np.save(f, stream), mode='wb')
  manifest = dict(key=key, tokenizer=tokenizer.path, tokens=len(stream),
                  **dataclasses.asdict(source_stats))
  files_lib.write_atomically(manifest_path, lambda f: json.dump(manifest, f, indent=2))
  return np.load(tokens_path, mmap_mode='r'), manifest, False


# ---------------------------------------------------------------------------------------------
# The tokenizer: given, or trained on the corpus.


def cached_tokenizer(data_config, mixture: list[sources_lib.MixtureSource], vocab_size: int,
                     seed: int, workdir: str, user_symbols: tuple[str, ...] = ()
                     ) -> tuple[tokenizer_lib.Tokenizer, bool]:
  """(tokenizer, whether it was trained now): data.tokenizer; else, when a source is prepared:OUT,
  the tokenizer its shards were made with; else one trained on the corpus, with user_symbols as
  pieces of their own (an encoder's (tokenizer.MASK_PIECE,); part of the cache's key).

  For a mixture, the training text samples each source's share of data.tokenizer_train_chars
  (weight / sum of weights; all of a source smaller than its share).
  """
  if data_config.tokenizer:
    tokenizer = tokenizer_lib.Tokenizer(data_config.tokenizer)
    _check_vocab_size(vocab_size, tokenizer, f'data.tokenizer={data_config.tokenizer!r}')
    return tokenizer, False
  model_path = os.path.join(workdir, 'tokenizer', 'spm.model')
  manifest_path = os.path.join(workdir, 'tokenizer', 'manifest.json')
  prepared = [(s.where if mixture else f'data.source={s.source!r}', s.source.partition(':')[2])
              for s in mixture or [sources_lib.MixtureSource('', data_config.source, 1.0)]
              if sources_lib.is_prepared(s.source)]
  if prepared:
    return _shards_tokenizer(prepared, vocab_size, model_path, manifest_path), False
  key = dict(text_field=data_config.text_field, max_chars=data_config.max_chars,
             train_chars=data_config.tokenizer_train_chars, vocab_size=vocab_size, seed=seed)
  if user_symbols:  # Only then, so that the caches of models without any stay valid.
    key['user_symbols'] = list(user_symbols)
  if mixture:
    key['mixture'] = [dict(dataclasses.asdict(s),
                           source_fingerprint=sources_lib.source_fingerprint(s.source, s.where))
                      for s in mixture]
  else:
    key.update(source=data_config.source,
               source_fingerprint=sources_lib.source_fingerprint(data_config.source))
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
      docs = sources_lib.iter_documents(s.source, data_config.text_field,
                                        max_chars=data_config.max_chars, where=s.where)
      share = max(1, round(train_chars * s.weight / total_weight)) if train_chars > 0 else 0
      texts += tokenizer_lib.sample_texts(docs, share, sources_lib.source_seed(seed, s.name))
    train_chars = 0  # Sampled already.
  else:
    texts = sources_lib.iter_documents(data_config.source, data_config.text_field,
                                       max_chars=data_config.max_chars)
  tokenizer = tokenizer_lib.train_tokenizer(texts, vocab_size, model_path, max_chars=train_chars,
                                            seed=seed, user_symbols=user_symbols)
  files_lib.write_atomically(manifest_path, lambda f: json.dump(key, f, indent=2))
  return tokenizer, True


def _check_vocab_size(vocab_size: int, tokenizer: tokenizer_lib.Tokenizer, named: str) -> None:
  padded = tokenizer_lib.padded_vocab_size(tokenizer.vocab_size)
  if vocab_size not in (tokenizer.vocab_size, padded):
    raise sources_lib.DataError(
        f'model.vocab_size={vocab_size} but {named} has {tokenizer.vocab_size} pieces; set '
        f'model.vocab_size={tokenizer.vocab_size} (or {padded}, padded for faster matmuls).')


def _shards_tokenizer(prepared: list[tuple[str, str]], vocab_size: int, model_path: str,
                      manifest_path: str) -> tokenizer_lib.Tokenizer:
  """The tokenizer the shards of the prepared sources [(where, OUT)] were made with, copied to
  WORKDIR/tokenizer/spm.model (where the run's checkpoints find the tokenizer they need)."""
  from lm.prepare import shards  # pylint: disable=g-import-not-at-top
  found = []  # (where, path, sha256)
  for where, out in prepared:
    manifest = shards.read_manifest(out, where)
    found.append((where, shards.shards_tokenizer(out, manifest, where),
                  manifest['tokenizer_sha256']))
  where, path, sha256 = found[0]
  for other, other_path, other_sha256 in found[1:]:
    if other_sha256 != sha256:
      raise sources_lib.DataError(
          f'{where} was prepared with the tokenizer {path!r} and {other} with another one, '
          f'{other_path!r}; a run tokenizes with one: prepare both with the same '
          'config.tokenize.tokenizer')
  tokenizer = tokenizer_lib.Tokenizer(path)
  _check_vocab_size(vocab_size, tokenizer, f'the tokenizer of {where}, {path!r},')
  key = dict(prepared=[dict(where=w, tokenizer=p, tokenizer_sha256=h) for w, p, h in found])
  if not (os.path.exists(model_path) and _file_sha256(model_path) == sha256):
    if os.path.exists(model_path):
      logging.warning('Replacing %s with the tokenizer of %s, %s: checkpoints in this workdir '
                      'that used the old one no longer match the tokens.', model_path, where, path)
    with open(path, 'rb') as f:
      model = f.read()
    files_lib.write_atomically(model_path, lambda f: f.write(model), mode='wb')
  if _read_json(manifest_path) != key:
    files_lib.write_atomically(manifest_path, lambda f: json.dump(key, f, indent=2))
  return tokenizer_lib.Tokenizer(model_path)
