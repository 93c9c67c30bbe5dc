"""lm.prepare's stage 6 and the prepared:OUT source: shards that decode to exactly the kept
documents, counts that are the real ones, a killed run resumed into the same shards, training
from them (the same stream and split as the kept text tokenized anew), and the errors."""

import glob
import json
import os
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest

from lm import data as data_lib
from lm import sources
from lm import tokenizer as tokenizer_lib
from lm.prepare import config as config_lib
from lm.prepare import pipeline
from lm.prepare import shards
from test_prepare import ENGLISH, FRENCH, HINDI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 512


def _config(directory):
  config = config_lib.base_config()
  config.source = f'jsonl:{directory}/web.jsonl'
  config.quality.gopher.min_doc_words = 20
  config.quality.c4.min_num_sentences = 3
  config.tokenize.vocab_size = VOCAB_SIZE
  config.tasks = 2
  return config


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """40 English and 20 Hindi documents of six sentences each (and an exact copy, French, an email
  address), prepared in two tasks with a 512-piece tokenizer trained on what is kept."""
  directory = str(tmp_path_factory.mktemp('corpus'))
  rng = np.random.default_rng(0)
  web = [dict(id=f'en{i}', text=' '.join(rng.choice(ENGLISH, 6, replace=False))) for i in range(40)]
  web += [dict(id=f'hi{i}', text=' '.join(rng.choice(HINDI, 6, replace=False))) for i in range(20)]
  web[5]['text'] += ' Write to jane@example.com for the rest.'
  web += [dict(id='copy', text=web[3]['text']), dict(id='fr', text=FRENCH)]
  with open(os.path.join(directory, 'web.jsonl'), 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(record, ensure_ascii=False) + '\n' for record in web)
  out = os.path.join(directory, 'out')
  report = pipeline.prepare(_config(directory), out)
  return directory, out, report


def _kept(out):
  """The kept documents, OUT/documents/LANGUAGE/RANK.jsonl, in the shards' order."""
  documents = []
  for path in sorted(glob.glob(os.path.join(out, 'documents', '*', '*.jsonl'))):
    with open(path, encoding='utf-8') as f:
      documents += [json.loads(line) for line in f]
  return documents


def _shard_files(out):
  """{path under OUT/tokens: SHA-256} of every file there, hidden ones included."""
  root = os.path.join(out, 'tokens')
  return {os.path.relpath(os.path.join(d, name), root): shards.file_sha256(os.path.join(d, name))
          for d, _, names in os.walk(root) for name in names}


