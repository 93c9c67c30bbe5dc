"""Reading the inputs as datatrove Documents, each with an id and a place in the input order.

A document's place is `order` = [input index, slot], slot counting the documents of its input
(files of a text: source, non-blank lines of jsonl:, examples of tfds:). Task `rank` of `world`
reads the slots with slot % world == rank, so every task's share is a fixed function of the input
and the number of tasks, and results sorted by `order` do not depend on either.
"""

from collections.abc import Callable, Iterator
import json
import os

from datatrove.data import Document

from lm import sources
from lm.prepare import records

_Slot = tuple[str, Callable[[], tuple[dict, bool]]]  # (location, read() -> (record, non_utf8)).


class SourceReader(records.Stage):
  """The first step: yields the documents of task `rank`'s slots; writes [order, id] of each
  to read/RANK.ids.jsonl, and drops empty ones."""

  name = 'read'

  def __init__(self, inputs: list[tuple[str, str]], text_field: str, id_field: str, folder: str):
    super().__init__(folder)
    self.inputs, self.text_field, self.id_field = inputs, text_field, id_field

  def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
    ids_path = os.path.join(self.folder, self.name, f'{rank:05d}.ids.jsonl')
    with self.recording(rank) as record, records.atomic_open(ids_path) as ids:
      for input_index, (name, source) in enumerate(self.inputs):
        for slot, (location, read) in enumerate(_slots(source)):
          if slot % world_size != rank:
            continue
          fields, non_utf8 = read()
          text = fields.get(self.text_field)
          if not isinstance(text, str):
            raise sources.DataError(f'{location}: no string field text_field={self.text_field!r} '
                                    f'(found {sorted(fields)}).')
          doc_id = fields.get(self.id_field)
          record.count('non_utf8_documents', non_utf8)
          record.count('assigned_ids', doc_id is None)
          doc = Document(text=text, id=location if doc_id is None else str(doc_id),
                         metadata=dict(order=[input_index, slot], input=name, language='und'))
          ids.write(json.dumps([doc.metadata['order'], doc.id], ensure_ascii=False) + '\n')
          record.seen(doc)
          if not text.strip():
            record.dropped(doc, 'empty')
            continue
          record.kept(doc)
          yield doc


def _slots(source: str) -> Iterator[_Slot]:
  """Every document slot of `source`, in order; reading one is deferred, so a task skips the
  slots of others cheaply (a jsonl line is split off but not parsed)."""
  kind, _, arg = source.partition(':')
  where = f'source {source!r}'
  if source == 'stdlib' or kind == 'text':
    paths = sources.stdlib_files() if source == 'stdlib' else sources._glob(arg, where)  # pylint: disable=protected-access
    for path in paths:
      yield path, lambda path=path: _text_file(path)
  elif kind == 'jsonl':
    for path in sources._glob(arg, where):  # pylint: disable=protected-access
      with open(path, 'rb') as f:
        for line_number, line in enumerate(f, start=1):
          if line.strip():
            yield f'{path}:{line_number}', lambda loc=f'{path}:{line_number}', line=line: (
                _json_line(loc, line))
  elif kind == 'tfds':
    yield from _tfds_slots(arg)
  else:
    raise sources.DataError(f'{where} is not a valid source')


def _text_file(path: str) -> tuple[dict, bool]:
  with open(path, 'rb') as f:
    text, non_utf8 = sources._decode(f.read())  # pylint: disable=protected-access
  return {'text': text}, non_utf8


def _json_line(location: str, line: bytes) -> tuple[dict, bool]:
  text, non_utf8 = sources._decode(line)  # pylint: disable=protected-access
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise sources.DataError(f'{location}: not a JSON line ({e}).') from e
  if not isinstance(record, dict):
    raise sources.DataError(f'{location}: a JSON {type(record).__name__}, not an object of fields')
  for key, value in record.items():
    if isinstance(value, str):
      try:
        value.encode('utf-8')
      except UnicodeEncodeError:  # Lone surrogates written as \udXXX escapes.
        record[key], non_utf8 = value.encode('utf-8', errors='replace').decode('utf-8'), True
  return record, non_utf8


def _tfds_slots(arg: str) -> Iterator[_Slot]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # Slow import.
  name, _, split = arg.partition(':')
  examples = tfds.data_source(name, split=split or 'train')

  def read(index: int) -> tuple[dict, bool]:
    record, non_utf8 = {}, False
    for key, value in examples[index].items():
      value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
      if isinstance(value, bytes):
        value, bad = sources._decode(value)  # pylint: disable=protected-access
        non_utf8 |= bad
      record[key] = value
    return record, non_utf8

  for index in range(len(examples)):
    yield f'tfds:{arg} example {index}', lambda index=index: read(index)


def check_readable(inputs: list[tuple[str, str]]) -> None:
  """Raises DataError for an input whose files are missing, before any task starts."""
  for name, source in inputs:
    kind, _, arg = source.partition(':')
    if kind in ('text', 'jsonl'):
      sources._glob(arg, f'config input {name}={source!r}')  # pylint: disable=protected-access
    elif kind == 'prepared':
      raise sources.DataError(
          f'config input {name}={source!r} is the output of lm.prepare (token shards), not an '
          f'input it reads; its documents are jsonl:{arg}/documents/*/*.jsonl')
    elif source != 'stdlib' and kind != 'tfds':
      raise sources.DataError(f'config input {name}={source!r} is not a valid source')
