"""The lm-eval adapter against transformers on the same weights and token ids; batching, the CLI,
bad input. Local tasks only (tests/eval_fixtures.py), HF_DATASETS_OFFLINE=1."""

import json
import glob
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import eval_fixtures

from lm_eval import utils as harness_utils

from lm.eval import harness
from lm.eval import scoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
PAIRS = [('Question: What is 2 plus 3?\nAnswer:', ' 5'),
         ('def add(a, b):\n    ', 'return a + b\n'),
         ('import os', '\nimport sys\nimport json'),
         ('The', ' quick brown fox jumps over the lazy dog.'),
         ('', 'An empty context scores the continuation after BOS alone.')]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('DISABLE_MULTIPROC', '1')


@pytest.fixture(scope='module')
def model(tiny_llama):
  return harness.LMEvalModel(checkpoint=tiny_llama.lm, dtype='float32')


def _requests(*args_list):
  return [types.SimpleNamespace(args=args) for args in args_list]


def _hf_logprobs(hf_model, ids):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    logits = hf_model(torch.tensor([ids])).logits[0].double()
  return torch.log_softmax(logits, -1).numpy()


def _hf_score(hf_model, context, continuation):
  """log P(continuation | context) and greedy-ness, by transformers on these exact ids."""
  logprobs = _hf_logprobs(hf_model, context + continuation)[len(context) - 1:-1]
  total = sum(logprobs[i, t] for i, t in enumerate(continuation))
  return total, all(logprobs[i].argmax() == t for i, t in enumerate(continuation))


def _expected_ids(tokenizer, context, continuation):
  """TemplateLM's rule: trailing spaces move to the continuation; context + continuation are
  encoded whole and the continuation is the tail beyond the encoded context; BOS first."""
  if not context:
    return [tokenizer.bos_id], tokenizer.encode(continuation)
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
  context_ids = [tokenizer.bos_id] + tokenizer.encode(context)
  return context_ids, whole[len(context_ids):]


def test_loglikelihoods_equal_transformers_on_the_same_ids(model, tiny_llama):
  results = model.loglikelihood(_requests(*PAIRS))
  for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
    context_ids, continuation_ids = _expected_ids(model.scorer.tokenizer, context, continuation)
    want, want_greedy = _hf_score(tiny_llama.model, context_ids, continuation_ids)
    assert abs(logprob - want) < TOL, (context, logprob, want)
    assert greedy == want_greedy


def test_choices_sharing_a_context_score_as_transformers_does(model, tiny_llama):
  """Continuations of one context run on its KV cache (one pass over the context): the same
  numbers as transformers over each whole sequence, for one- and many-token choices and for
  contexts with 1, 3 and 5 choices (padded to 1, 4 and 8 rows)."""
  tokenizer = model.scorer.tokenizer
  questions = {'Question: What is 2 plus 2?\nAnswer:': [' 4', ' 5', ' four', ' 22'],
               'def area(r):\n    return': [' 3.14 * r * r', ' r', ' None'],
               'x =': [' 1', ' 2', ' 3', ' [1, 2, 3]', ' {"a": 1}'],
               'import': [' os']}
  requests = [(c, a) for c, answers in questions.items() for a in answers]
  results = model.loglikelihood(_requests(*requests))
  for (context, continuation), (logprob, greedy) in zip(requests, results):
    context_ids, continuation_ids = _expected_ids(tokenizer, context, continuation)
    want, want_greedy = _hf_score(tiny_llama.model, context_ids, continuation_ids)
    assert abs(logprob - want) < TOL, (context, continuation, logprob, want)
    assert greedy == want_greedy


def test_a_continuation_the_model_predicts_greedily_is_greedy(model, tiny_llama):
  """is_greedy is True exactly when each continuation token is the argmax: build one that is."""
  tokenizer = model.scorer.tokenizer
  context = [tokenizer.bos_id] + tokenizer.encode('def main():')
  ids = list(context)
  for _ in range(4):
    ids.append(int(_hf_logprobs(tiny_llama.model, ids)[-1].argmax()))
  [(logprob, greedy)] = model.scorer.loglikelihood([(context, ids[len(context):])])
  assert greedy
  assert abs(logprob - _hf_score(tiny_llama.model, context, ids[len(context):])[0]) < TOL


def test_rolling_loglikelihood_equals_transformers_over_the_harness_windows(model, tiny_llama):
  """A document three times longer than max_length: the harness's disjoint windows, each
  scored by transformers, sum to what the adapter reports."""
  tokenizer = model.scorer.tokenizer
  text = ''.join(f'value_{i} = compute({i}, "item {i}")\n' for i in range(40))
  tokens = tokenizer.encode(text)
  assert len(tokens) > 3 * model.max_length
  [got] = model.loglikelihood_rolling(_requests((text,)))
  want, windows = 0.0, 0
  for context, continuation in map(harness_utils.make_disjoint_window,
                                   harness_utils.get_rolling_token_windows(
                                       tokens, tokenizer.bos_id, model.max_length, 1)):
    want += _hf_score(tiny_llama.model, context, continuation)[0]
    windows += 1
  assert windows >= 4
  assert abs(got - want) < TOL * windows


