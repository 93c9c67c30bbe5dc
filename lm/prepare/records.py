"""What each stage did to each document, recorded per task, and the files documents pass through.

A stage's task writes STAGE/RANK.jsonl (one line per document it removed: order, id, language,
reason, words, bytes) and STAGE/RANK.json (documents, words and bytes in and out per language,
tokens out too for the tokenize stage; seconds, counters), each renamed into place when the task
ends: a killed task leaves nothing that a restarted one could add to twice. decisions.jsonl and report.json are built from them.
"""

from collections.abc import Iterator
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from lm.prepare import words


@contextlib.contextmanager
def atomic_open(path: str) -> Iterator[Any]:
  """A text file that appears at `path` whole when the block ends, or not at all."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


def _counts() -> dict[str, int]:
  return dict(documents_in=0, documents_out=0, words_in=0, words_out=0, bytes_in=0, bytes_out=0)


@dataclasses.dataclass
class Recorder:
  """One task's record of one stage."""
  drops: Any  # The open RANK.jsonl.
  languages: dict = dataclasses.field(default_factory=dict)
  counters: dict = dataclasses.field(default_factory=dict)
  seconds: float = 0.0
  _in: tuple[int, int] = (0, 0)

  def seen(self, doc: Document) -> None:
    """Measures a document as it enters the stage."""
    self._in = (words.count(doc.text), len(doc.text.encode('utf-8', 'replace')))

  def _add(self, doc: Document, kept: bool) -> dict:
    totals = self.languages.setdefault(doc.metadata.get('language', 'und'), _counts())
    totals['documents_in'] += 1
    totals['words_in'] += self._in[0]
    totals['bytes_in'] += self._in[1]
    if kept:
      totals['documents_out'] += 1
      totals['words_out'] += words.count(doc.text)
      totals['bytes_out'] += len(doc.text.encode('utf-8', 'replace'))
    return totals

  def kept(self, doc: Document) -> None:
    self._add(doc, True)

  def dropped(self, doc: Document, reason: str) -> None:
    self._add(doc, False)
    self.drops.write(json.dumps(dict(
        order=doc.metadata['order'], id=doc.id, language=doc.metadata.get('language', 'und'),
        reason=reason, words=self._in[0], bytes=self._in[1]), ensure_ascii=False) + '\n')

  def tokens(self, doc: Document, n: int) -> None:
    """Adds a kept document's n tokens to its language's tokens_out (the tokenize stage's)."""
    totals = self.languages[doc.metadata.get('language', 'und')]
    totals['tokens_out'] = totals.get('tokens_out', 0) + n

  def count(self, name: str, value: int = 1) -> None:
    self.counters[name] = self.counters.get(name, 0) + int(value)

  @contextlib.contextmanager
  def timed(self) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds += time.perf_counter() - start


class Stage(PipelineStep):
  """A datatrove step that decides, per document, to keep it (maybe changed) or drop it, and
  records both. Subclasses set `name` (the stage of decisions.jsonl) and define decide()."""

  type = 'lm.prepare'
  name = ''

  def __init__(self, folder: str, name: str = ''):
    self.name = name or self.name  # Before datatrove's __init__, which labels the step's stats.
    super().__init__()
    self.folder = folder  # WORK/records: each stage writes under folder/NAME/.

  def setup(self, rank: int) -> None:
    """Loads what decide() needs, once per task (models, indexes), after the step is shipped."""

  def decide(self, doc: Document) -> tuple[bool, str | None]:
    """(kept, reason for dropping); may change doc.text and doc.metadata."""
    raise NotImplementedError

  @contextlib.contextmanager
  def recording(self, rank: int) -> Iterator[Recorder]:
    directory = os.path.join(self.folder, self.name)
    with atomic_open(os.path.join(directory, f'{rank:05d}.jsonl')) as drops:
      record = Recorder(drops)
      yield record
    summary = dict(languages=record.languages, counters=record.counters, seconds=record.seconds)
    with atomic_open(os.path.join(directory, f'{rank:05d}.json')) as f:
      json.dump(summary, f, ensure_ascii=False)

  def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
    self.setup(rank)
    with self.recording(rank) as record:
      for doc in data:
        record.seen(doc)
        with record.timed():
          kept, reason = self.decide(doc)
        if kept:
          record.kept(doc)
          yield doc
        else:
          record.dropped(doc, reason or 'dropped')
        self.count(record, doc)

  def count(self, record: Recorder, doc: Document) -> None:
    """Adds stage-specific counters for `doc` (e.g. PII replacements)."""


# ---------------------------------------------------------------------------------------------
# Documents between passes: FOLDER/RANK.jsonl, one {"id", "text", "metadata"} per line.


class DocumentWriter(PipelineStep):
  """Writes each task's documents to FOLDER/RANK.jsonl (or, split by language,
  FOLDER/LANGUAGE/RANK.jsonl), whole or not at all."""

  type = 'lm.prepare'
  name = 'write'

  def __init__(self, folder: str, by_language: bool = False, languages: tuple[str, ...] = ()):
    super().__init__()
    self.folder, self.by_language, self.languages = folder, by_language, tuple(languages)

  def run(self, data, rank: int = 0, world_size: int = 1) -> None:
    with contextlib.ExitStack() as stack:
      files = {}

      def file_for(language: str):
        if language not in files:
          folder = os.path.join(self.folder, language) if self.by_language else self.folder
          files[language] = stack.enter_context(atomic_open(os.path.join(folder,
                                                                         f'{rank:05d}.jsonl')))
        return files[language]

      for language in self.languages:  # Every language gets a file, empty or not.
        file_for(language)
      for doc in data:
        language = doc.metadata.get('language', 'und') if self.by_language else ''
        file_for(language).write(json.dumps(dict(id=doc.id, text=doc.text, metadata=doc.metadata),
                                            ensure_ascii=False) + '\n')


class DocumentReader(PipelineStep):
  """Reads what DocumentWriter wrote for the same rank."""

  type = 'lm.prepare'
  name = 'read documents'

  def __init__(self, folder: str):
    super().__init__()
    self.folder = folder

  def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
    yield from read_documents(os.path.join(self.folder, f'{rank:05d}.jsonl'))


def read_documents(path: str) -> Iterator[Document]:
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      yield Document(text=record['text'], id=record['id'], metadata=record['metadata'])
