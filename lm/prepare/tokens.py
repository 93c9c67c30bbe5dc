"""Stage 6: the kept documents as token ids, in the shards lm/prepare/shards.py describes.

Two datatrove passes after the final one:
  tokenizer  (1 task; only when config.tokenize.tokenizer is empty)  TrainTokenizer: a
             SentencePiece model trained on a sample of the kept documents the way training trains
             one on its corpus (lm.tokenizer.train_tokenizer), into OUT/tokenizer/spm.model;
  tokens     (tasks)  Tokenize: task RANK encodes OUT/documents/*/RANK.jsonl into
             OUT/tokens/LANGUAGE/RANK-PART.array_record and lists those shards in
             WORK/records/tokenize/RANK.shards.json.
A task first deletes whatever an earlier attempt of it left, and each shard appears under its
name only when whole, so a killed run started again writes every shard exactly once. The
pipeline then checks the tasks' lists against the files and writes OUT/tokens/manifest.json
(write_manifest).
"""

from collections.abc import Iterator
import glob
import heapq
import json
import os

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
import ml_collections

from lm import sources
from lm import tokenizer as tokenizer_lib
from lm.prepare import config as config_lib
from lm.prepare import records
from lm.prepare import shards

_CHUNK_CHARS = 4_000_000  # Characters handed to SentencePiece per encode call (as training's).


def kept_documents(folder: str) -> Iterator[Document]:
  """Every document of FOLDER/LANGUAGE/RANK.jsonl, in input order (whatever the tasks were)."""
  streams = [records.read_documents(path)
             for path in sorted(glob.glob(os.path.join(folder, '*', '?????.jsonl')))]
  return heapq.merge(*streams, key=lambda doc: doc.metadata['order'])


class TrainTokenizer(PipelineStep):
  """Trains the tokenizer of config.tokenize (vocab_size, train_chars, seed) on the kept documents,
  sampled as lm.tokenizer.sample_texts samples a training corpus."""

  type = 'lm.prepare'
  name = 'train tokenizer'

  def __init__(self, documents: str, model_path: str, cfg: ml_collections.ConfigDict):
    super().__init__()
    self.documents, self.model_path = documents, model_path
    self.vocab_size, self.train_chars, self.seed = cfg.vocab_size, cfg.train_chars, cfg.seed

  def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
    texts = (doc.text for doc in kept_documents(self.documents))
    try:
      tokenizer_lib.train_tokenizer(texts, self.vocab_size, self.model_path,
                                    max_chars=self.train_chars, seed=self.seed)
    except tokenizer_lib.TokenizerError as e:
      raise tokenizer_lib.TokenizerError(
          str(e).replace('model.vocab_size', 'config.tokenize.vocab_size')
          .replace('the tokenizer training text', 'the kept documents')) from e


class KeptDocuments(PipelineStep):
  """Task RANK's kept documents, FOLDER/LANGUAGE/RANK.jsonl, one language after another."""

  type = 'lm.prepare'
  name = 'read kept documents'

  def __init__(self, folder: str):
    super().__init__()
    self.folder = folder

  def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
    for path in sorted(glob.glob(os.path.join(self.folder, '*', f'{rank:05d}.jsonl'))):
      yield from records.read_documents(path)