def test_greedy_generation_equals_transformers_greedy_decoding(model, tiny_llama):
  contexts = ['def fib(n):', 'import', 'class Parser(object):\n    """']
  # Stop strings that one piece can hold ('e', ' ') end decoding at that piece; the text keeps
  # what the piece held before the string.
  for until in (['\n\n'], ['e'], [' ', 'x']):
    outputs = model.generate_until(_requests(
        *[(c, dict(until=until, max_gen_toks=10, do_sample=False)) for c in contexts]))
    _check_greedy(tiny_llama.model, model.scorer.tokenizer, contexts, outputs, until)


def _check_greedy(hf_model, tokenizer, contexts, outputs, until):
  import torch  # pylint: disable=g-import-not-at-top
  for context, output in zip(contexts, outputs):
    ids = [tokenizer.bos_id] + tokenizer.encode(context)
    with torch.no_grad():
      generated = hf_model.generate(
          torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_id,
          pad_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
    if tokenizer.eos_id in generated:
      generated = generated[:generated.index(tokenizer.eos_id)]
    want = tokenizer.decode(generated)
    for stop in until:
      want = want.split(stop)[0]
    assert output == want, (context, until)


def test_results_do_not_depend_on_the_batch_size(tiny_llama):
  """Batched equals unbatched, for every batch size, to fp32 rounding (a batch's shape changes
  how XLA blocks its matmuls, so sums differ in the last bits, never more)."""
  pairs = PAIRS * 3 + [(f'x = {i}', ' ' + 'y' * i) for i in range(1, 12)]
  results = {}
  for batch_size in (1, 3, 8, 'auto'):
    adapter = harness.LMEvalModel(checkpoint=tiny_llama.lm, dtype='float32',
                                  batch_size=batch_size)
    results[batch_size] = adapter.loglikelihood(_requests(*pairs))
  reference = np.array([lp for lp, _ in results[1]])
  for batch_size, got in results.items():
    np.testing.assert_allclose([lp for lp, _ in got], reference, rtol=1e-6)
    assert [g for _, g in got] == [g for _, g in results[1]], batch_size


def test_too_long_requests_lose_context_from_the_left_and_are_counted(tiny_llama):
  scorer = scoring.Scorer.load(tiny_llama.lm, dtype='float32', progress=False)
  context, continuation = list(range(3, 3 + 200)), [7, 8, 9]
  [(got, _)] = scorer.loglikelihood([(context, continuation)])
  kept = (context + continuation)[-(scorer.max_length + 1):]
  [(want, _)] = scorer.loglikelihood([(kept[:-3], kept[-3:])])
  assert got == pytest.approx(want, abs=1e-6)
  assert scorer.truncation.loglikelihood_requests == 1
  assert scorer.truncation.loglikelihood_tokens == 203 - scorer.max_length - 1
  texts = scorer.generate([[1] + list(range(3, 300))], max_new_tokens=8)
  assert len(texts) == 1 and scorer.truncation.generation_prompts == 1
  with pytest.raises(ValueError, match='max_new_tokens=128 must be between 1 and'):
    scorer.generate([[1, 5]], max_new_tokens=128)


def test_bad_model_arguments_name_the_problem(tiny_llama, tmp_path):
  with pytest.raises(ValueError, match="unknown --model_args for the lm model: \\['pretrained'\\]"):
    harness.LMEvalModel(checkpoint=tiny_llama.lm, pretrained='gpt2')
  with pytest.raises(ValueError, match='needs --model_args checkpoint=DIR'):
    harness.LMEvalModel()
  with pytest.raises(ValueError, match='max_length=4096 must be between 2'):
    harness.LMEvalModel(checkpoint=tiny_llama.lm, max_length=4096)
  with pytest.raises(ValueError, match='batch_size=0: expected a positive integer'):
    harness.LMEvalModel(checkpoint=tiny_llama.lm, batch_size=0)
  with pytest.raises(ValueError, match='has no chat template'):
    harness.LMEvalModel(checkpoint=tiny_llama.lm).apply_chat_template([dict(role='user',
                                                                            content='hi')])
  no_tokenizer = eval_fixtures.without_tokenizer(tiny_llama.lm, str(tmp_path / 'no_tokenizer'))
  with pytest.raises(FileNotFoundError, match='has no tokenizer'):
    harness.LMEvalModel(checkpoint=str(no_tokenizer))


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, HF_DATASETS_OFFLINE='1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'lm.eval', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_runs_the_harness_and_its_metrics_match_the_adapters_scores(tiny_llama, local_tasks,
                                                                        tmp_path):
  include, names = local_tasks
  out = tmp_path / 'results'
  result = _cli('--model_args', f'checkpoint={tiny_llama.lm},dtype=float32',
                '--tasks', ','.join(names.values()), '--include_path', include,
                '--output_path', str(out), '--log_samples')
  assert result.returncode == 0, result.stderr[-3000:]
  [path] = glob.glob(str(out / '**' / 'results_*.json'), recursive=True)
  with open(path) as f:
    results = json.load(f)['results']
  assert os.path.exists(path[:-len('.json')] + '.md')
  assert set(results) == set(names.values())
  assert {'bleu,none', 'chrf,none'} <= set(results[names['translate']])
  # acc is the harness's own: the fraction of questions whose right answer (choice 0) scores best.
  [samples] = glob.glob(str(out / '**' / f'samples_{names["mc"]}_*.jsonl'), recursive=True)
  with open(samples) as f:
    rows = [json.loads(line) for line in f]
  best = [int(np.argmax([float(r[0][0]) for r in row['resps']])) for row in rows]
  assert results[names['mc']]['acc,none'] == pytest.approx(np.mean([b == 0 for b in best]))
  model = harness.LMEvalModel(checkpoint=tiny_llama.lm, dtype='float32')
  for row in rows[:3]:
    context = row['arguments']['gen_args_0']['arg_0']
    for choice, resp in zip(row['doc']['choices'], row['resps']):
      [(logprob, _)] = model.loglikelihood(_requests((context, ' ' + choice)))
      assert logprob == pytest.approx(float(resp[0][0]), abs=1e-5)


