"""The SentencePiece tokenizer the data pipeline, the trainer, lm.generate and lm.eval run.

  Tokenizer(path)       a .model file: encode, decode, special ids, the text and bytes of pieces
  train_tokenizer(...)  the data pipeline's model, trained on a sample of the corpus
  padded_vocab_size(n)  the embedding rows a model gives a tokenizer of n pieces

Trained models follow Llama-2's recipe (BPE, byte fallback, identity normalisation, digits split,
whitespace kept as is) so that any UTF-8 text round-trips exactly and a model trained here can
later be merged with Llama's tokenizer. The data pipeline's models (train_tokenizer) use the
special ids unk=0, bos=1, eos=2, pad=3. Llama-2 has no pad piece (pad_id=-1); we spend one piece on
it so padded rows hold a real, never-predicted id.

The tools (training from files, merging, fertility) are lm/tokenizer_tools.py, run as
`python -m lm.tokenizer {train,merge,fertility}`; this module imports neither them nor JAX.
"""

from collections.abc import Iterable, Iterator, Sequence
import heapq
import io
import os
import re
import sys

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from lm import files as files_lib

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# The masked-LM input piece (lm/mlm.py): a user-defined symbol of the models the pipeline trains
# for an encoder (config.model.kind='encoder'). SentencePiece gives user symbols the ids right
# after the special ones, so in those models it is MASK_ID.
MASK_PIECE, MASK_ID = '[MASK]', 4
# SentencePiece sees one line as one sentence and silently drops sentences longer than
# max_sentence_length bytes. Minified or generated code has lines far longer than that, so we cut
# lines into pieces of at most this many characters (4 UTF-8 bytes each at most).
_MAX_LINE_CHARS = 4096
# Llama-2's trainer settings, as its tokenizer.model records them (trainer_spec, normalizer_spec):
# byte fallback, so every UTF-8 text round-trips; digits split, so numbers tokenize uniformly; text
# kept as written (identity normaliser, whitespace kept) but for the '▁' put before each sentence.
# The last line is ours: room for our cut lines, all cores, quiet logs.
LLAMA2_TRAINER_OPTIONS = dict(
    model_type='bpe', byte_fallback=True, normalization_rule_name='identity',
    add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    split_digits=True, character_coverage=0.99995, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    pad_id=-1,  # No pad piece.
    max_sentence_length=4 * _MAX_LINE_CHARS, num_threads=os.cpu_count() or 1, minloglevel=2)


