"""Where documents come from: data.source and data.mixture specs, read as strings.

Parsing a spec reads no files, and this module imports nothing beyond the standard library, so
config.validate can check data.mixture without loading the data pipeline (lm/data.py).
"""

from collections.abc import Iterable, Iterator
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
import zlib

_SOURCE_FORMS = ("'stdlib', 'text:GLOB', 'jsonl:GLOB', 'tfds:NAME[:SPLIT]' (e.g. 'tfds:lm1b', "
                 "'tfds:wiki40b/hi:train'), 'prepared:DIR' (token shards of lm.prepare)")
PREPARED = 'prepared'  # The kind of 'prepared:DIR' sources: `python -m lm.prepare --workdir DIR`.


class DataError(ValueError):
  """A source, corpus or cache lm cannot train on (no files, no text, a bad line, too few
  tokens for a batch); the message names it."""


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
  name `where` (default: data.source=SOURCE). A prepared:DIR source (lm.prepare's token shards)
  yields its documents decoded with the shards' own tokenizer; training packs its ids instead.
  """
  where = where or f'data.source={source!r}'
  check_source(source, where)
  kind, _, arg = source.partition(':')
  if source == 'stdlib':
    raw = (_decode(_read_bytes(path)) for path in stdlib_files())
  elif kind == 'text':
    raw = (_decode(_read_bytes(path)) for path in _glob(arg, where))
  elif kind == 'jsonl':
    raw = _jsonl_documents(_glob(arg, where), text_field)
  elif kind == PREPARED:
    raw = _prepared_documents(arg, where)
  else:
    raw = _tfds_documents(arg, text_field)
  return _counted(raw, where, max_chars, drop_duplicates,
                  stats if stats is not None else SourceStats())


def check_source(source: str, where: str = '') -> None:
  """Raises ValueError, naming `where`, unless `source` has a form iter_documents reads. Reads no
  files: a glob that matches nothing passes here and fails when read."""
  kind, _, arg = source.partition(':')
  if source != 'stdlib' and not (kind in ('text', 'jsonl', 'tfds', PREPARED) and arg):
    raise DataError(f'{where or f"data.source={source!r}"} is not a valid source; expected one '
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
    raise DataError(f'{where} holds no text: {stats.empty_documents} documents, all empty.')


def _glob(pattern: str, where: str) -> list[str]:
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise DataError(f'{where}: no files match {pattern!r}.')
  return paths


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def stdlib_files() -> list[str]:
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
          raise DataError(f'{path}:{line_number}: not a JSON line ({e}).') from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
          found = sorted(record) if isinstance(record, dict) else type(record).__name__
          raise DataError(f'{path}:{line_number}: no string field data.text_field='
                           f'{text_field!r} (found {found}).')
        text = record[text_field]
        try:
          text.encode('utf-8')
        except UnicodeEncodeError:  # Lone surrogates written as \udXXX escapes.
          text, non_utf8 = text.encode('utf-8', errors='replace').decode('utf-8'), True
        yield text, non_utf8


def _tfds_documents(arg: str, text_field: str) -> Iterator[tuple[str, bool]]:
  """Reads with tfds.data_source (random access over array_record files; TensorFlow not needed)."""
  # pylint: disable=g-import-not-at-top
  import numpy as np  # Loaded by tensorflow_datasets anyway.
  import tensorflow_datasets as tfds  # Slow import.
  name, _, split = arg.partition(':')
  examples = tfds.data_source(name, split=split or 'train')
  for index in range(len(examples)):
    example = examples[index]
    if text_field not in example:
      raise DataError(f'tfds:{arg} example {index} has no field data.text_field={text_field!r} '
                       f'(found {sorted(example)}).')
    text = example[text_field]
    yield _decode(text.item() if isinstance(text, np.ndarray) else text)


def _prepared_documents(directory: str, where: str) -> Iterator[tuple[str, bool]]:
  """The documents of lm.prepare's token shards in DIR, decoded with their own tokenizer."""
  from lm.prepare import shards  # pylint: disable=g-import-not-at-top  # numpy, array_record.
  for text in shards.iter_texts(directory, where):
    yield text, False


def is_prepared(source: str) -> bool:
  """Whether `source` is 'prepared:DIR': token ids already, which training packs as they are."""
  return source.partition(':')[0] == PREPARED


def prepared_sources(data_config) -> list[str]:
  """The prepared:OUT sources of config.data (data.source, or each of data.mixture's)."""
  entries = (parse_mixture(data_config.mixture) if data_config.mixture
             else [MixtureSource('', data_config.source, 1.0)])
  return [e.source for e in entries if is_prepared(e.source)]


def iter_records(source: str, where: str = '') -> Iterator[tuple[str, dict]]:
  """Yields (location, record) for each example of a jsonl:GLOB or tfds:NAME[:SPLIT] source: the
  structured data of post-training (prompt, response, chosen, ...), bytes decoded to str.
  `location` ('PATH:LINE', 'tfds:NAME example I') names the example in error messages."""
  where = where or f'source {source!r}'
  kind, _, arg = source.partition(':')
  if kind not in ('jsonl', 'tfds') or not arg:
    raise DataError(f'{where} is not a source of records; expected jsonl:GLOB or '
                    'tfds:NAME[:SPLIT]')
  if kind == 'jsonl':
    for path in _glob(arg, where):
      with open(path, 'rb') as f:
        for line_number, line in enumerate(f, start=1):
          if not line.strip():
            continue
          try:
            record = json.loads(_decode(line)[0])
          except json.JSONDecodeError as e:
            raise DataError(f'{path}:{line_number}: not a JSON line ({e}).') from e
          if not isinstance(record, dict):
            raise DataError(f'{path}:{line_number}: a JSON {type(record).__name__}, not an '
                            'object of fields')
          yield f'{path}:{line_number}', record
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, _, split = arg.partition(':')
  examples = tfds.data_source(name, split=split or 'train')
  for index in range(len(examples)):
    record = {}
    for key, value in examples[index].items():
      value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
      record[key] = _decode(value)[0] if isinstance(value, bytes) else value
    yield f'tfds:{arg} example {index}', record


def source_fingerprint(source: str, where: str = '') -> str:
  """Changes when the files behind a local source change (paths, sizes, modification times; for
  prepared:DIR, its manifest, which holds the shards' checksums)."""
  kind, _, arg = source.partition(':')
  if source == 'stdlib':
    return f'{sys.version} {sysconfig.get_paths()["stdlib"]}'
  if kind == PREPARED:
    from lm.prepare import shards  # pylint: disable=g-import-not-at-top
    return shards.manifest_sha256(arg, where or f'data.source={source!r}')
  if kind not in ('text', 'jsonl'):
    return ''
  digest = hashlib.sha256()
  for path in _glob(arg, where or f'data.source={source!r}'):
    stat = os.stat(path)
    digest.update(f'{os.path.abspath(path)} {stat.st_size} {stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


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
    raise DataError(f'config.data.mixture={text!r} holds no entries; expected '
                     "'NAME=SOURCE@WEIGHT; ...', or empty to use data.source alone.")
  return sources


def source_seed(seed: int, name: str) -> int:
  """A seed of its own for each source of a mixture, stable under reordering the entries."""
  return zlib.crc32(f'{seed}:{name}'.encode())
