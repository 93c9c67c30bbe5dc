"""lm.prepare's token shards: their format, their manifest, and reading them back.

  OUT/tokens/LANGUAGE/TASK-PART.array_record   the kept documents of one task and language, one
                                               record per document, in input order
  OUT/tokens/manifest.json                     the tokenizer (path and SHA-256), documents, tokens
                                               and characters per language, and every shard with
                                               its counts and SHA-256; written last

A record is the bytes
  n (uint32, little-endian) | n bytes of UTF-8 JSON {"id", "language", "chars"} | token ids
the ids without BOS or EOS, little-endian, of the manifest's dtype (uint16 for a tokenizer of at
most 65,536 pieces, else uint32); chars is the length of the document's text in characters.
Shards are ArrayRecord files with group_size 1 (any record is read alone), the files grain reads:
data_source(OUT) is a grain.sources.ArrayRecordDataSource over all of them, and decode_record
turns one of its records into a Record. Training reads them with data.source='prepared:OUT'
(lm/token_cache.py frames, shuffles and splits them like any source, without tokenizing), and
lm.sources.iter_documents('prepared:OUT') decodes them back to the documents' text.

This module imports neither datatrove nor JAX: the training side reads shards with it too.
"""

from collections.abc import Iterator
import glob
import hashlib
import json
import os
import struct
from typing import Any, NamedTuple

import numpy as np

from lm import files
from lm.sources import DataError

SHARDS = 'tokens'  # OUT/tokens/.
MANIFEST = 'manifest.json'
FORMAT, VERSION = 'lm.prepare token shards', 1
OPTIONS = 'group_size:1'  # ArrayRecord writer options: one record per chunk, for random access.
RECORD_LAYOUT = ('uint32 little-endian n | n bytes of UTF-8 JSON {"id", "language", "chars"} | '
                 'token ids without BOS or EOS, little-endian, of dtype')
_HEADER = struct.Struct('<I')
_READ_RECORDS = 4096  # Records read from a shard per call.


class Record(NamedTuple):
  """One document of a shard."""
  id: str
  language: str
  chars: int  # Characters of its text.
  ids: np.ndarray  # Its token ids, [tokens], of the manifest's dtype.