class TokenizerError(ValueError):
  """A tokenizer that cannot be loaded or trained (a bad model file, a corpus it does not fit)."""


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
      raise TokenizerError(f'{path!r} is not a valid SentencePiece model file: {e}') from e
    self._num_threads = os.cpu_count() or 1
    self._piece_texts = None

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

  def piece_id(self, piece: str) -> int:
    """The id of `piece` as a whole piece (e.g. MASK_PIECE); -1 if the model has no such piece."""
    i = self._sp.PieceToId(piece)
    return i if self._sp.IdToPiece(i) == piece else -1

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    return self._sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, encoded on all cores by SentencePiece's own threads."""
    return self._sp.Encode(list(texts), num_threads=self._num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.DecodeIds(np.asarray(ids, dtype=np.int64).tolist())

  def byte_fallback_mask(self) -> np.ndarray:
    """bool[vocab_size]: the byte-fallback pieces <0x00> ... <0xFF>."""
    return np.array([self._sp.IsByte(i) for i in range(self.vocab_size)], bool)

  def pieces(self) -> list[str]:
    """Every piece by id: two tokenizers with equal lists tokenize alike."""
    return [self._sp.IdToPiece(i) for i in range(self.vocab_size)]

  def piece_texts(self) -> list[str]:
    """The text each piece stands for ('▁' as a space; a byte piece as its character when it
    is ASCII, else ''; control and unknown pieces ''), e.g. to find pieces holding a stop string.
    Computed once per Tokenizer."""
    if self._piece_texts is not None:
      return self._piece_texts
    sp, texts = self._sp, []
    for i in range(self.vocab_size):
      if sp.IsByte(i):
        byte = int(sp.IdToPiece(i)[1:-1], 16)
        texts.append(chr(byte) if byte < 0x80 else '')
      elif sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
        texts.append('')
      else:
        texts.append(sp.IdToPiece(i).replace('▁', ' '))
    self._piece_texts = texts
    return texts

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


def padded_vocab_size(pieces: int) -> int:
  """Embedding rows for a tokenizer of `pieces` pieces, rounded up to a multiple of 128 so the
  vocab dimension tiles evenly in matmuls; the extra rows are never inputs or targets."""
  return -(-pieces // 128) * 128


def read_model_proto(path: str) -> model_pb2.ModelProto:
  """The pieces and settings of a .model file, to edit; errors name a missing or invalid file."""
  Tokenizer(path)
  proto = model_pb2.ModelProto()
  with open(path, 'rb') as f:
    proto.ParseFromString(f.read())
  return proto


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


def training_sentences(texts: Iterable[str]) -> Iterator[str]:
  """Non-empty lines of the texts, long ones cut into pieces SentencePiece will not drop."""
  for text in texts:
    for line in text.splitlines():
      for start in range(0, len(line), _MAX_LINE_CHARS):
        if piece := line[start:start + _MAX_LINE_CHARS]:
          yield piece


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str, *, max_chars: int,
                    seed: int, user_symbols: Sequence[str] = ()) -> Tokenizer:
  """Trains a Llama-style SentencePiece BPE model on <= max_chars sampled characters.

  user_symbols (e.g. (MASK_PIECE,) for an encoder) become pieces of their own, with the ids
  after the special ones (4, 5, ...), each kept whole wherever it occurs in text.
  The model is written to `model_path` atomically: a killed run leaves the old file or none.
  """
  sentences = list(training_sentences(sample_texts(texts, max_chars, seed)))
  if not sentences:
    raise TokenizerError('Cannot train a tokenizer on an empty corpus: the texts hold no characters.')
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        **{**LLAMA2_TRAINER_OPTIONS, 'pad_id': PAD_ID},
        **({'user_defined_symbols': list(user_symbols)} if user_symbols else {}),
        # We sampled by characters already; SentencePiece's own sampling counts lines instead.
        input_sentence_size=0, train_extremely_large_corpus=False)
  except RuntimeError as e:
    raise training_error(
        e, f'model.vocab_size={vocab_size}',
        f'the tokenizer training text ({sum(map(len, sentences))} characters)') from e
  files_lib.write_atomically(model_path, lambda f: f.write(model.getvalue()), mode='wb')
  return Tokenizer(model_path)


def training_error(e: RuntimeError, setting: str, text: str) -> TokenizerError:
  """SentencePiece's complaint, saying which vocabulary size fits the text when that was it."""
  if 'ocabulary size' not in str(e):
    return TokenizerError(f'SentencePiece could not train on {text}: {e}')
  high, low = re.search(r'<= (\d+)', str(e)), re.search(r'required_chars\. \d+ vs (\d+)', str(e))
  hint = (f' (at most {high.group(1)} for this text)' if high else
          f' (at least {low.group(1)} for this text)' if low else '')
  return TokenizerError(f'{setting} does not fit {text}{hint}. SentencePiece said: {e}')


# lm/tokenizer_tools.py's public functions, once this module's: imported when first asked for.
_TOOLS = ('train_model', 'merge_models', 'fertility', 'format_fertility', 'plot_fertility')


def __getattr__(name: str):
  if name in _TOOLS:
    from lm import tokenizer_tools  # pylint: disable=g-import-not-at-top
    return getattr(tokenizer_tools, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m lm.tokenizer`: the tools' command line (lm/tokenizer_tools.py), and the old
  spelling of `python -m lm.vocab extend-checkpoint`; each imported only when run."""
  argv = sys.argv[1:] if argv is None else list(argv)
  # pylint: disable=g-import-not-at-top
  if argv[:1] == ['extend-checkpoint']:
    from lm import vocab  # Imports JAX.
    vocab.main(argv)
  else:
    from lm import tokenizer_tools
    tokenizer_tools.main(argv)


if __name__ == '__main__':
  main()
