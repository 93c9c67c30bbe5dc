"""SentencePiece tokenizers: load one, train one Llama-style, count the bytes each piece stands for.

Trained models follow Llama-2's recipe (BPE, byte fallback, identity normalisation, digits split,
whitespace kept as is) so that any UTF-8 text round-trips exactly and a model trained here can
later be merged with Llama's tokenizer. Special ids: unk=0, bos=1, eos=2, pad=3. Llama-2 has no
pad piece (pad_id=-1); we spend one piece on it so padded rows hold a real, never-predicted id.
"""

from collections.abc import Iterable, Iterator, Sequence
import heapq
import io
import os
import re
import tempfile

import numpy as np
import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# SentencePiece sees one line as one sentence and silently drops sentences longer than
# max_sentence_length bytes. Minified or generated code has lines far longer than that, so we cut
# lines into pieces of at most this many characters (4 UTF-8 bytes each at most).
_MAX_LINE_CHARS = 4096


class Tokenizer:
  """A SentencePiece model file, with the few operations the data pipeline and the trainer need."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'SentencePiece model file {path!r} does not exist.')
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (RuntimeError, OSError) as e:
      raise ValueError(f'{path!r} is not a valid SentencePiece model file: {e}') from e
    self._num_threads = os.cpu_count() or 1

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """The PAD piece; for models without one (Llama-2's), EOS. Padding is always masked anyway."""
    return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    return self._sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, encoded on all cores by SentencePiece's own threads."""
    return self._sp.Encode(list(texts), num_threads=self._num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.DecodeIds(np.asarray(ids, dtype=np.int64).tolist())

  def token_bytes(self) -> np.ndarray:
    """int32[vocab_size]: UTF-8 bytes of text each piece stands for, to turn nats into bits/byte.

    Byte-fallback pieces are 1 byte, control and unknown pieces 0, '▁' is a space. The dummy
    prefix SentencePiece puts before each text is counted too, so a text encodes to one byte more
    than its UTF-8 length (one byte per document).
    """
    sp = self._sp
    counts = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if sp.IsByte(i):
        counts[i] = 1
      elif not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i)):
        counts[i] = len(sp.IdToPiece(i).replace('▁', ' ').encode('utf-8'))
    return counts


def sample_texts(texts: Iterable[str], max_chars: int, seed: int) -> list[str]:
  """A uniform random subset of the texts holding at most `max_chars` characters (0: all of them).

  One pass, memory bounded by max_chars: every text gets a random key and we keep the texts with
  the smallest keys that fit (bottom-k sampling by size). Texts longer than max_chars are cut.
  """
  if max_chars <= 0:
    return list(texts)
  rng = np.random.default_rng(seed)
  heap, total, threshold = [], 0, 1.0  # heap of (-key, index, text); keys >= threshold are out.
  for index, text in enumerate(texts):
    key = rng.random()
    if key >= threshold:
      continue
    text = text[:max_chars]
    heapq.heappush(heap, (-key, index, text))
    total += len(text)
    while total > max_chars:
      neg_key, _, dropped = heapq.heappop(heap)
      threshold, total = -neg_key, total - len(dropped)
  return [text for _, _, text in sorted(heap, key=lambda entry: entry[1])]


def _sentences(texts: Iterable[str]) -> Iterator[str]:
  """Non-empty lines of the texts, long ones cut into pieces SentencePiece will not drop."""
  for text in texts:
    for line in text.splitlines():
      for start in range(0, len(line), _MAX_LINE_CHARS):
        if piece := line[start:start + _MAX_LINE_CHARS]:
          yield piece


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str, *, max_chars: int,
                    seed: int) -> Tokenizer:
  """Trains a Llama-style SentencePiece BPE model on <= max_chars sampled characters.

  The model is written to `model_path` atomically: a killed run leaves the old file or none.
  """
  sentences = list(_sentences(sample_texts(texts, max_chars, seed)))
  if not sentences:
    raise ValueError('Cannot train a tokenizer on an empty corpus: the texts hold no characters.')
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences), model_writer=model, model_type='bpe',
        vocab_size=vocab_size, byte_fallback=True, normalization_rule_name='identity',
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True, character_coverage=0.99995, unk_id=UNK_ID, bos_id=BOS_ID,
        eos_id=EOS_ID, pad_id=PAD_ID, max_sentence_length=4 * _MAX_LINE_CHARS,
        # We sampled by characters already; SentencePiece's own sampling counts lines instead.
        input_sentence_size=0, train_extremely_large_corpus=False,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    if 'ocabulary size' not in str(e):
      raise
    high, low = re.search(r'<= (\d+)', str(e)), re.search(r'required_chars\. \d+ vs (\d+)', str(e))
    hint = (f' (at most {high.group(1)} for this text)' if high else
            f' (at least {low.group(1)} for this text)' if low else '')
    raise ValueError(
        f'model.vocab_size={vocab_size} does not fit the tokenizer training text '
        f'({sum(map(len, sentences))} characters){hint}. SentencePiece said: {e}') from e
  _write_atomically(model_path, model.getvalue())
  return Tokenizer(model_path)


def _write_atomically(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, prefix='.tmp-', delete=False) as f:
    try:
      f.write(data)
    except BaseException:
      os.remove(f.name)
      raise
  os.replace(f.name, path)
