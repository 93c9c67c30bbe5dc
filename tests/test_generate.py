"""KV-cached decoding equals full recomputation; samplers, beam search, the sample CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import generate
from lm import kv_cache
from lm import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scanned layers compile faster; test_cached_logits... covers the unrolled loop too.
SMALL = model_lib.ModelConfig(
    vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
    max_seq_len=64, scan_layers=True)
PROMPTS = [[5, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
_apply = jax.jit(model_lib.apply, static_argnums=0)


@pytest.fixture(scope='module')
def small():
  return model_lib.init(SMALL, 0)


@pytest.mark.parametrize('variant', [{'scan_layers': False}, {'block': 'gpt2'}],
                         ids=['llama_unrolled', 'gpt2_scanned'])
def test_cached_logits_equal_full_recomputation_at_every_step(variant):
  """Two left-padded prompts of different lengths, prefilled then decoded one token per step:
  each row's logits equal a full forward pass over that row's sequence alone."""
  cfg = dataclasses.replace(SMALL, **variant)
  graphdef, params = model_lib.init(cfg, 0)
  sequences = [list(range(3, 19)), list(range(40, 56))]
  prompt_lens = [6, 2]
  tokens_BP, segment_ids_BP, positions_BP = generate.left_pad(
      [s[:n] for s, n in zip(sequences, prompt_lens)], multiple=1)
  cache = kv_cache.init(cfg, 2, 6 + 10)
  logits_BPV, cache = _apply(graphdef, params, tokens_BP, segment_ids_BP, positions_BP, cache)
  steps = [logits_BPV[:, -1]]
  for step in range(10):
    tokens_B1 = jnp.array([[s[n + step]] for s, n in zip(sequences, prompt_lens)])
    positions_B1 = jnp.array([[n + step] for n in prompt_lens])
    logits_B1V, cache = _apply(graphdef, params, tokens_B1, jnp.ones_like(tokens_B1), positions_B1,
                               cache)
    steps.append(logits_B1V[:, 0])
  assert int(cache['index']) == 16 and cache['k'].shape == (2, 2, 16, 2, 8)  # [L, B, S, K, Q]
  full_BTV = _apply(graphdef, params, jnp.array(sequences))  # Rows alone: no padding, 1 segment.
  for row, n in enumerate(prompt_lens):
    full_TV = full_BTV[row]
    cached_TV = jnp.stack([logits_BV[row] for logits_BV in steps])
    np.testing.assert_allclose(cached_TV, full_TV[n - 1:n + 10], atol=2e-5, rtol=1e-5)


def test_greedy_is_deterministic_and_the_argmax_of_full_recomputation(small):
  graphdef, params = small
  first = generate.sample(graphdef, params, PROMPTS, max_new_tokens=8, temperature=0)
  again = generate.sample(graphdef, params, PROMPTS, max_new_tokens=8, temperature=0)
  assert [c.tokens for c in first] == [c.tokens for c in again]
  # Right-padded to one length: causal attention keeps the padding out of earlier logits.
  rows = [p + c.tokens for p, c in zip(PROMPTS, first)]
  full_BTV = _apply(graphdef, params, jnp.array([r + [0] * (17 - len(r)) for r in rows]))
  for prompt, completion, logits_TV in zip(PROMPTS, first, full_BTV):
    assert len(completion.tokens) == 8 and completion.finish_reason == 'length'
    n = len(prompt)
    logits_TV = logits_TV[:n + 8]
    np.testing.assert_array_equal(np.argmax(logits_TV[n - 1:-1], -1), completion.tokens)
    logprobs = jax.nn.log_softmax(logits_TV[n - 1:-1])
    expected = np.take_along_axis(logprobs, np.array(completion.tokens)[:, None], 1)[:, 0]
    np.testing.assert_allclose(completion.logprobs, expected, atol=1e-5)


@pytest.mark.parametrize('sampling', [dict(temperature=0), dict(temperature=0.9, top_k=20,
                                                                top_p=0.9)],
                         ids=['greedy', 'top_k_top_p'])
def test_a_batch_equals_each_prompt_alone(small, sampling):
  graphdef, params = small
  batched = generate.sample(graphdef, params, PROMPTS, max_new_tokens=8, seed=[4, 5, 6],
                            **sampling)
  for prompt, seed, together in zip(PROMPTS, [4, 5, 6], batched):
    [alone] = generate.sample(graphdef, params, [prompt], max_new_tokens=8, seed=seed, **sampling)
    assert alone.tokens == together.tokens
    np.testing.assert_allclose(alone.logprobs, together.logprobs, atol=1e-5)


def test_temperature_near_zero_equals_greedy(small):
  graphdef, params = small
  greedy = generate.sample(graphdef, params, PROMPTS, max_new_tokens=8, temperature=0)
  cold = generate.sample(graphdef, params, PROMPTS, max_new_tokens=8, temperature=1e-4, seed=9)
  assert [c.tokens for c in cold] == [c.tokens for c in greedy]


# Probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 over tokens 5, 0, 3, 1, 2, 4.
_PROBS = np.array([0.25, 0.1, 0.06, 0.15, 0.04, 0.4])


def _draws(n=4000, **filters):
  logits_BV = jnp.broadcast_to(jnp.log(jnp.asarray(_PROBS, jnp.float32)), (n, 6))
  keys_B = jax.random.split(jax.random.key(0), n)
  tokens_B = _choose(logits_BV, keys_B, 1.0, filters['top_k'], filters['top_p'])
  return set(np.asarray(tokens_B).tolist())


_choose = jax.jit(generate.choose_tokens)


@pytest.mark.parametrize('filters, allowed', [
    (dict(top_k=3, top_p=1.0), {5, 0, 3}),
    (dict(top_k=0, top_p=0.6), {5, 0}),  # 0.4 < 0.6, then 0.65 >= 0.6: two tokens.
    (dict(top_k=0, top_p=0.3), {5}),
    (dict(top_k=0, top_p=1.0), {0, 1, 2, 3, 4, 5}),
    (dict(top_k=2, top_p=0.6), {5}),  # Within the top 2: 0.4 / 0.65 = 0.62 >= 0.6.
])
def test_top_k_and_top_p_never_emit_outside_their_set(filters, allowed):
  assert _draws(**filters) == allowed  # Every allowed token is drawn, no other ever is.


def test_top_k_and_top_p_keep_exactly_their_count_among_tied_logits():
  """Ties rank by token id: top_k=2 over [0, 1, 1, 1] keeps tokens 1 and 2, not all three 1s,
  and the nucleus 0.5 keeps two of four equal logits, not all four."""
  logits_BV = jnp.asarray([[0.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])

  def kept(top_k, top_p):
    return np.isfinite(np.asarray(generate.filter_logits(logits_BV, 1.0, top_k, top_p)))

  np.testing.assert_array_equal(kept(2, 1.0), [[0, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(kept(1, 1.0), np.eye(4, dtype=bool)[np.argmax(logits_BV, -1)])
  np.testing.assert_array_equal(kept(0, 0.5), [[0, 1, 1, 0], [1, 1, 0, 0]])  # 0.30 + 0.30.


def _bigram_model():
  """SMALL with next-token probabilities that depend only on the current token: attention and
  MLP outputs are zero, tokens 1, 3, 4 embed one-hot (as dims 0, 1, 2) and the unembedding's
  rows 0, 1, 2 hold log p(next | 1, 3, 4) (RMSNorm scales one-hot rows by ~sqrt(d_model)).

  From BOS (1): A (3) 0.5, B (4) 0.4. From A: EOS (2) 0.3, else spread; from B: EOS 0.97.
  Greedy takes A then EOS (p = 0.15); beam search finds B then EOS (p = 0.388).
  """
  graphdef, params = model_lib.init(SMALL, 0)
  V, D = SMALL.vocab_size, SMALL.d_model
  probs = np.full((3, V), 1e-3)
  probs[0, [3, 4, 5]] = [50, 40, 9]
  probs[1, [2, 5, 6, 7]] = [30, 25, 25, 19]
  probs[2, [2, 5]] = [97, 2]
  log_probs = np.log(probs / probs.sum(1, keepdims=True))
  embed = np.zeros((V, D), np.float32)
  embed[[1, 3, 4], [0, 1, 2]] = 1.0
  embed[np.setdiff1d(np.arange(V), [1, 3, 4]), 3] = 1.0  # Every other token: uniform.
  unembed = np.zeros((D, V), np.float32)
  unembed[:3] = log_probs / np.sqrt(D)
  blocks = params['blocks']
  blocks['attention']['w_o'] = jnp.zeros_like(blocks['attention']['w_o'])
  blocks['mlp']['w_down'] = jnp.zeros_like(blocks['mlp']['w_down'])
  params = {**params, 'embed': jnp.asarray(embed), 'unembed': jnp.asarray(unembed)}
  return graphdef, params, log_probs


def test_beam_search_beats_greedy_on_a_constructed_case_and_ranks_its_beams():
  graphdef, params, log_probs = _bigram_model()
  [greedy] = generate.sample(graphdef, params, [[1]], max_new_tokens=4, temperature=0,
                             stop_tokens=[2])
  assert greedy.tokens == [3, 2] and greedy.finish_reason == 'stop_token'
  [beams] = generate.beam_search(graphdef, params, [[1]], max_new_tokens=4, num_beams=3,
                                 num_return=3, stop_tokens=[2], length_alpha=1.0)
  assert beams[0].tokens == [4, 2]
  np.testing.assert_allclose(beams[0].logprobs, [log_probs[0, 4], log_probs[2, 2]], atol=1e-3)
  assert beams[0].score > sum(greedy.logprobs) / len(greedy.tokens)
  for beam in beams:
    np.testing.assert_allclose(beam.score, sum(beam.logprobs) / len(beam.tokens), atol=1e-5)
  assert [b.score for b in beams] == sorted([b.score for b in beams], reverse=True)


def test_beam_size_one_equals_greedy(small):
  graphdef, params = small
  greedy = generate.sample(graphdef, params, PROMPTS, max_new_tokens=8, temperature=0)
  beams = generate.beam_search(graphdef, params, PROMPTS, max_new_tokens=8, num_beams=1)
  assert [b[0].tokens for b in beams] == [g.tokens for g in greedy]


class _LetterTokenizer:
  """Token t is the letter 'a' + t; enough to test stop strings without SentencePiece."""
  bos_id, eos_id = 1, 2

  def encode(self, text):
    return [ord(c) - ord('a') for c in text]

  def decode(self, ids):
    return ''.join(chr(ord('a') + int(t)) for t in ids)


def test_stop_tokens_and_stop_strings_cut_the_completion():
  graphdef, params, _ = _bigram_model()
  tokenizer = _LetterTokenizer()
  [stopped] = generate.sample(graphdef, params, ['b'], tokenizer=tokenizer, add_bos=False,
                              max_new_tokens=4, temperature=0)
  assert stopped.tokens == [3, 2] and stopped.text == 'd'  # EOS ends it, not in the text.
  [cut] = generate.sample(graphdef, params, ['b'], tokenizer=tokenizer, add_bos=False,
                          max_new_tokens=4, temperature=0, stop_strings=['d'])
  assert cut.tokens == [3] and cut.text == '' and cut.finish_reason == 'stop_string'


class _PieceTokenizer:
  """Pieces of a few characters; like SentencePiece, decoding drops the first piece's leading
  space (the dummy prefix) while piece_texts keeps it."""
  bos_id, eos_id, vocab_size = 1, 2, SMALL.vocab_size
  PIECES = {3: ' ab', 2: 'c', 0: 'd\ne'}

  def decode(self, ids):
    return ''.join(self.PIECES.get(int(t), '?') for t in ids).removeprefix(' ')

  def piece_texts(self):
    return [self.PIECES.get(i, '?') for i in range(self.vocab_size)]


@pytest.mark.parametrize('stop_strings, tokens, text, reason', [
    (['bc'], [3, 2], 'a', 'stop_string'),  # Spans two pieces: the one completing it is kept.
    (['\n'], [3, 2, 0], 'abcd', 'stop_string'),  # Inside one piece, text on both sides.
    (['q'], [3, 2, 0, 0, 0], 'abcd\ned\ned\ne', 'length'),  # Never produced.
    ([' '], [3, 2, 0, 0, 0], 'abcd\ned\ned\ne', 'length'),  # Only in the dropped dummy prefix.
    (['e', 'bcd'], [3, 2, 0], 'a', 'stop_string'),  # Both appear with token 0; 'bcd' first.
], ids=['spanning', 'inside_one_piece', 'never', 'leading_space', 'earliest_of_two'])
def test_stop_strings_end_tokens_and_text_at_one_place(stop_strings, tokens, text, reason):
  """Greedy from BOS is 3, 2, 0, 0, ... (' ab', 'c', 'd\\ne', ...; 2 is no stop token here):
  tokens end with the first at which the text so far holds a stop string, text just before it."""
  graphdef, params, _ = _bigram_model()
  [completion] = generate.sample(graphdef, params, [[1]], tokenizer=_PieceTokenizer(),
                                 max_new_tokens=5, temperature=0, stop_tokens=[],
                                 stop_strings=stop_strings)
  assert (completion.tokens, completion.text, completion.finish_reason) == (tokens, text, reason)
  assert len(completion.logprobs) == len(tokens)
  assert _PieceTokenizer().decode(tokens).startswith(text)


def test_bad_inputs_name_what_is_wrong(small):
  graphdef, params = small
  with pytest.raises(ValueError, match='top_p=0'):
    generate.sample(graphdef, params, PROMPTS, top_p=0.0)
  with pytest.raises(ValueError, match='temperature=-1'):
    generate.sample(graphdef, params, PROMPTS, temperature=-1)
  with pytest.raises(ValueError, match='max_seq_len=64'):
    generate.sample(graphdef, params, [[1] * 60], max_new_tokens=8)
  with pytest.raises(ValueError, match='tokenizer='):
    generate.sample(graphdef, params, ['def fib(n):'])
  with pytest.raises(ValueError, match='non-empty list'):
    generate.sample(graphdef, params, 'def fib(n):')
  with pytest.raises(ValueError, match='num_return=3'):
    generate.beam_search(graphdef, params, PROMPTS, num_beams=2, num_return=3)
  config = config_lib.base_config()
  config.sample.top_p = 1.5
  with pytest.raises(config_lib.ConfigError, match=r'config\.sample\.top_p=1\.5'):
    config_lib.validate(config)
  config.sample.top_p, config.mode = 0.9, 'sample'
  with pytest.raises(config_lib.ConfigError, match=r'config\.sample\.prompt'):
    config_lib.validate(config)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir as training leaves it (config.json, tokenizer/spm.model, checkpoints/1) for a
  tiny model; its parameters are freshly initialised, as training would only add time here."""
  from lm import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from lm import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('run')
  config = config_lib.load_config('configs/tiny.py', model=dict(
      d_model=32, d_ff=64, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=400,
      max_seq_len=64, dtype='float32'))
  texts = [open(os.path.join(os.path.dirname(os.__file__), name)).read()
           for name in ('os.py', 'random.py', 'textwrap.py')]
  tokenizer_lib.train_tokenizer(texts, 400, str(workdir / 'tokenizer' / 'spm.model'),
                                max_chars=100_000, seed=0)
  cfg = model_lib.ModelConfig.from_config(config)
  optimizer = train.make_optimizer(config.train, model_lib.logical_axes(cfg))
  checkpointer = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'), async_save=False)
  checkpointer.save(1, train.init_state(cfg, optimizer, 0), {})
  checkpointer.close()
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  return workdir


