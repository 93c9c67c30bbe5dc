"""Tests of lm/sources.py: reading each kind of source, duplicates, parsing data.mixture."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm import sources as sources_lib


def write_files(directory, texts: dict[str, bytes | str]) -> None:
  for name, text in texts.items():
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode('utf-8'))


# ---------------------------------------------------------------------------------------------
# Sources.


def test_text_glob(tmp_path):
  write_files(tmp_path, {'b.txt': 'second', 'a.txt': 'first\nline', 'sub/c.txt': 'third',
                         'skip.md': 'not matched', 'empty.txt': ' \n'})
  stats = sources_lib.SourceStats()
  docs = list(sources_lib.iter_documents(f'text:{tmp_path}/**/*.txt', stats=stats))
  assert docs == ['first\nline', 'second', 'third']  # Sorted by path; empty file skipped.
  assert (stats.documents, stats.empty_documents, stats.chars) == (3, 1, 21)


def test_non_utf8_is_replaced_and_counted(tmp_path):
  write_files(tmp_path, {'a.txt': b'caf\xe9 latin-1', 'b.txt': 'नमस्ते', 'c.txt': b'\xff\xfe'})
  stats = sources_lib.SourceStats()
  docs = list(sources_lib.iter_documents(f'text:{tmp_path}/*.txt', stats=stats))
  assert docs == ['caf\ufffd latin-1', 'नमस्ते', '\ufffd\ufffd']
  assert stats.non_utf8_documents == 2


def test_jsonl_with_field(tmp_path):
  lines = [json.dumps({'content': 'one', 'id': 1}), '', json.dumps({'content': 'two ✓'}),
           '{"content": "bad \\udcff surrogate"}']
  write_files(tmp_path, {'a.jsonl': '\n'.join(lines) + '\n',
                         'b.jsonl': b'{"content": "caf\xe9"}\n'})
  stats = sources_lib.SourceStats()
  docs = list(sources_lib.iter_documents(f'jsonl:{tmp_path}/*.jsonl', 'content', stats=stats))
  assert docs == ['one', 'two ✓', 'bad ? surrogate', 'caf\ufffd']
  assert stats.non_utf8_documents == 2


@pytest.mark.parametrize('bad_line, message', [
    ('{"text": "unterminated', 'not a JSON line'),
    ('{"body": "x"}', r"no string field data.text_field='text' \(found \['body'\]\)"),
    ('[1, 2]', 'no string field'),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
  write_files(tmp_path, {'a.jsonl': '{"text": "fine"}\n\n' + bad_line + '\n'})
  with pytest.raises(ValueError, match=f'a.jsonl:3: {message}'):
    list(sources_lib.iter_documents(f'jsonl:{tmp_path}/a.jsonl'))


def test_drop_duplicates(tmp_path):
  write_files(tmp_path, {'a.txt': 'same', 'b.txt': 'other', 'c.txt': 'same', 'd.txt': 'same '})
  stats = sources_lib.SourceStats()
  docs = list(sources_lib.iter_documents(f'text:{tmp_path}/*.txt', drop_duplicates=True,
                                      stats=stats))
  assert docs == ['same', 'other', 'same ']  # Exact copies only: 'same ' differs by a space.
  assert (stats.documents, stats.duplicate_documents, stats.chars) == (3, 1, 14)
  assert len(list(sources_lib.iter_documents(f'text:{tmp_path}/*.txt'))) == 4  # Off by default.


def test_stdlib_with_max_chars():
  stats = sources_lib.SourceStats()
  docs = list(sources_lib.iter_documents('stdlib', max_chars=300_000, stats=stats))
  assert sum(map(len, docs)) == stats.chars == 300_000  # The last document is cut to fit.
  assert len(docs) == stats.documents > 10
  assert any('import ' in doc for doc in docs)
  stdlib_files = sources_lib.stdlib_files()
  assert not any('site-packages' in path for path in stdlib_files)


def test_tfds_mock():
  with tfds.testing.mock_data(num_examples=5):
    docs = list(sources_lib.iter_documents('tfds:tiny_shakespeare'))
  assert len(docs) == 5 and all(isinstance(doc, str) and doc.strip() for doc in docs)


def test_tfds_split_bytes_and_field():
  """Real TFDS text features come back as bytes; also checks the split and text_field parsing."""
  splits = []

  def as_data_source(builder, split=None, **kwargs):
    del builder, kwargs
    splits.append(split)
    return [{'sentence': b'hello'}, {'sentence': 'caf\xe9'.encode('latin-1')},
            {'sentence': np.array(b'array')}]

  stats = sources_lib.SourceStats()
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    docs = list(sources_lib.iter_documents('tfds:lm1b:test[:10%]', 'sentence', stats=stats))
    with pytest.raises(ValueError, match="example 0 has no field data.text_field='text'"):
      list(sources_lib.iter_documents('tfds:lm1b'))
  assert docs == ['hello', 'caf\ufffd', 'array'] and stats.non_utf8_documents == 1
  assert splits == ['test[:10%]', 'train']


def test_empty_corpus_errors(tmp_path):
  with pytest.raises(ValueError, match=f'no files match .*{tmp_path}/nothing'):
    sources_lib.iter_documents(f'text:{tmp_path}/nothing*.txt')
  write_files(tmp_path, {'a.txt': '', 'b.txt': '\n  \n'})
  with pytest.raises(ValueError, match=f"data.source='text:{tmp_path}/.*holds no text"):
    list(sources_lib.iter_documents(f'text:{tmp_path}/*.txt'))


@pytest.mark.parametrize('source', ['wikipedia', 'text:', 'csv:*.csv', ''])
def test_unknown_source(source):
  with pytest.raises(ValueError, match=r"data.source=.*'stdlib', 'text:GLOB', 'jsonl:GLOB'"):
    sources_lib.iter_documents(source)


# ---------------------------------------------------------------------------------------------
# Mixtures: parsing data.mixture.


def test_parse_mixture():
  assert sources_lib.parse_mixture(' hi=text:/data/hi/*.txt@0.8;en = stdlib @ 2 ; ') == [
      sources_lib.MixtureSource('hi', 'text:/data/hi/*.txt', 0.8),
      sources_lib.MixtureSource('en', 'stdlib', 2.0)]
  # The name ends at the first '=', the weight starts after the last '@'; no file is looked at.
  assert sources_lib.parse_mixture('A_1=jsonl:/no/such/k=v@home/*.jsonl@1e-3') == [
      sources_lib.MixtureSource('A_1', 'jsonl:/no/such/k=v@home/*.jsonl', 0.001)]


@pytest.mark.parametrize('mixture, entry, problem', [
    ('en stdlib@1', 'en stdlib@1', 'lacks ='),
    ('hi=stdlib@1; en=stdlib', 'en=stdlib', 'lacks @'),
    ('=stdlib@1', '=stdlib@1', "has the name ''"),
    ('en-US=stdlib@1', 'en-US=stdlib@1', "has the name 'en-US'; names become metric names"),
    ('en=stdlib@1; en=stdlib@2', 'en=stdlib@2', "repeats the name 'en'"),
    ('en=stdlib@0', 'en=stdlib@0', "has the weight '0'; expected a positive number"),
    ('en=stdlib@-1', 'en=stdlib@-1', "has the weight '-1'"),
    ('en=stdlib@nan', 'en=stdlib@nan', "has the weight 'nan'"),
    ('en=stdlib@inf', 'en=stdlib@inf', "has the weight 'inf'"),
    ('en=stdlib@', 'en=stdlib@', "has the weight ''"),
    ('en=stdlib@much', 'en=stdlib@much', "has the weight 'much'"),
    ('en=wikipedia@1', 'en=wikipedia@1',
     "has source='wikipedia', which is not a valid source; expected one of 'stdlib', 'text:GLOB'"),
    ('hi=stdlib@1;en=text:@1', 'en=text:@1', "has source='text:', which is not a valid source"),
])
def test_parse_mixture_names_the_bad_entry(mixture, entry, problem):
  with pytest.raises(ValueError) as error:
    sources_lib.parse_mixture(mixture)
  assert str(error.value).startswith(f'config.data.mixture={mixture!r}: entry {entry!r} {problem}')


def test_parse_mixture_needs_an_entry():
  with pytest.raises(ValueError, match=r"^config.data.mixture=' ; ' holds no entries"):
    sources_lib.parse_mixture(' ; ')


def test_parsing_loads_no_data_pipeline():
  """config.validate checks data.mixture with this module alone, which needs no numpy, grain or
  tokenizer: validating stays fast."""
  code = (
      'import sys\n'
      'from lm import sources\n'
      'assert "numpy" not in sys.modules\n'
      'from lm import config\n'
      'c = config.base_config()\n'
      'c.data.mixture = "en=stdlib@1; hi=text:/no/such/*.txt@2"\n'
      'config.validate(c)\n'
      'print(sorted({"grain", "sentencepiece", "tqdm", "lm.data", "lm.token_cache"} & '
      'set(sys.modules)))\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == '[]'


def test_prepared_sources_parse_without_reading(tmp_path):
  """prepared:DIR (lm.prepare's token shards; read in tests/test_prepare_shards.py) is a source of
  its own, in data.source and in mixtures alike; its manifest is read only when used."""
  sources_lib.check_source(f'prepared:{tmp_path}/nothing')
  assert sources_lib.is_prepared('prepared:/out') and not sources_lib.is_prepared('text:prepared')
  assert sources_lib.parse_mixture('web=prepared:/data/out@3; code=stdlib@1') == [
      sources_lib.MixtureSource('web', 'prepared:/data/out', 3.0),
      sources_lib.MixtureSource('code', 'stdlib', 1.0)]
  with pytest.raises(ValueError, match=r"data.source='prepared:' is not a valid source; .*"
                     r"'prepared:DIR' \(token shards of lm.prepare\)"):
    sources_lib.check_source('prepared:')
  with pytest.raises(sources_lib.DataError, match=rf'no {tmp_path}/tokens/manifest.json'):
    list(sources_lib.iter_documents(f'prepared:{tmp_path}'))
