"""Tests of lm/token_cache.py: the token stream, and the cache's files. Its reuse and rebuilding
run through make_data, in tests/test_data.py."""

import os

import numpy as np

from lm import token_cache
from lm import tokenizer as tokenizer_lib

BOS, EOS = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID


def test_tokenize_documents_frames_and_shuffles(tmp_path):
  docs = [f'document number {i} ' * (i % 5 + 1) for i in range(40)]
  tok = tokenizer_lib.train_tokenizer(docs, 300, str(tmp_path / 'spm.model'), max_chars=0, seed=0)
  stream = token_cache.tokenize_documents(iter(docs), tok, seed=3)
  assert stream.dtype == np.uint16 and stream[0] == BOS and stream[-1] == EOS
  bos_at, eos_at = np.flatnonzero(stream == BOS), np.flatnonzero(stream == EOS)
  np.testing.assert_array_equal(bos_at[1:], eos_at[:-1] + 1)  # [BOS] doc [EOS] back to back.
  decoded = [tok.decode(stream[b + 1:e]) for b, e in zip(bos_at, eos_at)]
  assert sorted(decoded) == sorted(docs) and decoded != docs  # Same documents, shuffled.
  np.testing.assert_array_equal(stream, token_cache.tokenize_documents(iter(docs), tok, seed=3))


def test_copy_cache_links_what_the_target_lacks(tmp_path):
  shared, run = str(tmp_path / 'shared'), str(tmp_path / 'run' / 'data')
  os.makedirs(shared)
  tokens, manifest = token_cache.cache_files(shared)
  for path in (tokens, manifest):
    with open(path, 'w') as f:
      f.write(os.path.basename(path))
  token_cache.copy_cache(shared, run)
  assert [os.path.basename(p) for p in token_cache.cache_files(run)] == ['tokens.npy',
                                                                          'manifest.json']
  for source, target in zip(token_cache.cache_files(shared), token_cache.cache_files(run)):
    assert os.path.samefile(source, target)  # A hard link, not a copy.
  # A file the target has already stays; an empty source gives nothing.
  os.remove(token_cache.cache_files(run)[0])
  with open(token_cache.cache_files(run)[0], 'w') as f:
    f.write('own')
  token_cache.copy_cache(shared, run)
  assert open(token_cache.cache_files(run)[0]).read() == 'own'
  token_cache.copy_cache(str(tmp_path / 'nothing'), str(tmp_path / 'other'))
  assert not os.path.exists(tmp_path / 'other')