def token_dtype(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 2**16 else 'uint32'


def encode_record(doc_id: str, language: str, chars: int, ids, dtype: str) -> bytes:
  header = json.dumps(dict(id=doc_id, language=language, chars=chars),
                      ensure_ascii=False).encode('utf-8')
  ids = np.asarray(ids, np.dtype(dtype).newbyteorder('<'))
  return _HEADER.pack(len(header)) + header + ids.tobytes()


def decode_record(data: bytes, dtype: str) -> Record:
  """The Record of encode_record's bytes; DataError if they are not one."""
  try:
    (n,) = _HEADER.unpack_from(data)
    header = json.loads(data[_HEADER.size:_HEADER.size + n].decode('utf-8'))
    ids = np.frombuffer(data, np.dtype(dtype).newbyteorder('<'), offset=_HEADER.size + n)
    return Record(str(header['id']), str(header['language']), int(header['chars']), ids)
  except (struct.error, ValueError, KeyError, TypeError) as e:
    raise DataError(f'not a record of lm.prepare token shards ({e})') from e


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _array_record():
  try:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError('token shards are ArrayRecord files, which need the array_record package '
                    '(installed with grain): pip install array_record') from e
  return array_record_module


# ---------------------------------------------------------------------------------------------
# Writing (lm/prepare/tokens.py's steps, then the pipeline's manifest).


class ShardWriter:
  """One task's shards of one language: OUT/tokens/LANGUAGE/TASK-PART.array_record, a new part
  once a part holds shard_tokens tokens (0: one part). Each part is written under a hidden
  temporary name and renamed when whole, so a killed task leaves no shard that looks finished."""

  def __init__(self, out: str, language: str, rank: int, dtype: str, shard_tokens: int):
    self.out, self.language, self.rank = out, language, rank
    self.dtype, self.shard_tokens = dtype, shard_tokens
    self.shards = []  # The finished parts' entries of the manifest.
    self._writer, self._part, self._counts = None, 0, {}

  def write(self, doc_id: str, chars: int, ids) -> None:
    if self._writer is None:
      os.makedirs(os.path.dirname(self._path()), exist_ok=True)
      self._writer = _array_record().ArrayRecordWriter(self._tmp(), OPTIONS)
      self._counts = dict(documents=0, tokens=0, chars=0)
    self._writer.write(encode_record(doc_id, self.language, chars, ids, self.dtype))
    self._counts['documents'] += 1
    self._counts['tokens'] += len(ids)
    self._counts['chars'] += chars
    if self.shard_tokens and self._counts['tokens'] >= self.shard_tokens:
      self._finish()

  def close(self) -> list[dict[str, Any]]:
    """Finishes the last part; returns every part's manifest entry."""
    if self._writer is not None:
      self._finish()
    return self.shards

  def _path(self) -> str:
    return os.path.join(self.out, SHARDS, self.language,
                        f'{self.rank:05d}-{self._part:04d}.array_record')

  def _tmp(self) -> str:
    return os.path.join(os.path.dirname(self._path()), f'.{os.path.basename(self._path())}.tmp')

  def _finish(self) -> None:
    self._writer.close()
    self._writer = None
    tmp, path = self._tmp(), self._path()
    entry = dict(path=os.path.relpath(path, self.out), language=self.language, **self._counts,
                 bytes=os.path.getsize(tmp), sha256=file_sha256(tmp))
    os.replace(tmp, path)
    self.shards.append(entry)
    self._part += 1


def remove_task_files(out: str, rank: int) -> None:
  """Deletes the shards (whole or temporary) that an earlier attempt of task `rank` left."""
  for pattern in (f'{rank:05d}-*.array_record', f'.{rank:05d}-*.array_record.tmp'):
    for path in glob.glob(os.path.join(out, SHARDS, '*', pattern)):
      os.remove(path)


def write_manifest(out: str, *, tokenizer: str, tokenizer_sha256: str, vocab_size: int,
                   bos_id: int, eos_id: int, dtype: str, shards: list[dict]) -> dict:
  """Writes OUT/tokens/manifest.json from every shard's entry; returns it.

  `tokenizer` is recorded relative to OUT when it lies inside OUT (a trained one), so the folder
  can be moved; otherwise as an absolute path.
  """
  shards = sorted(shards, key=lambda s: s['path'])
  languages = {}
  for shard in shards:
    counts = languages.setdefault(shard['language'], dict(documents=0, tokens=0, chars=0,
                                                          shards=0))
    for key in ('documents', 'tokens', 'chars'):
      counts[key] += shard[key]
    counts['shards'] += 1
  tokenizer = os.path.abspath(tokenizer)
  inside = os.path.relpath(tokenizer, os.path.abspath(out))
  manifest = dict(
      format=FORMAT, version=VERSION, record=RECORD_LAYOUT, dtype=dtype,
      array_record_options=OPTIONS,
      tokenizer=tokenizer if inside.startswith(os.pardir) else inside,
      tokenizer_sha256=tokenizer_sha256, vocab_size=vocab_size, bos_id=bos_id, eos_id=eos_id,
      **{key: sum(s[key] for s in shards) for key in ('documents', 'tokens', 'chars')},
      languages=dict(sorted(languages.items())), shards=shards)
  files.write_atomically(manifest_path(out),
                         lambda f: json.dump(manifest, f, indent=1, ensure_ascii=False),
                         encoding='utf-8')
  return manifest


# ---------------------------------------------------------------------------------------------
# Reading.


def manifest_path(out: str) -> str:
  return os.path.join(out, SHARDS, MANIFEST)


def read_manifest(out: str, where: str) -> dict:
  """OUT's manifest, checked; DataError naming `where` and the file if it is missing or bad."""
  path = manifest_path(out)
  if not os.path.isfile(path):
    raise DataError(f'{where}: no {path}; expected the output folder of `python -m lm.prepare` '
                    '(with config.tokenize.enabled) whose run has finished (a killed run writes '
                    'it when started again with the same --workdir)')
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f'{where}: {path} is not a JSON manifest ({e})') from e
  fields = ('dtype', 'tokenizer', 'tokenizer_sha256', 'documents', 'tokens', 'shards')
  if (not isinstance(manifest, dict) or manifest.get('format') != FORMAT
      or any(field not in manifest for field in fields)):
    raise DataError(f'{where}: {path} is not a manifest of lm.prepare token shards (expected '
                    f'format={FORMAT!r} and the fields {list(fields)})')
  if manifest.get('version') != VERSION:
    raise DataError(f'{where}: {path} is of version {manifest.get("version")!r}; this lm reads '
                    f'version {VERSION}: prepare the data again')
  return manifest