def test_shards_decode_to_the_kept_documents_and_count_them(prepared):
  _, out, report = prepared
  manifest = shards.read_manifest(out, 'test')
  kept = _kept(out)
  assert len(kept) == 60 and {d['id'] for d in kept} == {f'en{i}' for i in range(40)} | {
      f'hi{i}' for i in range(20)}  # The copy and French are dropped.
  tokenizer = tokenizer_lib.Tokenizer(os.path.join(out, 'tokenizer', 'spm.model'))
  assert manifest['tokenizer'] == os.path.join('tokenizer', 'spm.model')
  assert manifest['tokenizer_sha256'] == shards.file_sha256(tokenizer.path)
  assert (manifest['vocab_size'], manifest['dtype']) == (VOCAB_SIZE, 'uint16')

  records = list(shards.iter_records(out, manifest, 'test'))
  assert [(r.id, r.language) for r in records] == [
      (d['id'], d['metadata']['language']) for d in kept]
  for record, doc in zip(records, kept):  # Round trip, and the ids are the tokenizer's.
    assert tokenizer.decode(record.ids) == doc['text'] and record.chars == len(doc['text'])
    assert record.ids.tolist() == tokenizer.encode(doc['text'])
  scrubbed = next(d['text'] for d in kept if d['id'] == 'en5')  # Shards hold the text as kept.
  assert scrubbed.endswith('Write to <EMAIL> for the rest.')
  assert list(sources.iter_documents(f'prepared:{out}')) == [d['text'] for d in kept]

  # Counts: per language, per shard, in the manifest and in the report.
  languages = {}
  for record in records:
    counts = languages.setdefault(record.language, dict(documents=0, tokens=0, chars=0))
    counts['documents'] += 1
    counts['tokens'] += len(record.ids)
    counts['chars'] += record.chars
  assert {lang: {k: c[k] for k in ('documents', 'tokens', 'chars')}
          for lang, c in manifest['languages'].items()} == languages
  assert sorted(languages) == ['en', 'hi'] and languages['hi']['documents'] == 20
  assert manifest['tokens'] == sum(c['tokens'] for c in languages.values())
  assert [s['path'] for s in manifest['shards']] == [
      f'tokens/{lang}/{rank:05d}-0000.array_record' for lang in ('en', 'hi') for rank in (0, 1)]
  start = 0  # The records are the shards' one after another.
  for shard in manifest['shards']:
    part, start = records[start:start + shard['documents']], start + shard['documents']
    assert {r.language for r in part} == {shard['language']}
    assert shard['tokens'] == sum(len(r.ids) for r in part)
    assert shard['chars'] == sum(r.chars for r in part)
    path = os.path.join(out, shard['path'])
    assert (shard['bytes'], shard['sha256']) == (os.path.getsize(path), shards.file_sha256(path))
  assert start == 60
  assert report['tokens_out'] == manifest['tokens'] and report['tokens']['shards'] == 4
  assert report['tokens']['languages'] == manifest['languages']
  assert {lang: c['tokens'] for lang, c in report['languages'].items()} == {
      lang: c['tokens'] for lang, c in languages.items()}
  tokenize = report['stages'][-1]
  assert tokenize['name'] == 'tokenize' and tokenize['documents_in'] == tokenize['documents_out']
  assert tokenize['documents_out'] == report['documents_out'] == 60
  assert {lang: c['tokens_out'] for lang, c in tokenize['languages'].items()} == {
      lang: c['tokens'] for lang, c in languages.items()}
  assert 'tokens_out' not in report['stages'][-2]

  # grain reads the shards as they are.
  source = shards.data_source(out)
  assert len(source) == 60
  dataset = grain.MapDataset.source(source).map(lambda r: shards.decode_record(r, 'uint16'))
  for i in (0, 39, 59):
    assert dataset[i].id == records[i].id and np.array_equal(dataset[i].ids, records[i].ids)


def test_a_killed_run_resumes_into_the_same_shards(prepared, tmp_path, monkeypatch):
  """With config.tokenize.tokenizer given (a copy of the one the fixture trained): the same
  shards, whether the run is killed, resumed, or loses a shard."""
  directory, out, _ = prepared
  given = str(tmp_path / 'given.model')
  shutil.copyfile(os.path.join(out, 'tokenizer', 'spm.model'), given)
  config, resumed = _config(directory), str(tmp_path / 'out')
  config.tokenize.tokenizer = given
  write = shards.ShardWriter.write
  want = _shard_files(out)
  want_manifest = dict(shards.read_manifest(out, 'test'), tokenizer=given)
  del want['manifest.json']

  def same_shards():
    got = _shard_files(resumed)
    del got['manifest.json']
    return got == want and shards.read_manifest(resumed, 'test') == want_manifest

  def killed(self, doc_id, chars, ids):
    if self.rank == 1 and self._counts.get('documents'):  # Task 1, its second document.
      raise KeyboardInterrupt('killed')
    write(self, doc_id, chars, ids)

  monkeypatch.setattr(shards.ShardWriter, 'write', killed)
  with pytest.raises(KeyboardInterrupt):
    pipeline.prepare(config, resumed)
  completions = os.path.join(resumed, 'work', 'logs', 'tokens', 'completions')
  assert os.listdir(completions) == ['00000']
  assert sorted(_shard_files(resumed)) == [
      'en/.00001-0000.array_record.tmp', 'en/00000-0000.array_record',
      'hi/00000-0000.array_record']  # Task 1's shard half-written, under its temporary name.

  monkeypatch.setattr(shards.ShardWriter, 'write', write)
  pipeline.prepare(config, resumed)
  assert same_shards()  # Every shard once; the manifest names the given tokenizer.
  assert not os.path.exists(os.path.join(resumed, 'tokenizer'))  # None trained.

  # A shard lost after its task completed is named, with the marker that makes it written again.
  os.remove(os.path.join(resumed, 'tokens', 'en', '00001-0000.array_record'))
  with pytest.raises(sources.DataError, match=r'en/00001-0000.array_record, written by task 1 of '
                     r'the tokens pass, is missing; delete .*tokens/completions/00001 and run'):
    pipeline.prepare(config, resumed)
  os.remove(os.path.join(completions, '00001'))
  pipeline.prepare(config, resumed)
  assert same_shards()


