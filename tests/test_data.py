"""Tests of lm/data.py: packing, the train/eval split, the token cache through make_data, exactly
resumable iteration, mixtures. Sources are tests/test_sources.py's."""

import collections
import json
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm import config as config_lib
from lm import data as data_lib
from lm import tokenizer as tokenizer_lib

BOS, EOS = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID
VOCAB_SIZE, BATCH_SIZE, SEQ_LEN = 512, 4, 32


def data_config(**overrides) -> ml_collections.ConfigDict:
  """configs/base.py's data section (the contract), shrunk to a corpus that trains in a second."""
  config = config_lib.base_config().data
  config.update(dict(source='stdlib', seq_len=SEQ_LEN, max_chars=200_000,
                     tokenizer_train_chars=200_000, eval_fraction=0.05))
  config.update(overrides)
  return config


def make_data(config, workdir, **kwargs) -> data_lib.Data:
  kwargs = dict(dict(vocab_size=VOCAB_SIZE, batch_size=BATCH_SIZE, seed=0), **kwargs)
  return data_lib.make_data(config, workdir=str(workdir), **kwargs)


def write_files(directory, texts: dict[str, bytes | str]) -> None:
  for name, text in texts.items():
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode('utf-8'))


# ---------------------------------------------------------------------------------------------
# Packing.


def test_make_batch_on_hand_built_stream():
  stream = np.array([BOS, 5, 6, EOS, BOS, 7, EOS, BOS, 8, 9, 10, EOS, BOS], np.uint16)
  rows = data_lib.Rows(stream, seq_len=4, start=0, stop=3)
  batch = data_lib.make_batch(np.stack([rows[i] for i in range(3)]), bos_id=BOS)
  np.testing.assert_array_equal(batch['inputs'], [[BOS, 5, 6, EOS], [BOS, 7, EOS, BOS],
                                                  [8, 9, 10, EOS]])
  np.testing.assert_array_equal(batch['targets'], [[5, 6, EOS, BOS], [7, EOS, BOS, 8],
                                                   [9, 10, EOS, BOS]])
  np.testing.assert_array_equal(batch['segment_ids'], [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1]])
  np.testing.assert_array_equal(batch['positions'], [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]])
  np.testing.assert_array_equal(batch['loss_mask'], [[1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 0]])
  assert {name: array.dtype.name for name, array in batch.items()} == dict(
      inputs='int32', targets='int32', segment_ids='int32', positions='int32',
      loss_mask='float32')


def hand_stream(lengths: list[int]) -> np.ndarray:
  """Documents of the given lengths in tokens, BOS and EOS included."""
  return np.concatenate([[BOS] + [7] * (n - 2) + [EOS] for n in lengths]).astype(np.uint16)


def held_out_start(stream, seq_len=4, eval_fraction=0.22, batch_size=2) -> int:
  return data_lib.held_out_start(stream, seq_len=seq_len, eval_fraction=eval_fraction,
                                 batch_size=batch_size, bos_id=BOS, eos_id=EOS)


def test_held_out_start_is_a_document_start():
  # Ten documents of 10 tokens at 0, 10, ..., 90. Splitting rows of 4 would hold out rows 18-23,
  # from token 72: document 7 would be on both sides. The nearest start to 78 (22% from the end)
  # is 80; in a tie the earlier start wins.
  assert held_out_start(hand_stream([10] * 10)) == 80
  assert held_out_start(hand_stream([10] * 10), eval_fraction=0.25) == 70
  # A long document around the target: its start is farther than the next one's.
  assert held_out_start(hand_stream([10] * 5 + [40] + [10] * 2), eval_fraction=0.3) == 90
  # The nearest start may lie far beyond the first window read around the target.
  assert held_out_start(hand_stream([400_000, 200_000]), eval_fraction=0.45) == 400_000
  assert held_out_start(hand_stream([10] * 10), eval_fraction=0.0) == 100


def test_held_out_start_keeps_the_fraction():
  lengths = np.random.default_rng(0).integers(5, 60, 2000).tolist()
  stream = hand_stream(lengths)
  start = held_out_start(stream, seq_len=16, eval_fraction=0.1, batch_size=4)
  assert stream[start] == BOS and stream[start - 1] == EOS
  assert abs(len(stream) - start - 0.1 * len(stream)) <= max(lengths) / 2


