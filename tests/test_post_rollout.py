"""lm.post.rollout: prompts, the completion rows' layout, scoring, reproducibility, bad input."""

import json
import sys
import types

import numpy as np
import pytest

import post_fixtures
from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import model as model_lib
from lm import sources
from lm import train as train_lib
from lm.post import data as post_data
from lm.post import reward as reward_lib
from lm.post import rollout


@pytest.fixture(scope='module')
def grpo_run(tiny_llama):
  """A GRPO run's setup and data (its Rollouts), nothing trained."""
  config = post_fixtures.rl_config(tiny_llama.lm, 'grpo')
  run = train_lib.setup(config)
  return run, train_lib.make_data(run, '/unused')


def test_completion_rows_train_on_the_completion_only():
  rows, scored = rollout.completion_rows([[1, 7, 8], [1, 9]], [[4, 5, 2], [6]], seq_len=6,
                                         pad_id=3)
  np.testing.assert_array_equal(rows['inputs'][0], [1, 7, 8, 4, 5, 3])
  np.testing.assert_array_equal(rows['targets'][0], [7, 8, 4, 5, 2, 3])
  np.testing.assert_array_equal(rows['loss_mask'][0], [0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(rows['segment_ids'][1], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows['loss_mask'][1], [0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(scored[0], [1, 7, 8, 4, 5, 2, 3])  # The EOS is an input here.
  with pytest.raises(ValueError, match='exceed data.seq_len'):
    rollout.completion_rows([[1, 2, 3, 4]], [[5, 6, 7, 2]], seq_len=6, pad_id=3)


def test_prompts_are_cut_from_the_left_and_deduplicated(tiny_llama, tmp_path):
  from lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.Tokenizer(tiny_llama.tokenizer)
  path = tmp_path / 'prompts.jsonl'
  long = 'def f(x): return x + 1 ' * 20
  path.write_text(''.join(json.dumps(r) + '\n' for r in [
      {'prompt': long, 'answer': '1'}, {'prompt': 'short'}, {'prompt': 'short'}]))
  post = config_lib.base_config().post
  post.data = f'jsonl:{path}'
  prompts, counts = rollout.read_prompts(post, tokenizer, max_tokens=12)
  assert len(prompts) == 2 and counts.duplicates == 1 and counts.truncated_prompts == 1
  assert len(prompts[0].tokens) == 12 and prompts[0].tokens[0] == tokenizer.bos_id
  assert prompts[0].tokens[1:] == ([tokenizer.bos_id] + tokenizer.encode(long))[-11:]
  assert prompts[0].fields == {'answer': '1'}
  path.write_text(json.dumps({'question': 'x'}) + '\n')
  with pytest.raises(sources.DataError, match=r"prompts.jsonl:1: no string field "
                     r"config.post.prompt_field='prompt'"):
    rollout.read_prompts(post, tokenizer, max_tokens=12)
  path.write_text('')
  with pytest.raises(sources.DataError, match='holds no records'):
    rollout.read_prompts(post, tokenizer, max_tokens=12)


def test_rollouts_are_reproducible_and_scored(grpo_run):
  run, data = grpo_run
  params = post_fixtures.init_params(run)
  state = types.SimpleNamespace(step=np.int32(3), params=params)
  batch = {'index': np.arange(run.config.train.batch_size // 8, dtype=np.int32)}
  rows, metrics = data.rollout(state, batch)
  again, metrics_again = data.rollout(state, batch)
  for name in rows:
    np.testing.assert_array_equal(rows[name], again[name], err_msg=name)
  assert metrics['reward'] == metrics_again['reward']
  other, _ = data.rollout(types.SimpleNamespace(step=np.int32(4), params=params), batch)
  assert not np.array_equal(other['targets'], rows['targets'])  # Another step, other samples.
  # The policy is the reference: every log-ratio is 0, and so is the KL.
  np.testing.assert_allclose(rows['old_logp'], rows['ref_logp'], atol=1e-5)
  assert abs(metrics['kl']) < 1e-4
  assert rows['old_logp'].shape == (16, 40) and (rows['old_logp'] <= 0).all()
  np.testing.assert_array_equal(rows['old_logp'] != 0, rows['loss_mask'] > 0)
  # The group advantages sum to 0 per prompt (8 completions each).
  per_completion = rows['advantages'].sum(-1) / rows['loss_mask'].sum(-1)
  np.testing.assert_allclose(per_completion.reshape(-1, 8).sum(-1), 0, atol=1e-4)
  assert {'time_rollout', 'time_scoring', 'completion_tokens', 'stopped', 'kl_coef'} <= set(metrics)


def test_a_reward_model_scores_completions_at_their_last_token(grpo_run, tiny_llama, tmp_path):
  run, data = grpo_run
  config = config_lib.config_from_checkpoint(tiny_llama.lm)
  config.model.reward_head = True
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  params = model_lib.init_params(cfg, 5)
  checkpoint_lib.save_params(str(tmp_path / 'rm'), params)
  (tmp_path / 'rm' / 'config.json').write_text(config.to_json_best_effort())
  model = rollout.RewardModel(run, str(tmp_path / 'rm'), data.tokenizer)
  prompts, completions = [[1, 40, 41], [1, 50]], [[60, 61, 2], [70]]
  rows, scored = rollout.completion_rows(prompts, completions, 40, data.tokenizer.pad_id)
  data.train_iter.reward_model = model
  try:
    scores = data.train_iter._scores(None, completions, rows, scored)  # pylint: disable=protected-access
  finally:
    data.train_iter.reward_model = None
  # As the reward model was trained: [BOS] + prompt + completion (+ EOS), read at the last.
  for r, (p, c) in enumerate(zip(prompts, completions)):
    tokens = np.asarray([p + c], np.int32)
    expected = reward_lib.rewards(params, {
        'inputs': tokens, 'segment_ids': np.ones_like(tokens),
        'positions': np.arange(tokens.shape[1])[None]}, graphdef=model_lib.graphdef(cfg))
    np.testing.assert_allclose(scores[r], expected[0], rtol=1e-5, atol=1e-5)

  config.model.vocab_size += 8
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  checkpoint_lib.save_params(str(tmp_path / 'wide'), model_lib.init_params(cfg, 5))
  (tmp_path / 'wide' / 'config.json').write_text(config.to_json_best_effort())
  with pytest.raises(config_lib.ConfigError, match='must read the policy'):
    rollout.RewardModel(run, str(tmp_path / 'wide'), data.tokenizer)
  config.model.vocab_size -= 8
  config.model.reward_head = False
  (tmp_path / 'rm' / 'config.json').write_text(config.to_json_best_effort())
  with pytest.raises(config_lib.ConfigError, match='no reward head'):
    rollout.RewardModel(run, str(tmp_path / 'rm'), data.tokenizer)


def test_reward_functions_are_checked(grpo_run):
  with pytest.raises(config_lib.ConfigError, match="cannot import 'no_such_module'"):
    rollout.reward_function('no_such_module:f')
  with pytest.raises(config_lib.ConfigError, match='has no function'):
    rollout.reward_function('lm.post.rewards:nothing')
  _, data = grpo_run
  module = types.ModuleType('bad_rewards')
  module.short = lambda prompts, completions, **_: [0.0]
  sys.modules['bad_rewards'] = module
  rollouts = data.train_iter
  previous = rollouts.reward_fn
  rollouts.reward_fn = rollout.reward_function('bad_rewards:short')
  try:
    with pytest.raises(sources.DataError, match='one finite float per completion'):
      rollouts._scores([rollouts.prompts[0]] * 2, [[5], [6]], None, None)  # pylint: disable=protected-access
  finally:
    rollouts.reward_fn = previous


def test_the_kl_controller_moves_at_most_20_percent_towards_its_target():
  post = config_lib.base_config().post
  post.update(kl_coef=0.1, kl_target=2.0, kl_horizon=16)
  controller = rollout.KLController(post, batch_size=16)
  controller.update(10.0)  # Far above: +20%.
  assert controller.value == pytest.approx(0.12)
  controller.update(1.5)  # 25% below: -20% (the cap).
  assert controller.value == pytest.approx(0.12 * 0.8)
  controller.update(2.0)
  assert controller.value == pytest.approx(0.12 * 0.8)
  post.kl_target = 0.0
  fixed = rollout.KLController(post, batch_size=16)
  fixed.update(100.0)
  assert fixed.value == 0.1


@pytest.mark.parametrize('override, message', [
    (dict(reward_function=''), 'exactly one of config.post.reward_model'),
    (dict(group_size=1), 'at least 2'),
    (dict(group_size=3), 'not divisible by config.post.group_size'),
    (dict(max_new_tokens=40), 'leaves no room for a prompt'),
    (dict(minibatches=3), 'config.post.minibatches'),
    (dict(kl_coef=0.0, kl_target=1.0), 'would stay 0'),
    (dict(reward_function='no_colon'), 'expected MODULE:NAME'),
])
def test_bad_rl_configs_are_named(tiny_llama, override, message):
  config = post_fixtures.rl_config(tiny_llama.lm, 'grpo', **override)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_ppo_needs_a_value_head(tiny_llama):
  config = post_fixtures.rl_config(tiny_llama.lm, 'ppo')
  config.model.value_head = False
  with pytest.raises(config_lib.ConfigError, match='value_head=True'):
    config_lib.validate(config)


def test_post_data_rows_and_rollout_rows_agree(tiny_llama):
  """A completion row is laid out like an SFT example of the same prompt and response."""
  from lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.Tokenizer(tiny_llama.tokenizer)
  prompt, response = 'def add(a, b):', ' return a + b'
  example = post_data.encode_example([(prompt, False), (response, True)], tokenizer, 41,
                                     post_data.Counts())
  sft = post_data.PackedRows([example], 40, pack=False, pad_id=tokenizer.pad_id).arrays
  rows, _ = rollout.completion_rows(
      [[tokenizer.bos_id] + tokenizer.encode(prompt)],
      [tokenizer.encode(response) + [tokenizer.eos_id]], 40, tokenizer.pad_id)
  for name in post_data.ROW_FIELDS:
    np.testing.assert_array_equal(rows[name], sft[name], err_msg=name)