# ---------------------------------------------------------------------------------------------
# Training from them: data.source='prepared:OUT'.


def _data_config(**overrides):
  from lm import config as lm_config  # pylint: disable=g-import-not-at-top
  config = lm_config.base_config().data
  config.update(dict(seq_len=32, eval_fraction=0.05, max_chars=0))
  config.update(overrides)
  return config


def _make_data(config, workdir, vocab_size=VOCAB_SIZE):
  return data_lib.make_data(config, vocab_size=vocab_size, batch_size=4, seed=0,
                            workdir=str(workdir))


def test_training_packs_the_shards_as_it_would_the_kept_text(prepared, tmp_path):
  """prepared:OUT gives the stream, split and batches that tokenizing the kept documents' text
  gives (the same documents, order and held-out ones), without tokenizing."""
  _, out, _ = prepared
  manifest = shards.read_manifest(out, 'test')
  config = _data_config(source=f'prepared:{out}')
  data = _make_data(config, tmp_path / 'run')
  stats = data.stats
  assert (stats['documents'], stats['chars'], stats['duplicate_documents']) == (
      60, manifest['chars'], 0)
  assert stats['tokens'] == manifest['tokens'] + 2 * 60  # BOS and EOS around each document.
  assert not stats['tokenizer_trained'] and not stats['tokens_cached']
  # With data.tokenizer empty the run takes the shards' tokenizer, copied where checkpoints look.
  assert stats['tokenizer'] == str(tmp_path / 'run' / 'tokenizer' / 'spm.model')
  assert shards.file_sha256(stats['tokenizer']) == manifest['tokenizer_sha256']

  text = _make_data(_data_config(source=f'jsonl:{out}/documents/*/*.jsonl',
                                 tokenizer=stats['tokenizer']), tmp_path / 'text')
  np.testing.assert_array_equal(np.load(tmp_path / 'run' / 'data' / 'tokens.npy'),
                                np.load(tmp_path / 'text' / 'data' / 'tokens.npy'))
  assert {k: v for k, v in text.stats.items() if k != 'tokenizer'} == {
      k: v for k, v in stats.items() if k != 'tokenizer'}
  for want, got in zip(text.eval_batches(10**6) + [next(text.train_iter)],
                       data.eval_batches(10**6) + [next(data.train_iter)], strict=True):
    for name in want:
      np.testing.assert_array_equal(want[name], got[name])
  assert _make_data(config, tmp_path / 'run').stats == dict(stats, tokens_cached=True)

  # data.max_chars takes whole documents, in the shuffled order, until it has that many chars.
  limited = _make_data(_data_config(source=f'prepared:{out}', max_chars=5000), tmp_path / 'few')
  longest = max(record.chars for record in shards.iter_records(out, manifest, 'test'))
  assert 5000 <= limited.stats['chars'] < 5000 + longest
  assert limited.stats['documents'] < 60

  # In a mixture, beside a text source that the shards' tokenizer then tokenizes too.
  mixed = _make_data(_data_config(mixture=f'p=prepared:{out}@1; en=jsonl:{out}/documents/en/*'
                                  '.jsonl@1'), tmp_path / 'mixed')
  assert not mixed.stats['tokenizer_trained']
  assert mixed.stats['sources']['p']['tokens'] == stats['tokens']
  assert mixed.stats['sources']['en']['documents'] == 40
  assert mixed.stats['documents'] == 100