def test_held_out_start_errors():
  with pytest.raises(ValueError, match=r'too small: 13 tokens make 3 rows of data.seq_len=4, but '
                     r'one batch of train.batch_size=2 rows plus one eval row needs 14 tokens'):
    held_out_start(hand_stream([10, 3]))
  with pytest.raises(ValueError, match='batch_size=2 rows needs 9 tokens'):
    held_out_start(hand_stream([8]), eval_fraction=0.0)


def test_held_out_start_cuts_inside_a_document_only_when_no_start_is_near(caplog):
  # One text: the cut falls where the fraction says, inside it, and says so.
  assert held_out_start(hand_stream([100]), eval_fraction=0.2) == 80
  assert 'inside a document' in caplog.text
  # The only other document starts too late to leave an eval row after it.
  assert held_out_start(hand_stream([30, 3])) == round(33 * 0.78)
  # The nearest start would hold out 98% instead of 10%.
  assert held_out_start(hand_stream([10, 10, 1000]), eval_fraction=0.1) == 918


def test_train_iterator_cycles_reshuffled_epochs():
  stream = np.arange(8 * SEQ_LEN + 1)
  rows = data_lib.Rows(stream, SEQ_LEN, 0, 8)
  iterator = data_lib.train_iterator(rows, batch_size=4, seed=0, bos_id=-1)
  first_tokens = [next(iterator)['inputs'][:, 0] // SEQ_LEN for _ in range(4)]
  epoch1, epoch2 = np.concatenate(first_tokens[:2]), np.concatenate(first_tokens[2:])
  assert sorted(epoch1) == sorted(epoch2) == list(range(8))
  assert list(epoch1) != list(epoch2)


def test_shards_split_the_global_batch():
  """Process p of 2 gets rows p::2 of each global batch, and its state counts the same batches."""
  rows = data_lib.Rows(np.arange(10 * SEQ_LEN + 1), SEQ_LEN, 0, 10)
  whole = data_lib.train_iterator(rows, batch_size=4, seed=0, bos_id=-1)
  parts = [data_lib.train_iterator(rows, batch_size=4, seed=0, bos_id=-1, shard_index=p,
                                   shard_count=2) for p in range(2)]
  assert_shards_split(whole, parts, num_batches=6)  # Crosses an epoch.


def assert_shards_split(whole, parts, num_batches):
  for _ in range(num_batches):
    want = next(whole)
    got = [next(part) for part in parts]
    for name in want:
      for p, part in enumerate(got):
        np.testing.assert_array_equal(part[name], want[name][p::len(parts)])
  assert all(part.get_state() == whole.get_state() for part in parts)


# ---------------------------------------------------------------------------------------------
# make_data: the whole pipeline, with its cache.


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """One make_data run on a small slice of the stdlib, shared by the tests below."""
  workdir = tmp_path_factory.mktemp('workdir')
  return make_data(data_config(), workdir), workdir


def test_make_data_batches(built):
  data, _ = built
  batch = next(data.train_iter)
  for name in ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'):
    assert batch[name].shape == (BATCH_SIZE, SEQ_LEN), name
  assert batch['inputs'].dtype == np.int32 and batch['loss_mask'].dtype == np.float32
  assert batch['inputs'].max() < VOCAB_SIZE
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert data.token_bytes.shape == (VOCAB_SIZE,)
  assert data.eval_sets == {}  # Only mixtures have them.
  stats = data.stats
  assert json.loads(json.dumps(stats)) == stats
  assert stats['chars'] == 200_000 and stats['tokenizer_trained'] and not stats['tokens_cached']
  # Each part may leave its last < SEQ_LEN tokens out of its rows.
  assert (stats['tokens'] - 1) // SEQ_LEN - (stats['train_rows'] + stats['eval_rows']) in (0, 1)


def built_start(data, workdir, name='') -> tuple[np.ndarray, int]:
  """(token stream, where its held-out documents start) of a make_data source."""
  stream = np.load(os.path.join(workdir, 'data', name, 'tokens.npy'))
  return stream, data_lib.held_out_start(stream, seq_len=SEQ_LEN, eval_fraction=0.05,
                                         batch_size=BATCH_SIZE, bos_id=BOS, eos_id=EOS)


def test_eval_rows_reconstruct_the_held_out_stream(built):
  data, workdir = built
  stream, start = built_start(data, workdir)
  assert stream[start] == BOS and stream[start - 1] == EOS  # A document starts the held-out part.
  assert data.stats['train_rows'] == (start - 1) // SEQ_LEN
  assert data.stats['eval_rows'] == (len(stream) - start - 1) // SEQ_LEN
  batches = data.eval_batches(10**9)
  n = data.stats['eval_rows'] * SEQ_LEN
  inputs = np.concatenate([b['inputs'] for b in batches]).reshape(-1)
  np.testing.assert_array_equal(inputs[:n], stream[start:start + n])
  last = next(row for row in range(len(inputs) // SEQ_LEN)[::-1]
              if np.concatenate([b['loss_mask'] for b in batches])[row].any())
  assert np.concatenate([b['targets'] for b in batches])[last, -1] == stream[start + n]


def test_train_and_eval_rows_are_disjoint(built):
  """An epoch of train batches draws from the rows before the held-out start only; eval is the
  rows after it."""
  data, workdir = built
  stream, start = built_start(data, workdir)
  num_train, num_eval = data.stats['train_rows'], data.stats['eval_rows']
  assert num_eval > 0

  def row(begin):
    return bytes(stream[begin:begin + SEQ_LEN].astype(np.int32))

  def rows_of(batches):
    return collections.Counter(bytes(inputs) for batch in batches
                               for inputs, mask in zip(batch['inputs'], batch['loss_mask'])
                               if mask.any())

  fresh = make_data(data_config(), workdir)  # Its own iterator, not the shared fixture's.
  train_epoch = rows_of(next(fresh.train_iter) for _ in range(num_train // BATCH_SIZE))
  assert not train_epoch - collections.Counter(row(i * SEQ_LEN) for i in range(num_train))
  assert train_epoch.total() == num_train // BATCH_SIZE * BATCH_SIZE
  assert rows_of(data.eval_batches(10**6)) == collections.Counter(
      row(start + i * SEQ_LEN) for i in range(num_eval))


def test_eval_batches_are_deterministic(built):
  data, _ = built
  one, two = data.eval_batches(1), data.eval_batches(5)
  assert len(one) == 1 and len(two) == 5
  assert len(data.eval_batches(10**6)) == -(-data.stats['eval_rows'] // BATCH_SIZE)
  for name in one[0]:
    np.testing.assert_array_equal(one[0][name], two[0][name])


def test_eval_batch_padding():
  stream = np.full(7 * 4 + 1, 9)
  rows = data_lib.Rows(stream, 4, 4, 7)  # Three rows, batch of two -> one full, one padded.
  batches = data_lib.eval_batches(rows, 5, batch_size=2, bos_id=BOS, pad_id=3)
  assert len(batches) == 2 and batches[1]['inputs'].shape == (2, 4)
  np.testing.assert_array_equal(batches[1]['loss_mask'], [[1] * 4, [0] * 4])
  np.testing.assert_array_equal(batches[1]['segment_ids'], [[1] * 4, [0] * 4])
  np.testing.assert_array_equal(batches[1]['inputs'][1], [3] * 4)


def test_resume_from_saved_state(built):
  _, workdir = built
  original = make_data(data_config(), workdir)
  for _ in range(3):
    next(original.train_iter)
  state = json.loads(json.dumps(original.train_iter.get_state()))
  # Enough batches to cross an epoch boundary.
  num_next = original.stats['train_rows'] // BATCH_SIZE + 2
  expected = [next(original.train_iter) for _ in range(num_next)]
  resumed = make_data(data_config(), workdir)
  resumed.train_iter.set_state(state)
  for want, got in zip(expected, (next(resumed.train_iter) for _ in range(num_next))):
    for name in want:
      np.testing.assert_array_equal(want[name], got[name])


def test_cache_is_reused(built):
  data, workdir = built
  model_path = os.path.join(workdir, 'tokenizer', 'spm.model')
  tokens_path = os.path.join(workdir, 'data', 'tokens.npy')
  mtimes = os.stat(model_path).st_mtime_ns, os.stat(tokens_path).st_mtime_ns
  again = make_data(data_config(), workdir)
  assert not again.stats['tokenizer_trained'] and again.stats['tokens_cached']
  assert (os.stat(model_path).st_mtime_ns, os.stat(tokens_path).st_mtime_ns) == mtimes
  assert again.stats == dict(data.stats, tokenizer_trained=False, tokens_cached=True)


def test_cache_is_rebuilt_when_the_source_changes(tmp_path):
  corpus, workdir = tmp_path / 'corpus', tmp_path / 'workdir'
  write_files(corpus, {f'{i}.txt': open(__file__).read()[i * 3000:] for i in range(5)})
  config = data_config(source=f'text:{corpus}/*.txt', max_chars=0)
  first = make_data(config, workdir)
  assert first.stats['tokenizer_trained'] and first.stats['documents'] == 5
  assert make_data(config, workdir).stats['tokens_cached']
  # Editing a file of a local source rebuilds.
  write_files(corpus, {'0.txt': 'edited ' + open(__file__).read()})
  edited = make_data(config, workdir)
  assert edited.stats['tokenizer_trained'] and not edited.stats['tokens_cached']
  # So does another source in the same workdir.
  other = make_data(data_config(), workdir)
  assert other.stats['tokenizer_trained'] and not other.stats['tokens_cached']
  assert other.stats['chars'] == 200_000


def test_given_tokenizer(built, tmp_path):
  data, _ = built
  config = data_config(tokenizer=data.tokenizer.path)
  given = make_data(config, tmp_path)
  assert not given.stats['tokenizer_trained'] and given.tokenizer.path == data.tokenizer.path
  assert given.stats['tokens'] == data.stats['tokens']
  with pytest.raises(ValueError, match=rf'model.vocab_size=1000 .* has {VOCAB_SIZE} pieces'):
    make_data(config, tmp_path, vocab_size=1000)


def test_corpus_too_small(built, tmp_path):
  data, _ = built
  write_files(tmp_path, {'a.txt': open(__file__).read()[:3000]})
  config = data_config(source=f'text:{tmp_path}/*.txt', seq_len=512, tokenizer=data.tokenizer.path)
  with pytest.raises(ValueError, match=r'corpus is too small: \d+ tokens make \d+ rows'):
    make_data(config, tmp_path)


# ---------------------------------------------------------------------------------------------
# No document on both sides of the split.


def tagged_documents(count: int) -> list[str]:
  """Distinct documents of a few lines each; every line names its document, as dIx."""
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'omega', 'sigma', 'kappa', 'theta']
  return [''.join(f'd{i}x {" ".join(rng.choice(words, 6))}\n' for _ in range(rng.integers(3, 9)))
          for i in range(count)]


def tags_in(batches, tokenizer) -> set[int]:
  """The documents (by tag) whose text is in the rows of the batches; padding rows left out."""
  texts = [tokenizer.decode(inputs.tolist()) for batch in batches
           for inputs, mask in zip(batch['inputs'], batch['loss_mask']) if mask.any()]
  return {int(tag) for text in texts for tag in re.findall(r'\bd(\d+)x\b', text)}


@pytest.mark.parametrize('kind', ['text', 'jsonl', 'tfds'])
def test_no_document_in_both_splits(built, tmp_path, kind):
  """Documents (and their exact copies, which are dropped and counted) are wholly train or eval,
  and the held-out share stays near data.eval_fraction, for every kind of source."""
  docs = tagged_documents(60)
  copies = [docs[i] for i in (3, 11, 11, 27, 40, 59)]
  everything = docs + copies
  if kind == 'text':
    write_files(tmp_path / 'corpus', {f'{i:03}.txt': doc for i, doc in enumerate(everything)})
    source = f'text:{tmp_path}/corpus/*.txt'
  elif kind == 'jsonl':
    lines = ''.join(json.dumps({'text': doc}) + '\n' for doc in everything)
    write_files(tmp_path / 'corpus', {'a.jsonl': lines})
    source = f'jsonl:{tmp_path}/corpus/a.jsonl'
  else:
    source = 'tfds:lm1b'  # A registered name; the mock supplies its examples.
  config = data_config(source=source, max_chars=0, eval_fraction=0.1,
                       tokenizer=built[0].tokenizer.path)
  examples = [{'text': doc.encode()} for doc in everything]
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
    data = make_data(config, tmp_path / 'workdir')
    again = make_data(config, tmp_path / 'workdir')
  stats = data.stats
  assert (stats['documents'], stats['duplicate_documents']) == (60, 6)
  manifest = json.loads((tmp_path / 'workdir' / 'data' / 'manifest.json').read_text())
  assert manifest['duplicate_documents'] == 6 and manifest['key']['version'] >= 2
  assert again.stats == dict(stats, tokens_cached=True)
  num_train = stats['train_rows']
  train = tags_in((next(data.train_iter) for _ in range(-(-num_train // BATCH_SIZE) + 1)),
                  data.tokenizer)
  held_out = tags_in(data.eval_batches(10**6), data.tokenizer)
  assert train.isdisjoint(held_out) and train | held_out == set(range(60))
  assert abs(stats['eval_rows'] / (num_train + stats['eval_rows']) - 0.1) < 0.02


# ---------------------------------------------------------------------------------------------
# Mixtures: data.mixture.


def write_corpus(directory, alphabet: str, seed: int, num_files: int = 12) -> str:
  """num_files documents of random words over `alphabet`; returns a text:GLOB source for them."""
  rng = np.random.default_rng(seed)
  words = [''.join(rng.choice(list(alphabet), rng.integers(2, 7))) for _ in range(300)]
  write_files(directory, {f'{i}.txt': ' '.join(rng.choice(words, 150)) + '\n'
                          for i in range(num_files)})
  return f'text:{directory}/*.txt'


LATIN = 'abcdefghijklmnopqrstuvwxyz'
DEVANAGARI = 'कखगघचछजझटठडढणतथदधनपफबभमयरलवशसह' + 'ािीुूेैोौ'


@pytest.fixture(scope='module')
def corpora(tmp_path_factory):
  """Two sources with disjoint alphabets: an English-like one and a Hindi-like one."""
  root = tmp_path_factory.mktemp('corpora')
  return dict(en=write_corpus(root / 'en', LATIN, 0), hi=write_corpus(root / 'hi', DEVANAGARI, 1))


def mixture_config(corpora, en=0.25, hi=0.75, **overrides):
  return data_config(mixture=f'en={corpora["en"]}@{en}; hi={corpora["hi"]}@{hi}', **overrides)


@pytest.fixture(scope='module')
def mixed(tmp_path_factory, corpora):
  """One make_data run on a 25% en / 75% hi mixture, with a tokenizer trained on both."""
  workdir = tmp_path_factory.mktemp('mixed')
  return make_data(mixture_config(corpora), workdir), workdir


def row_owners(data, workdir) -> dict[bytes, tuple[str, str]]:
  """(source, 'train' or 'eval') of every row of a mixture, keyed by the row's inputs."""
  owners = {}
  for name, counts in data.stats['sources'].items():
    stream, start = built_start(data, workdir, name)
    stream = stream.astype(np.int32)
    for split, begin, num_rows in (('train', 0, counts['train_rows']),
                                   ('eval', start, counts['eval_rows'])):
      for i in range(num_rows):
        owners[bytes(stream[begin + i * SEQ_LEN:begin + (i + 1) * SEQ_LEN])] = name, split
  assert len(owners) == data.stats['train_rows'] + data.stats['eval_rows']  # No row in two places.
  return owners


def owners_of(batches, owners) -> list[tuple[str, str]]:
  """The owner of each row of the batches, in order; padding rows left out."""
  return [owners[bytes(inputs)] for batch in batches
          for inputs, mask in zip(batch['inputs'], batch['loss_mask']) if mask.any()]


def test_mixture_stats(mixed):
  data, workdir = mixed
  stats = data.stats
  assert json.loads(json.dumps(stats)) == stats
  assert stats['tokenizer_trained'] and not stats['tokens_cached']
  sources = stats['sources']
  assert list(sources) == ['en', 'hi']
  assert [counts['share'] for counts in sources.values()] == [0.25, 0.75]
  for name, counts in sources.items():
    assert counts['documents'] == 12 and counts['eval_rows'] > 0
    num_rows = counts['train_rows'] + counts['eval_rows']
    assert (counts['tokens'] - 1) // SEQ_LEN - num_rows in (0, 1)
    assert os.path.exists(os.path.join(workdir, 'data', name, 'tokens.npy'))
  for name in ('documents', 'chars', 'tokens', 'duplicate_documents', 'train_rows', 'eval_rows'):
    assert stats[name] == sum(counts[name] for counts in sources.values()), name
  # The tokenizer was trained on both scripts: neither needs byte fallback.
  for alphabet in (LATIN, DEVANAGARI):
    ids = data.tokenizer.encode(alphabet)
    assert not data.tokenizer.byte_fallback_mask()[ids].any(), alphabet


def test_mixture_rows_follow_the_weights(mixed, corpora):
  data, workdir = mixed
  owners = row_owners(data, workdir)
  fresh = make_data(mixture_config(corpora), workdir)  # Its own iterator, not the fixture's.
  batches = [next(fresh.train_iter) for _ in range(50)]
  drawn = owners_of(batches, owners)
  assert len(drawn) == 200 and {split for _, split in drawn} == {'train'}
  # The sources interleave in fixed proportions, so the count is exact to a row: it cannot flake.
  assert abs(collections.Counter(name for name, _ in drawn)['hi'] - 0.75 * 200) <= 1
  # Each source is shuffled on its own, and repeats no row before its epoch ends (hi: ~200 rows).
  assert len({bytes(inputs) for batch in batches for inputs in batch['inputs']}) == 200


def test_mixture_eval_sets(mixed):
  data, workdir = mixed
  owners = row_owners(data, workdir)
  sources = data.stats['sources']
  assert list(data.eval_sets) == ['en', 'hi']
  for name, eval_set in data.eval_sets.items():
    batches = eval_set(10**6)
    assert len(batches) == -(-sources[name]['eval_rows'] // BATCH_SIZE) and len(eval_set(1)) == 1
    assert owners_of(batches, owners) == [(name, 'eval')] * sources[name]['eval_rows']
  # The union interleaves the sources 1:3 until one runs out; each source's rows in order.
  union = data.eval_batches(10**6)
  drawn = owners_of(union, owners)
  counts = collections.Counter(name for name, _ in drawn)
  assert {split for _, split in drawn} == {'eval'} and abs(counts['hi'] - 3 * counts['en']) <= 3
  # It ends within a row of where the first source runs out (grain rounds to whole rows).
  assert min(sources[name]['eval_rows'] - counts[name] for name in counts) <= 1
  assert len(union) == -(-len(drawn) // BATCH_SIZE)
  in_union = [bytes(inputs) for batch in union
              for inputs, mask in zip(batch['inputs'], batch['loss_mask']) if mask.any()]
  for name, eval_set in data.eval_sets.items():
    own = [bytes(inputs) for batch in eval_set(10**6) for inputs in batch['inputs']]
    assert [row for row in in_union if owners[row][0] == name] == own[:counts[name]]
  np.testing.assert_array_equal(data.eval_batches(2)[1]['inputs'], union[1]['inputs'])


def test_mixture_resume_from_saved_state(mixed, corpora):
  _, workdir = mixed
  original = make_data(mixture_config(corpora), workdir)
  for _ in range(3):
    next(original.train_iter)
  state = json.loads(json.dumps(original.train_iter.get_state()))
  # Enough batches for hi (75% of the rows) to start a second epoch.
  num_next = original.stats['sources']['hi']['train_rows'] * 4 // 3 // BATCH_SIZE + 2
  expected = [next(original.train_iter) for _ in range(num_next)]
  resumed = make_data(mixture_config(corpora), workdir)
  resumed.train_iter.set_state(state)
  for want, got in zip(expected, (next(resumed.train_iter) for _ in range(num_next))):
    for name in want:
      np.testing.assert_array_equal(want[name], got[name])


def test_mixture_shards_split_the_global_batch(mixed, corpora):
  """Each of 2 processes gets its rows of the same global batches, training and eval alike."""
  _, workdir = mixed
  whole = make_data(mixture_config(corpora), workdir)
  parts = [make_data(mixture_config(corpora), workdir, shard_index=p, shard_count=2)
           for p in range(2)]
  num_batches = whole.stats['sources']['hi']['train_rows'] * 4 // 3 // BATCH_SIZE + 2
  assert_shards_split(whole.train_iter, [part.train_iter for part in parts], num_batches)
  for name in ('en', 'hi', None):
    def evals(data, name=name):
      return (data.eval_sets[name] if name else data.eval_batches)(10**6)
    for p, part in enumerate(parts):
      for want, got in zip(evals(whole), evals(part), strict=True):
        for field in want:
          np.testing.assert_array_equal(got[field], want[field][p::2])


def test_mixture_caches_each_source_on_its_own(mixed, corpora, tmp_path):
  """With a given tokenizer, changing one source re-tokenizes that source only."""
  data, _ = mixed
  sources = dict(en=corpora['en'], hi=write_corpus(tmp_path / 'hi', DEVANAGARI, 1))  # A copy.
  workdir = tmp_path / 'workdir'

  def build(en=0.25, hi=0.75):
    return make_data(mixture_config(sources, en, hi, tokenizer=data.tokenizer.path), workdir)

  def cached(built):
    return {name: counts['tokens_cached'] for name, counts in built.stats['sources'].items()}

  first = build()
  assert cached(first) == dict(en=False, hi=False) and not first.stats['tokenizer_trained']
  assert ({name: counts['tokens'] for name, counts in first.stats['sources'].items()} ==
          {name: counts['tokens'] for name, counts in data.stats['sources'].items()})
  assert cached(build(en=1, hi=1)) == dict(en=True, hi=True)  # Weights alone: nothing to redo.
  en_tokens = workdir / 'data' / 'en' / 'tokens.npy'
  mtime = os.stat(en_tokens).st_mtime_ns
  write_files(tmp_path / 'hi', {'new.txt': DEVANAGARI * 20})
  edited = build()
  assert cached(edited) == dict(en=True, hi=False) and os.stat(en_tokens).st_mtime_ns == mtime
  assert edited.stats['sources']['hi']['documents'] == 13


def test_mixture_tokenizer_is_keyed_by_the_mixture(mixed, corpora, tmp_path):
  _, workdir = mixed
  shutil.copytree(workdir, tmp_path / 'workdir')
  assert make_data(mixture_config(corpora), tmp_path / 'workdir').stats['tokens_cached']
  # New weights retrain the tokenizer; here on all the text again (tokenizer_train_chars is more
  # than both sources hold), so it comes out the same and the token caches stay valid.
  reweighted = make_data(mixture_config(corpora, en=0.5, hi=0.5), tmp_path / 'workdir')
  assert reweighted.stats['tokenizer_trained'] and reweighted.stats['tokens_cached']

  # Sampling less text than the sources hold, each source gets its weight's share of it.
  def script_pieces(en, hi):
    tokenizer = make_data(mixture_config(corpora, en, hi, tokenizer_train_chars=4000),
                          tmp_path / f'{en}-{hi}').tokenizer
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    return [sum(len(piece) > 1 and piece.strip(' ' + alphabet) == '' for piece in pieces)
            for alphabet in (LATIN, DEVANAGARI)]

  (en_heavy_latin, en_heavy_devanagari), (hi_heavy_latin, hi_heavy_devanagari) = (
      script_pieces(0.8, 0.2), script_pieces(0.2, 0.8))
  assert en_heavy_latin > hi_heavy_latin and en_heavy_devanagari < hi_heavy_devanagari


def test_mixture_source_errors_name_the_entry(mixed, corpora, tmp_path):
  data, _ = mixed
  write_files(tmp_path, {'empty/a.txt': ' \n', 'small/a.txt': DEVANAGARI})
  for hi, problem, given_tokenizer in [
      (f'text:{tmp_path}/nothing*.txt', "no files match '.*nothing", False),
      (f'text:{tmp_path}/nothing*.txt', "no files match '.*nothing", True),
      (f'text:{tmp_path}/empty/*.txt', 'holds no text', True),
      (f'text:{tmp_path}/small/*.txt', r'The corpus is too small: \d+ tokens', True)]:
    config = mixture_config(dict(corpora, hi=hi),
                            tokenizer=data.tokenizer.path if given_tokenizer else '')
    with pytest.raises(ValueError, match=re.escape(
        f'config.data.mixture entry hi={hi!r}') + f':? {problem}'):
      make_data(config, tmp_path / 'workdir')
