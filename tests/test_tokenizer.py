"""Tests of lm/tokenizer.py: training, exact round trips, byte counts, and the errors users meet."""

import glob
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from lm import tokenizer as tokenizer_lib

HINDI = ('भारत एक विशाल देश है। यहाँ अनेक भाषाएँ बोली जाती हैं। हिंदी भारत की राजभाषा है और '
         'करोड़ों लोग इसे बोलते हैं। ज़िंदगी में पढ़ाई बहुत ज़रूरी है। ')
ENGLISH = ('The quick brown fox jumps over the lazy dog. Numbers like 12345 and 2024 are split '
           'into digits. Indented code keeps its spaces:\n    return x  # comment\n')
VOCAB_SIZE = 1000


def corpus() -> list[str]:
  """A few real stdlib files plus some Hindi and English prose: ~150k characters."""
  stdlib = sysconfig.get_paths()['stdlib']
  files = [os.path.join(stdlib, name) for name in ('textwrap.py', 'shlex.py', 'bisect.py')]
  texts = [open(path, encoding='utf-8').read() for path in files]
  return texts + [HINDI * 40, ENGLISH * 40]


@pytest.fixture(scope='module')
def tok(tmp_path_factory) -> tokenizer_lib.Tokenizer:
  path = str(tmp_path_factory.mktemp('tok') / 'spm.model')
  return tokenizer_lib.train_tokenizer(corpus(), VOCAB_SIZE, path, max_chars=1_000_000, seed=0)


def test_special_ids_and_vocab(tok):
  assert tok.vocab_size == VOCAB_SIZE
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  assert tok.encode('def') == tok.encode_batch(['def'])[0]
  assert tok.bos_id not in tok.encode('<s> hello </s>')  # Control pieces never come from text.


@pytest.mark.parametrize('text', [
    'def f(x):\n    return x + 1\n', '  two leading spaces, trailing  ', ENGLISH, HINDI,
    'unseen bytes: \x00\x07 € 😀 漢字 Ωμέγα ✓', '',
])
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.decode(np.array(ids, np.int32)) == text


def test_unseen_characters_use_byte_fallback(tok):
  ids = tok.encode('😀')
  assert len(ids) >= 4  # Four UTF-8 bytes, none seen in training.
  assert all(tok.token_bytes()[i] == 1 for i in ids[-4:])


def test_hindi_learned_pieces(tok):
  """Trained on Hindi, the tokenizer should need far fewer tokens than bytes."""
  assert len(tok.encode(HINDI)) < len(HINDI.encode('utf-8')) / 4


def test_digits_split(tok):
  pieces = [tok._sp.IdToPiece(i) for i in tok.encode('12345')]  # pylint: disable=protected-access
  assert [p.strip('▁') for p in pieces if p.strip('▁')] == list('12345')


def test_token_bytes(tok):
  counts = tok.token_bytes()
  assert counts.shape == (VOCAB_SIZE,) and counts.dtype == np.int32
  assert counts[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]  # unk, bos, eos, pad
  assert counts[4:4 + 256].tolist() == [1] * 256  # <0x00> ... <0xFF>
  for text in (ENGLISH, HINDI, 'mixed हिंदी and 😀\n\tcode', ' x'):
    ids = tok.encode(text)
    # +1: the dummy-prefix space SentencePiece adds before each text.
    assert counts[ids].sum() == len(tok.decode(ids).encode('utf-8')) + 1


def test_training_is_deterministic(tok, tmp_path):
  other = tokenizer_lib.train_tokenizer(corpus(), VOCAB_SIZE, str(tmp_path / 'again.model'),
                                        max_chars=1_000_000, seed=0)
  assert open(other.path, 'rb').read() == open(tok.path, 'rb').read()


def test_long_lines_are_kept(tmp_path):
  """One 50k-character line (think minified code) must be trained on, not dropped."""
  line = ' '.join(corpus()[0].split()) * 3
  assert '\n' not in line and len(line) > 40_000
  tok = tokenizer_lib.train_tokenizer([line], 400, str(tmp_path / 'long.model'), max_chars=0,
                                      seed=0)
  assert len(tok.encode(line)) < 0.8 * len(line)  # Merges were learned from it.


def test_sample_texts():
  texts = [f'{i:04d}' * (i + 1) for i in range(200)]
  sample = tokenizer_lib.sample_texts(texts, 10_000, seed=1)
  assert 9_000 < sum(map(len, sample)) <= 10_000
  assert sample == [t for t in texts if t in sample]  # A subset, in the original order.
  assert sample == tokenizer_lib.sample_texts(texts, 10_000, seed=1)
  assert sample != tokenizer_lib.sample_texts(texts, 10_000, seed=2)
  assert tokenizer_lib.sample_texts(texts, 0, seed=1) == texts
  assert tokenizer_lib.sample_texts(['x' * 50], 10, seed=1) == ['x' * 10]


@pytest.mark.parametrize('texts', [[], ['', '\n\n']])
def test_empty_corpus(tmp_path, texts):
  with pytest.raises(ValueError, match='empty corpus'):
    tokenizer_lib.train_tokenizer(texts, 300, str(tmp_path / 'm.model'), max_chars=0, seed=0)


def test_vocab_too_large(tmp_path):
  path = tmp_path / 'm.model'
  with pytest.raises(ValueError, match=r'model\.vocab_size=5000 .*at most \d+ for this text'):
    tokenizer_lib.train_tokenizer(['hello world'] * 10, 5000, str(path), max_chars=0, seed=0)
  assert not path.exists() and not glob.glob(str(tmp_path / '.tmp-*'))


def test_vocab_too_small(tmp_path):
  """Byte fallback alone takes 256 pieces, and every character seen needs one more."""
  with pytest.raises(ValueError, match=r'model\.vocab_size=270 .*at least \d+ for this text'):
    tokenizer_lib.train_tokenizer([ENGLISH], 270, str(tmp_path / 'm.model'), max_chars=0, seed=0)


def test_missing_model_file(tmp_path):
  path = str(tmp_path / 'nope.model')
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizer_lib.Tokenizer(path)


def test_corrupt_model_file(tmp_path):
  path = tmp_path / 'bad.model'
  path.write_bytes(b'not a sentencepiece model \x00\x01\x02')
  with pytest.raises(ValueError, match='bad.model'):
    tokenizer_lib.Tokenizer(str(path))


def test_padded_vocab_size():
  sizes = [tokenizer_lib.padded_vocab_size(n) for n in (1, 128, 129, 32_000)]
  assert sizes == [128, 128, 256, 32_000]


def test_the_runtime_imports_no_other_lm_module():
  """lm.data, lm.generate and lm.eval import it: it must not pull in the tools, lm.vocab or
  lm.config (JAX, and through lm.config's lm.data this module again)."""
  code = ('import sys, lm.tokenizer; '
          'print(sorted(m for m in sys.modules if m == "lm" or m.startswith("lm.")))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.stdout.strip() == "['lm', 'lm.files', 'lm.tokenizer']"