class Tokenize(records.Stage):
  """Encodes each document with the tokenizer and writes it to its language's shard (keeping all;
  the record counts tokens per language as well)."""

  name = 'tokenize'

  def __init__(self, folder: str, out: str, tokenizer: str, shard_tokens: int):
    super().__init__(folder)
    self.out, self.tokenizer, self.shard_tokens = out, tokenizer, shard_tokens

  def run(self, data, rank: int = 0, world_size: int = 1) -> None:
    tokenizer = tokenizer_lib.Tokenizer(self.tokenizer)
    dtype = shards.token_dtype(tokenizer.vocab_size)
    shards.remove_task_files(self.out, rank)
    writers = {}
    with self.recording(rank) as record:
      for chunk in _chunks(data):
        with record.timed():
          ids = tokenizer.encode_batch([doc.text for doc in chunk])
        for doc, doc_ids in zip(chunk, ids):
          record.seen(doc)
          language = doc.metadata.get('language', 'und')
          if language not in writers:
            writers[language] = shards.ShardWriter(self.out, language, rank, dtype,
                                                   self.shard_tokens)
          with record.timed():
            writers[language].write(doc.id, len(doc.text), doc_ids)
          record.kept(doc)
          record.tokens(doc, len(doc_ids))
      with record.timed():
        written = [entry for language in sorted(writers) for entry in writers[language].close()]
      with records.atomic_open(os.path.join(self.folder, self.name,
                                            f'{rank:05d}.shards.json')) as f:
        json.dump(dict(tokenizer_sha256=shards.file_sha256(self.tokenizer), shards=written), f,
                  ensure_ascii=False)


def _chunks(docs: Iterator[Document]) -> Iterator[list[Document]]:
  """Consecutive documents holding about _CHUNK_CHARS characters together."""
  docs = iter(docs)
  while True:
    chunk, chars = [], 0
    for doc in docs:
      chunk.append(doc)
      chars += len(doc.text)
      if chars >= _CHUNK_CHARS:
        break
    if not chunk:
      return
    yield chunk


def write_manifest(out: str, folder: str, logs: str, tasks: int, tokenizer_path: str) -> dict:
  """OUT/tokens/manifest.json from the tasks' shard lists, after checking that every listed shard
  is on disk at its size and was made with `tokenizer_path` as it is now."""
  tokenizer = tokenizer_lib.Tokenizer(tokenizer_path)
  sha256 = shards.file_sha256(tokenizer_path)
  entries = []
  for rank in range(tasks):
    path = os.path.join(folder, Tokenize.name, f'{rank:05d}.shards.json')
    marker = os.path.join(logs, 'completions', f'{rank:05d}')
    with open(path, encoding='utf-8') as f:
      listed = json.load(f)
    if listed['tokenizer_sha256'] != sha256:
      raise sources.DataError(
          f'the tokenizer {tokenizer_path} changed after task {rank} of the tokens pass used it; '
          f'delete {os.path.join(out, shards.SHARDS)} and {logs} to tokenize again')
    for entry in listed['shards']:
      shard = os.path.join(out, entry['path'])
      if not os.path.isfile(shard) or os.path.getsize(shard) != entry['bytes']:
        raise sources.DataError(
            f'{shard}, written by task {rank} of the tokens pass, is '
            f'{"missing" if not os.path.isfile(shard) else "not the size it was written at"}; '
            f'delete {marker} and run again to write that task\'s shards again')
    entries += listed['shards']
  return shards.write_manifest(
      out, tokenizer=tokenizer_path, tokenizer_sha256=sha256, vocab_size=tokenizer.vocab_size,
      bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
      dtype=shards.token_dtype(tokenizer.vocab_size), shards=entries)


def check_tokenizer(path: str) -> None:
  """Raises (naming config.tokenize.tokenizer) unless `path` is a model training can pack with."""
  if not os.path.isfile(path):
    raise config_lib.ConfigError(
        f'config.tokenize.tokenizer={path!r}: no such file; expected a SentencePiece .model '
        '(or empty, to train one on the kept documents)')
  try:
    tokenizer = tokenizer_lib.Tokenizer(path)
  except tokenizer_lib.TokenizerError as e:
    raise tokenizer_lib.TokenizerError(f'config.tokenize.tokenizer={path!r}: {e}') from e
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise tokenizer_lib.TokenizerError(
        f'config.tokenize.tokenizer={path!r} has no BOS or EOS piece (bos_id={tokenizer.bos_id}, '
        f'eos_id={tokenizer.eos_id}); training frames each document with both')