def manifest_sha256(out: str, where: str) -> str:
  """Changes whenever the shards do (the manifest holds their checksums)."""
  read_manifest(out, where)
  return file_sha256(manifest_path(out))


def tokenizer_path(out: str, manifest: dict) -> str:
  """The tokenizer the shards were made with (a path relative to OUT, or absolute)."""
  return os.path.join(out, manifest['tokenizer'])


def check_tokenizer(out: str, manifest: dict, path: str, where: str) -> None:
  """Raises DataError, naming both files, unless `path` is the tokenizer the shards were made
  with (the same bytes: a copy under another name passes)."""
  theirs = tokenizer_path(out, manifest)
  if file_sha256(path) != manifest['tokenizer_sha256']:
    raise DataError(
        f'{where}: its shards were made with the tokenizer {theirs!r} (sha256 '
        f'{manifest["tokenizer_sha256"][:16]}...), but this run tokenizes with {path!r}, another '
        f'one (sha256 {file_sha256(path)[:16]}...). Train with data.tokenizer={theirs!r}, or '
        "empty to use it, or prepare the data again with config.tokenize.tokenizer set to "
        f'{path!r}')


def shards_tokenizer(out: str, manifest: dict, where: str) -> str:
  """tokenizer_path, checked to exist and to be the one the shards were made with."""
  path = tokenizer_path(out, manifest)
  if not os.path.isfile(path) or file_sha256(path) != manifest['tokenizer_sha256']:
    raise DataError(
        f'{where}: its shards were made with the tokenizer {path!r} (sha256 '
        f'{manifest["tokenizer_sha256"][:16]}...), which '
        f'{"has changed since" if os.path.isfile(path) else "no longer exists"}; set '
        'data.tokenizer to a copy of the original')
  return path


def shard_paths(out: str, manifest: dict) -> list[str]:
  return [os.path.join(out, shard['path']) for shard in manifest['shards']]


def iter_records(out: str, manifest: dict, where: str) -> Iterator[Record]:
  """Every record of every shard, in the manifest's order. Each shard is checked against the
  manifest (its SHA-256, then its record count) before any of its records is yielded."""
  for shard, path in zip(manifest['shards'], shard_paths(out, manifest)):
    if not os.path.isfile(path):
      raise DataError(f'{where}: the shard {path} of {manifest_path(out)} is missing')
    if file_sha256(path) != shard['sha256']:
      raise DataError(f'{where}: the shard {path} is corrupt or was changed after '
                      f'{manifest_path(out)} was written (its SHA-256 differs); prepare the data '
                      'again')
    reader = _array_record().ArrayRecordReader(path)
    try:
      if reader.num_records() != shard['documents']:
        raise DataError(f'{where}: the shard {path} holds {reader.num_records()} records, but '
                        f'{manifest_path(out)} lists {shard["documents"]}')
      for start in range(0, shard['documents'], _READ_RECORDS):
        for data in reader.read(start, min(start + _READ_RECORDS, shard['documents'])):
          try:
            yield decode_record(data, manifest['dtype'])
          except DataError as e:
            raise DataError(f'{where}: the shard {path}: {e}') from e
    finally:
      reader.close()


def data_source(out: str, where: str = ''):
  """All of OUT's records, in the manifest's order, as a grain random-access source of bytes
  (decode_record(record, manifest['dtype']) reads one)."""
  import grain  # pylint: disable=g-import-not-at-top
  manifest = read_manifest(out, where or f'prepared:{out}')
  return grain.sources.ArrayRecordDataSource(shard_paths(out, manifest))


def iter_texts(out: str, where: str) -> Iterator[str]:
  """The documents' text, decoded with the shards' own tokenizer, in the manifest's order."""
  from lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  manifest = read_manifest(out, where)
  tokenizer = tokenizer_lib.Tokenizer(shards_tokenizer(out, manifest, where))
  for record in iter_records(out, manifest, where):
    yield tokenizer.decode(record.ids)
