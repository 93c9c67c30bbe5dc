"""lm.eval ppl: bits per byte equals the harness's own on the same documents; mixtures; errors."""

import json
import math
import os
import subprocess
import sys

import pytest

from lm.eval import harness
from lm.eval import perplexity
from lm.eval import scoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def scorer(tiny_llama):
  return scoring.Scorer.load(tiny_llama.lm, dtype='float32', progress=False)


@pytest.fixture(scope='module')
def documents_jsonl(tmp_path_factory):
  import eval_fixtures  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('docs') / 'docs.jsonl'
  path.write_text(''.join(json.dumps(dict(body=d)) + '\n' for d in eval_fixtures.DOCUMENTS))
  return str(path), eval_fixtures.DOCUMENTS


def test_bits_per_byte_and_word_perplexity_equal_the_harness_rolling_task(
    scorer, documents_jsonl, local_tasks, monkeypatch):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  include, names = local_tasks
  path, docs = documents_jsonl
  assert max(len(scorer.tokenizer.encode(d)) for d in docs) > 2 * scorer.max_length  # Windows.
  [ours] = perplexity.evaluate_source(scorer, f'jsonl:{path}', text_field='body').values()
  model = harness.LMEvalModel(scorer=scorer)
  theirs = harness.evaluate(None, [names['rolling']], include_path=include, model=model)
  theirs = theirs['results'][names['rolling']]
  assert ours['bits_per_byte'] == pytest.approx(theirs['bits_per_byte,none'], rel=1e-6)
  assert ours['word_perplexity'] == pytest.approx(theirs['word_perplexity,none'], rel=1e-5)
  assert ours['documents'] == len(docs)
  assert ours['bytes'] == sum(len(d.encode()) for d in docs)


def test_bits_per_byte_is_the_total_nll_over_the_utf8_bytes(scorer):
  docs = ['नमस्ते दुनिया, यह एक परीक्षा है।', 'plain ascii text here']
  result = perplexity.perplexity(scorer, docs)
  tokens = [scorer.tokenizer.encode(d) for d in docs]
  nll = -sum(scorer.rolling_loglikelihood(tokens))
  assert result['nll'] == pytest.approx(nll, rel=1e-6)
  assert result['bytes'] == sum(len(d.encode('utf-8')) for d in docs) > sum(map(len, docs))
  assert result['bits_per_byte'] == pytest.approx(nll / math.log(2) / result['bytes'])
  assert result['token_perplexity'] == pytest.approx(math.exp(nll / result['tokens']))


def test_a_mixture_reports_each_source(scorer, tmp_path):
  (tmp_path / 'en.txt').write_text('The cat sat on the mat. ' * 20)
  (tmp_path / 'code.txt').write_text('def f(x):\n    return x\n' * 20)
  source = f'en=text:{tmp_path}/en.txt@0.7; code=text:{tmp_path}/code.txt@0.3'
  results = perplexity.evaluate_source(scorer, source)
  assert list(results) == ['en', 'code']
  alone = perplexity.evaluate_source(scorer, f'text:{tmp_path}/code.txt')['all']
  assert results['code']['bits_per_byte'] == pytest.approx(alone['bits_per_byte'], rel=1e-6)


def test_cli_writes_json_and_table_and_names_bad_input(tiny_llama, documents_jsonl, tmp_path):
  path, _ = documents_jsonl
  out = tmp_path / 'out'

  def run(*args):
    return subprocess.run([sys.executable, '-m', 'lm.eval', 'ppl', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)

  result = run('--checkpoint', tiny_llama.lm, '--source', f'jsonl:{path}', '--text_field',
               'body', '--dtype', 'float32', '--output_path', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((out / 'perplexity.json').read_text())
  assert report['results']['all']['documents'] == 4
  assert '| all | 4 |' in (out / 'perplexity.md').read_text() and '| all | 4 |' in result.stdout
  empty = tmp_path / 'empty.txt'
  empty.write_text('  \n')
  for args, message in [
      (['--source', f'text:{empty}'], 'no text'),
      (['--source', f'text:{tmp_path}/missing/*.txt'], 'no files match'),
      (['--source', 'bogus:x'], 'is not a valid source'),
  ]:
    result = run('--checkpoint', tiny_llama.lm, *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
