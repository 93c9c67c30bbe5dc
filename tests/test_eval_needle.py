"""lm.eval.needle: prompts of exact length with the needle at its depth, scored by stand-in models
(one that copies the needle from the token ids it is given, one that never can), and the CLI on a
real tiny checkpoint."""

import json
import os
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

import eval_fixtures

from lm import tokenizer as tokenizer_lib
from lm.eval import needle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILLER = ' '.join(needle.FILLER_SENTENCES)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  """A small Llama-style SentencePiece model (digits split) trained on the filler and needle."""
  path = str(tmp_path_factory.mktemp('needle') / 'spm.model')
  texts = [FILLER, needle.QUESTION, '0123456789 ' * 20,
           needle.NEEDLE.format(number='12345')]
  return tokenizer_lib.train_tokenizer(texts, 400, path, max_chars=0, seed=0)


class StandIn:
  """The Scorer interface over a rule instead of a network; it records every prompt it gets."""

  def __init__(self, tokenizer, max_length, answer):
    self.tokenizer, self.max_length, self.answer = tokenizer, max_length, answer
    self.prompts = []

  def generate(self, prompts, *, max_new_tokens, until=(), temperature=0.0):
    assert temperature == 0.0
    texts = []
    for prompt in prompts:
      assert prompt[0] == self.tokenizer.bos_id
      assert len(prompt) + max_new_tokens <= self.max_length
      self.prompts.append(list(prompt))
      texts.append(self.answer(self.tokenizer.decode(prompt)))
    return texts


def copy_the_needle(text: str) -> str:
  """What a model that can copy says: the last number stated before the question."""
  question = text.rindex(needle.QUESTION)
  stated = re.findall(r'secret number is (\d+)', text[:question])
  return f' {stated[-1]}.' if stated else ' I do not know.'


def test_the_needle_heatmap_of_a_model_that_can_copy_is_all_correct(tokenizer, tmp_path):
  model = StandIn(tokenizer, 256, copy_the_needle)
  lengths, depths = [64, 100, 128, 256], [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
  grid = needle.needle_grid(model, lengths, depths, trials=3, seed=7, filler_text=FILLER)
  assert np.array_equal(grid['accuracy'], np.ones((len(depths), len(lengths))))
  assert grid['mean_accuracy'] == 1.0
  assert len(model.prompts) == len(grid['samples']) == len(lengths) * len(depths) * 3
  assert sorted({len(p) for p in model.prompts}) == [L - needle.MAX_NEW_TOKENS for L in lengths]
  # Three trials, three different needles, the same in every cell.
  assert len({s['number'] for s in grid['samples']}) == 3
  path = needle.plot_heatmap(grid, str(tmp_path / 'needle.png'))
  assert matplotlib.image.imread(path).ndim == 3


def test_a_model_that_answers_a_fixed_wrong_number_scores_zero(tokenizer):
  model = StandIn(tokenizer, 128, lambda text: ' 1234.')  # Four digits: never a needle.
  grid = needle.needle_grid(model, [64, 128], [0.0, 0.5, 1.0], trials=2, seed=0,
                            filler_text=FILLER)
  assert np.array_equal(grid['accuracy'], np.zeros((3, 2)))
  table = needle.markdown_table(grid)
  assert table.splitlines()[0] == '| depth \\ length | 64 | 128 |'
  assert '| 0.50 | 0.00 | 0.00 |' in table and '| mean | 0.00 | 0.00 |' in table


@pytest.mark.parametrize('length', [64, 128, 512])
@pytest.mark.parametrize('depth', [0.0, 0.3, 0.5, 0.8, 1.0])
def test_the_needle_sits_whole_at_its_depth_on_a_sentence_boundary(tokenizer, length, depth):
  sentences_ids = [tokenizer.encode(s) for s in needle.FILLER_SENTENCES]
  prompt = needle.build_prompt(tokenizer, sentences_ids, length, depth, '58213',
                               np.random.default_rng(0))
  needle_ids = tokenizer.encode(needle.NEEDLE.format(number='58213'))
  question_ids = tokenizer.encode(needle.QUESTION)
  tokens = prompt.tokens
  assert len(tokens) == length - needle.MAX_NEW_TOKENS
  assert tokens[prompt.needle_start:prompt.needle_start + len(needle_ids)] == needle_ids
  assert tokens[-len(question_ids):] == question_ids
  filler = len(tokens) - 1 - len(needle_ids) - len(question_ids)
  assert prompt.filler_tokens == filler
  # Within half a sentence of the requested depth, and after a whole sentence (or first).
  longest = max(map(len, sentences_ids))
  assert abs((prompt.needle_start - 1) - depth * filler) <= longest / 2 + 1
  before = tokenizer.decode(tokens[1:prompt.needle_start])
  assert before == '' or before.endswith('.'), before[-40:]
  assert abs(prompt.depth - depth) <= (longest / 2 + 1) / filler


def test_filler_without_sentence_ends_takes_the_needle_at_its_exact_token(tokenizer):
  sentences_ids = [tokenizer.encode('the river bends ' * 40)]
  prompt = needle.build_prompt(tokenizer, sentences_ids, 256, 0.5, '58213',
                               np.random.default_rng(0))
  assert abs((prompt.needle_start - 1) - 0.5 * prompt.filler_tokens) <= 0.5


def test_filler_text_splits_at_sentence_ends_and_blank_lines():
  text = 'One here.  Two\nlines!\n\nA heading\n\nWhy? Yes'
  assert needle.filler_sentences(text) == ['One here.', 'Two lines!', 'A heading', 'Why?', 'Yes']
  assert needle.filler_sentences(' \n\n ') == []


def test_answers_count_only_as_whole_numbers():
  assert needle.is_correct('58213', ' 58213.')
  assert needle.is_correct('58213', 'It is 58213')
  assert not needle.is_correct('58213', ' 582130.')
  assert not needle.is_correct('58213', ' 5821')


def test_default_lengths_are_powers_of_two_up_to_max_length_that_hold_the_needle(tokenizer):
  assert needle.default_lengths(128) == [64, 128]
  assert needle.default_lengths(1024) == [64, 128, 256, 512, 1024]
  assert needle.default_lengths(300) == [64, 128, 256, 300]
  assert needle.default_lengths(1024, shortest=70) == [128, 256, 512, 1024]
  grid = needle.needle_grid(StandIn(tokenizer, 300, copy_the_needle), None, [0.5], 1, 0, FILLER)
  assert grid['lengths'] == [64, 128, 256, 300] and np.shape(grid['accuracy']) == (1, 4)


def test_bad_grids_name_what_is_wrong(tokenizer):
  model = StandIn(tokenizer, 128, copy_the_needle)
  with pytest.raises(ValueError, match=r'lengths \[256\] exceed the model\'s max_length=128'):
    needle.needle_grid(model, [64, 256], [0.5], 1, 0, FILLER)
  with pytest.raises(ValueError, match=r'depths \[1.5\] are outside \[0, 1\]'):
    needle.needle_grid(model, [64], [0.5, 1.5], 1, 0, FILLER)
  shortest = needle.shortest_length(tokenizer, ['12345'])
  with pytest.raises(ValueError, match=rf'lengths \[16\] are too short: this tokenizer needs '
                                       rf'{shortest} tokens'):
    needle.needle_grid(model, [16, 64], [0.5], 1, 0, FILLER)
  with pytest.raises(ValueError, match=rf'max_length=20 is under the {shortest} tokens'):
    needle.needle_grid(StandIn(tokenizer, 20, copy_the_needle), None, [0.5], 1, 0, FILLER)
  with pytest.raises(ValueError, match='no sentences'):
    needle.needle_grid(model, [64], [0.5], 1, 0, '  \n ')


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'lm.eval', 'needle', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)