def _main_error(monkeypatch, *args) -> str:
  """The one line `python -m lm.eval ARGS` exits with (run in this process: no start-up cost)."""
  monkeypatch.setattr(sys, 'argv', list(sys.argv))  # main() sets it for the harness's parser.
  with pytest.raises(SystemExit) as exit_info:
    harness.main(list(args))
  assert isinstance(exit_info.value.code, str) and '\n' not in exit_info.value.code
  return exit_info.value.code


def test_cli_errors_are_one_line(tiny_llama, local_tasks, tmp_path, monkeypatch):
  include, _ = local_tasks
  assert 'no_such_task' in _main_error(
      monkeypatch, '--model_args', f'checkpoint={tiny_llama.lm}', '--tasks', 'no_such_task',
      '--include_path', include)
  assert 'nowhere does not exist' in _main_error(
      monkeypatch, '--model_args', f'checkpoint={tiny_llama.lm}', '--tasks', 'local_mc',
      '--include_path', str(tmp_path / 'nowhere'))
  assert 'empty does not exist' in _main_error(
      monkeypatch, '--model_args', f'checkpoint={tmp_path / "empty"}', '--tasks', 'local_mc',
      '--include_path', include)


def test_a_lora_checkpoint_scores_as_its_unmerged_model(tiny_llama, tmp_path):
  """Adapters are merged on load; the scores equal the model computing x W + (alpha/r) x A B."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm import pytree  # pylint: disable=g-import-not-at-top
  from lm import model as model_lib  # pylint: disable=g-import-not-at-top
  from lm import sharding  # pylint: disable=g-import-not-at-top
  config = config_lib.checkpoint_config(tiny_llama.lm)
  config.lora.update(rank=2, alpha=4.0, targets='all')
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  base = checkpoint_lib.restore_params(
      tiny_llama.lm, jax.eval_shape(lambda: model_lib.init_params(
          model_lib.ModelConfig.from_config(config_lib.checkpoint_config(tiny_llama.lm),
                                            'float32'), 0)))
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                          jax.eval_shape(lambda: model_lib.init_params(cfg, 0)))
  params = pytree.union(adapters, base)  # Base weights, random A and B.
  run = tmp_path / 'lora_run'
  os.makedirs(run)
  checkpoint_lib.save_params(str(run), params)
  (run / 'config.json').write_text(config.to_json_best_effort())
  merged = scoring.Scorer.load(str(run), dtype='float32', progress=False)
  assert merged.cfg.lora_rank == 0
  mesh = jax.make_mesh((1,) * len(sharding.MESH_AXES), sharding.MESH_AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))
  unmerged = scoring.Scorer(model_lib.graphdef(cfg), params, merged.tokenizer, mesh=mesh,
                            rules=sharding.RULES, progress=False)
  requests = [([1, 5, 6, 7], [8, 9]), ([1] + list(range(10, 60)), [3, 4, 5])]
  np.testing.assert_allclose([lp for lp, _ in merged.loglikelihood(requests)],
                             [lp for lp, _ in unmerged.loglikelihood(requests)], rtol=1e-5)
  plain = scoring.Scorer.load(tiny_llama.lm, dtype='float32', progress=False)
  assert abs(plain.loglikelihood(requests)[0][0] - merged.loglikelihood(requests)[0][0]) > 0.1