def test_errors_name_the_tokenizers_and_the_files(prepared, tmp_path):
  directory, out, _ = prepared
  config = _config(directory)
  config.tokenize.tokenizer = str(tmp_path / 'none.model')
  with pytest.raises(config_lib.ConfigError, match=(
      r"config.tokenize.tokenizer='.*none.model': no such file; expected a SentencePiece")):
    pipeline.prepare(config, str(tmp_path / 'p'))
  config = _config(directory)
  config.source = f'prepared:{out}'
  with pytest.raises(sources.DataError, match=r'is the output of lm.prepare \(token shards\), not '
                     rf'an input it reads; its documents are jsonl:{out}/documents/\*/\*.jsonl'):
    pipeline.prepare(config, str(tmp_path / 'p'))

  theirs = os.path.join(out, 'tokenizer', 'spm.model')
  proto = tokenizer_lib.read_model_proto(theirs)
  proto.pieces[-1].score -= 1.0  # Another valid tokenizer.
  other = tmp_path / 'other.model'
  other.write_bytes(proto.SerializeToString())
  source = f'prepared:{out}'
  with pytest.raises(sources.DataError, match=(
      rf"data.source='{source}': its shards were made with the tokenizer '{theirs}' \(sha256 "
      rf"\w+\.\.\.\), but this run tokenizes with '{other}', another one")):
    _make_data(_data_config(source=source, tokenizer=str(other)), tmp_path / 'a')
  copy = tmp_path / 'copy.model'  # The same bytes under another name pass.
  shutil.copyfile(theirs, copy)
  assert _make_data(_data_config(source=source, tokenizer=str(copy)),
                    tmp_path / 'b').stats['documents'] == 60
  with pytest.raises(sources.DataError, match=(
      rf"model.vocab_size=1024 but the tokenizer of data.source='{source}', '{theirs}', has 512 "
      r'pieces; set model.vocab_size=512')):
    _make_data(_data_config(source=source), tmp_path / 'c', vocab_size=1024)

  with pytest.raises(sources.DataError, match=(
      rf"data.source='prepared:{tmp_path}/nothing': no {tmp_path}/nothing/tokens/manifest.json; "
      r'expected the output folder of `python -m lm.prepare`')):
    _make_data(_data_config(source=f'prepared:{tmp_path}/nothing'), tmp_path / 'd')

  bad = tmp_path / 'bad'
  for name in ('tokens', 'tokenizer'):
    shutil.copytree(os.path.join(out, name), bad / name)
  manifest = (bad / 'tokens' / 'manifest.json').read_text()
  (bad / 'tokens' / 'manifest.json').write_text(manifest[:100])
  with pytest.raises(sources.DataError, match=r'manifest.json is not a JSON manifest'):
    _make_data(_data_config(source=f'prepared:{bad}'), tmp_path / 'e')
  (bad / 'tokens' / 'manifest.json').write_text(manifest)
  shard = bad / 'tokens' / 'hi' / '00001-0000.array_record'
  data = bytearray(shard.read_bytes())
  data[100] ^= 1
  shard.write_bytes(bytes(data))
  with pytest.raises(sources.DataError, match=(
      rf'the shard {shard} is corrupt or was changed after .*manifest.json was written')):
    _make_data(_data_config(source=f'prepared:{bad}'), tmp_path / 'f')
  shard.unlink()
  with pytest.raises(sources.DataError, match=rf'the shard {shard} of .* is missing'):
    list(sources.iter_documents(f'prepared:{bad}'))


def test_cli_trains_from_the_shards(prepared, tmp_path):
  _, out, _ = prepared
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
       '--workdir', str(workdir), f'--config.data.source=prepared:{out}',
       f'--config.model.vocab_size={VOCAB_SIZE}', '--config.model.d_model=64',
       '--config.model.d_ff=128', '--config.model.num_layers=2', '--config.data.seq_len=64',
       '--config.train.batch_size=8', '--config.train.steps=30', '--config.train.warmup_steps=3',
       '--config.train.log_every=5', '--config.train.eval_every=30',
       '--config.train.eval_batches=2', '--config.train.checkpoint_every=30'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  losses = [r['loss'] for r in rows if 'loss' in r]
  assert len(losses) == 7 and losses[-1] < losses[0] - 1.0, losses  # Step 1, then 6 windows.
  cache = json.load(open(workdir / 'data' / 'manifest.json'))
  tokens = shards.read_manifest(out, 'test')['tokens']
  assert (cache['documents'], cache['tokens']) == (60, tokens + 2 * 60)