def test_the_cli_writes_heatmap_json_and_table_for_a_tiny_checkpoint(tiny_llama, tmp_path):
  # The fixture's 400-piece tokenizer (trained on Python source) spells English almost letter by
  # letter: needle and question take about 70 tokens, so 64 does not fit.
  filler = tmp_path / 'filler.txt'
  filler.write_text('The quick brown fox jumps over the lazy dog.\n\nA second paragraph here.')
  out = tmp_path / 'out'
  result = _cli('--checkpoint', tiny_llama.lm, '--lengths', '96,128', '--depths', '0,0.5,1',
                '--trials', '2', '--filler', str(filler), '--output_path', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| depth \\ length | 96 | 128 |' in result.stdout
  assert sorted(os.listdir(out)) == ['needle.json', 'needle.md', 'needle.png']
  grid = json.loads((out / 'needle.json').read_text())
  assert np.shape(grid['accuracy']) == (3, 2)
  assert grid['lengths'] == [96, 128] and grid['depths'] == [0.0, 0.5, 1.0]
  assert len(grid['samples']) == 12
  assert {s['prompt_tokens'] for s in grid['samples']} == {96 - needle.MAX_NEW_TOKENS,
                                                          128 - needle.MAX_NEW_TOKENS}
  assert grid['checkpoint'] == tiny_llama.lm and grid['filler'] == str(filler)
  assert matplotlib.image.imread(str(out / 'needle.png')).ndim == 3


def test_the_cli_says_what_is_wrong_in_one_line(tiny_llama, tmp_path):
  no_tokenizer = eval_fixtures.without_tokenizer(tiny_llama.lm, str(tmp_path / 'no_tokenizer'))
  cases = [  # The first two need the model; the others fail before loading it.
      (['--checkpoint', tiny_llama.lm, '--lengths', '128,256'], "exceed the model's max_length"),
      (['--checkpoint', str(no_tokenizer)], 'has no tokenizer'),
      (['--checkpoint', tiny_llama.lm, '--depths', '0,1.5'], r'outside \[0, 1\]'),
      (['--checkpoint', tiny_llama.lm, '--filler', str(tmp_path / 'missing.txt')],
       'missing.txt does not exist'),
      (['--checkpoint', tiny_llama.lm, '--lengths', '64,abc'], 'expected comma-separated'),
      (['--lengths', '64'], 'required: --checkpoint'),
  ]
  for args, message in cases:
    result = _cli(*args)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert re.fullmatch(f'error: .*{message}.*', result.stderr.strip()), result.stderr