def test_sample_cli_prints_completions_from_the_latest_checkpoint(workdir, tmp_path):
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text('import os\n\nclass A:\\n  def\n')
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
       '--workdir', str(workdir), '--config.mode=sample', '--config.sample.prompt=def fib(n):',
       f'--config.sample.prompts_file={prompts_file}', '--config.sample.max_new_tokens=8',
       '--config.sample.temperature=0.8', '--config.sample.top_p=0.95',
       '--config.sample.top_k=40', '--config.sample.num_samples=2',
       f'--config.sample.output={tmp_path / "teacher.jsonl"}'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  headers = [line for line in result.stdout.splitlines() if line.startswith('=== prompt')]
  assert len(headers) == 6  # 3 prompts x 2 samples.
  assert "=== prompt 'class A:\\n  def', completion 1" in result.stdout
  assert '\ndef fib(n):' in result.stdout
  # The same completions as SFT records (a teacher's answers to distil).
  records = [json.loads(line) for line in open(tmp_path / 'teacher.jsonl')]
  assert [r['prompt'] for r in records] == ['def fib(n):'] * 2 + ['import os'] * 2 + [
      'class A:\n  def'] * 2
  for r in records:  # (The captured text turns an untrained model's '\r' into '\n'.)
    assert (r['prompt'] + r['response']).replace('\r', '\n') in result.stdout


def test_sample_from_config_errors_name_the_problem(workdir, tmp_path):
  config = config_lib.load_config('configs/tiny.py')
  config.sample.prompt = 'x = 1\n' * 100
  with pytest.raises(ValueError, match=r'config\.sample: prompt 0 has \d+ tokens.*max_seq_len'):
    generate.sample_from_config(config, str(workdir))
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    generate.sample_from_config(config, str(tmp_path))
