"""mode='dpo': the loss against TRL's, its invariants, and a run that learns a preference."""

import functools
import gc
import json
import math
import os
import random

from flax import traverse_util
import jax
import numpy as np
import pytest

import eval_fixtures
import requirements
from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import generate
from lm import model as model_lib
from lm import pytree
from lm import sources
from lm import train as train_lib
from lm.post import dpo
from lm.post import data as post_data

_LINES = [line.strip() for module in (os, json, random, functools)
          for line in open(module.__file__, encoding='utf-8').read().splitlines()
          if 4 <= len(line.split()) and len(line) < 70]


def _corrupt(text: str) -> str:
  """The same characters, each word spelled backwards."""
  return ' '.join(word[::-1] for word in text.split())


# Real text is preferred to a corrupted copy of it.
RECORDS = [{'prompt': a, 'chosen': ' ' + b, 'rejected': ' ' + _corrupt(b)}
           for a, b in zip(_LINES[::2], _LINES[1::2])][:600]


@pytest.fixture(scope='module')
def policy_llama(tmp_path_factory):
  """A second random tiny Llama (another seed) with the same tokenizer as tiny_llama's."""
  requirements.require('torch')
  return eval_fixtures.build_tiny_llama(str(tmp_path_factory.mktemp('policy')), seed=1)


@pytest.fixture(scope='module')
def pairs_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('dpo') / 'pairs.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in RECORDS))
  return f'jsonl:{path}'


def _pair_rows(tokenizer, records, seq_len=64):
  post = config_lib.base_config().post
  pairs = [tuple(post_data.encode_example([(r['prompt'], False), (r[side], True)], tokenizer,
                                          seq_len + 1, post_data.Counts()) for side in dpo.SIDES)
           for r in records]
  return dpo.PairRows(pairs, seq_len, tokenizer.pad_id), post


def _fill(rows, graphdef, params):
  for side in dpo.SIDES:
    block = {k: rows.arrays[f'{side}_{k}'] for k in post_data.ROW_FIELDS}
    rows.arrays[f'{side}_ref_logp'] = np.asarray(dpo.token_logps(params, block, graphdef=graphdef))


def _sums(graphdef, params, rows, beta=0.1, loss_type='sigmoid'):
  batch = {k: np.asarray(v) for k, v in rows.arrays.items()}
  _, sums = dpo.loss_sums(params, batch, graphdef=graphdef, beta=beta, loss_type=loss_type)
  return {k: float(v) for k, v in sums.items()}


@pytest.mark.parametrize('loss_type', ['sigmoid', 'ipo'])
def test_the_loss_equals_trls(tiny_llama, policy_llama, loss_type):
  torch, datasets, trl = (requirements.require(n) for n in ('torch', 'datasets', 'trl'))
  transformers = requirements.require('transformers')
  graphdef, reference, tokenizer, _ = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  _, policy, _, _ = generate.load_checkpoint(policy_llama.lm, dtype='float32')
  records = RECORDS[:6]
  rows, _ = _pair_rows(tokenizer, records, seq_len=128)
  _fill(rows, graphdef, reference)
  sums = _sums(graphdef, policy, rows, loss_type=loss_type)
  ours = sums['loss'] / sums['pairs']

  bos, eos = [tokenizer.bos_id], [tokenizer.eos_id]
  examples = [{'prompt_ids': bos + tokenizer.encode(r['prompt']),
               'chosen_ids': tokenizer.encode(r['chosen']) + eos,
               'rejected_ids': tokenizer.encode(r['rejected']) + eos} for r in records]
  trainer = trl.DPOTrainer(
      model=policy_llama.model, ref_model=tiny_llama.model,
      processing_class=transformers.AutoTokenizer.from_pretrained(tiny_llama.hf),
      args=trl.DPOConfig(output_dir=os.path.join(os.path.dirname(policy_llama.hf), 'trl'),
                         beta=0.1, loss_type=[loss_type], report_to=[], use_cpu=True, bf16=False,
                         max_length=None, per_device_train_batch_size=len(examples)),
      train_dataset=datasets.Dataset.from_list(records))
  batch = trainer.data_collator(examples)  # lm's token layout, in TRL's collator.
  with torch.no_grad():
    theirs = trainer.compute_loss(trainer.model, batch).item()
  assert ours == pytest.approx(theirs, abs=1e-5)
  assert sums['loss'] / sums['pairs'] != pytest.approx(math.log(2), abs=1e-3)  # A real test.


def test_at_the_reference_the_loss_is_log_2_with_or_without_lora(tiny_llama):
  graphdef, params, tokenizer, config = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  rows, _ = _pair_rows(tokenizer, RECORDS[:4])
  _fill(rows, graphdef, params)
  sums = _sums(graphdef, params, rows)
  # 1e-5: the reference's pass runs each side alone, the loss's both together (other matmul
  # blocking, differences of ~1e-6 on this CPU).
  assert sums['loss'] / sums['pairs'] == pytest.approx(math.log(2), abs=1e-5)
  for name in ('margin', 'chosen_reward', 'rejected_reward'):
    assert sums[name] == pytest.approx(0.0, abs=1e-4)
  config.lora.update(rank=4, alpha=8.0, targets='all')
  lora_cfg = model_lib.ModelConfig.from_config(config, 'float32')
  fresh = model_lib.init_params(lora_cfg, 0)  # Adapters with B = 0: the base's outputs.
  lora_params = pytree.union(pytree.subtree(fresh, [
      p for p in pytree.leaf_paths(fresh) if 'lora' in p[-1]]), params)
  sums = _sums(model_lib.graphdef(lora_cfg), lora_params, rows)
  assert sums['loss'] / sums['pairs'] == pytest.approx(math.log(2), abs=1e-5)


def test_gradient_accumulation_changes_nothing(tiny_llama):
  """Pairs of very different lengths in different micro-batches: the loss is a mean over the
  global batch's pairs, never a mean of micro-batch means."""
  graphdef, params, tokenizer, config = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  records = [dict(r, chosen=r['chosen'] * (1 + 3 * (i % 2))) for i, r in enumerate(RECORDS[:8])]
  rows, _ = _pair_rows(tokenizer, records)
  _fill(rows, graphdef, jax.tree.map(lambda x: x * 0.9, params))
  batch = {k: np.asarray(v) for k, v in rows.arrays.items()}
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  results = []
  for accum in (1, 2, 4):
    t = config_lib.base_config().train
    t.update(grad_accum_steps=accum, batch_size=8, steps=10, warmup_steps=1, learning_rate=1e-2)
    optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(cfg))
    state = train_lib.init_state(cfg, optimizer, 0, params)
    step = jax.jit(functools.partial(train_lib.train_step, objective=dpo.objective(
        graphdef, config_lib.base_config().post), optimizer=optimizer, t=t))
    state, metrics = step(state, batch)
    results.append((jax.device_get(metrics), jax.device_get(state.params)))
  for metrics, params_after in results[1:]:
    for name in ('loss', 'accuracy', 'margin', 'grad_norm'):
      assert metrics[name] == pytest.approx(results[0][0][name], rel=1e-5, abs=1e-6), name
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                 params_after, results[0][1])


def _config(checkpoint, data, **train):
  config = config_lib.config_from_checkpoint(checkpoint)
  config.mode = 'dpo'
  config.post.update(data=data, eval_fraction=0.15, beta=0.1)
  config.data.seq_len = 64
  config.model.dtype = 'float32'
  config.train.update(dict(steps=80, batch_size=8, warmup_steps=2, learning_rate=3e-3,
                           weight_decay=0.0, log_every=10, eval_every=80, eval_batches=4,
                           checkpoint_every=80), **train)
  return config


def _spy_on_jitted_calls(monkeypatch) -> list[int]:
  """Patches jax.jit so that every jitted call records the device bytes at its peak: the arrays
  live when it starts, plus what XLA's memory_analysis says it adds (outputs not donated into
  its arguments, temporaries). CPU has no allocator statistics of its own."""
  peaks, jit = [], jax.jit

  def spying_jit(*args, **kwargs):
    jitted = jit(*args, **kwargs)

    def call(*call_args):
      stats = jitted.lower(*call_args).compile().memory_analysis()
      peaks.append(sum(x.nbytes for x in jax.live_arrays()) + stats.output_size_in_bytes
                   - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
      return jitted(*call_args)
    return call

  monkeypatch.setattr(jax, 'jit', spying_jit)
  return peaks


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_the_reference_initialises_only_the_leaves_its_checkpoint_lacks(tiny_llama, pairs_file,
                                                                        monkeypatch):
  """A LoRA policy's reference is the base checkpoint with fresh adapters (B = 0), the ones the
  policy starts with; building it holds the restored params and the adapters' init, never a
  second whole model."""
  config = _config(tiny_llama.lm, pairs_file)
  config.lora.update(rank=4, targets='all')
  config.train.trainable = 'lora'
  run = train_lib.setup(config)
  abstract = run.abstract_state().params
  adapters = [p for p in pytree.leaf_paths(abstract) if 'lora' in p[-1]]
  gc.collect()
  live = sum(x.nbytes for x in jax.live_arrays())
  peaks = _spy_on_jitted_calls(monkeypatch)
  reference = dpo.reference_params(run)
  monkeypatch.undo()
  # The reference's own bytes, and the adapters' twice (themselves and their init's random
  # bits). A whole fresh model beside the restored one, as before, was 2.8x the reference's.
  assert max(peaks) - live <= _nbytes(abstract) + 2 * _nbytes(pytree.subtree(abstract, adapters))
  restore = lambda: checkpoint_lib.restore_params(
      tiny_llama.lm, train_lib.init_from_target(tiny_llama.lm, abstract))
  flat = lambda tree: traverse_util.flatten_dict(jax.device_get(tree))
  reference, restored = flat(reference), flat(restore())
  policy = flat(run.init_state(restore()).params)  # What training starts from.
  assert set(reference) == set(restored) | set(adapters) == set(pytree.leaf_paths(abstract))
  for path, leaf in reference.items():
    if path in adapters:  # Fresh, the policy's own: B = 0, A drawn from the run's seed.
      np.testing.assert_array_equal(leaf, policy[path])
      assert np.any(leaf) == path[-1].endswith('_lora_a'), path
    else:
      np.testing.assert_array_equal(leaf, restored[path])


def test_the_reference_pass_runs_in_the_train_steps_micro_batches(tiny_llama, pairs_file,
                                                                  monkeypatch):
  """8 pairs a step in 4 micro-batches: the reference pass holds one side of 2 pairs at a time
  (the last batch padded), and gives what one pass over every pair gives."""
  config = _config(tiny_llama.lm, pairs_file, batch_size=8, grad_accum_steps=4)
  config.post.max_examples = 23
  run = train_lib.setup(config)
  tokenizer = post_data.load_tokenizer(config, run.cfg.vocab_size)
  traced, token_logps = [], dpo.token_logps
  monkeypatch.setattr(dpo, 'token_logps', lambda params, rows, **kwargs: (
      traced.append(rows['inputs'].shape), token_logps(params, rows, **kwargs))[1])
  data = dpo.make_data(run, tokenizer)
  assert traced == [(2, 64)]  # One compilation, at the micro-batch's rows of one side.
  assert data.stats['eval_pairs'] % 2 == 1  # So its last batch is padded.
  monkeypatch.undo()
  pairs, _ = dpo.read_pairs(config.post, tokenizer, config.data.seq_len + 1)
  assert len(pairs) % 2 == 1
  micro, whole = (dpo.PairRows(pairs, config.data.seq_len, tokenizer.pad_id) for _ in range(2))
  reference = dpo.reference_params(run)
  dpo.fill_reference_logps(run, reference, micro)
  dpo.fill_reference_logps(run, reference, whole, batch_size=len(pairs))
  for side in dpo.SIDES:
    logps = micro.arrays[f'{side}_ref_logp']
    assert (logps < 0).sum() == micro.arrays[f'{side}_loss_mask'].sum()
    np.testing.assert_allclose(logps, whole.arrays[f'{side}_ref_logp'], rtol=0, atol=1e-6)


def test_dpo_learns_to_prefer_real_text(tiny_llama, pairs_file, tmp_path):
  state, metrics = train_lib.train(_config(tiny_llama.lm, pairs_file), str(tmp_path))
  assert int(state.step) == 80
  assert metrics['eval_accuracy'] > 0.9 and metrics['eval_margin'] > 0.5, metrics
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_rows = [r for r in rows if 'loss' in r and 'margin' in r]
  assert train_rows[-1]['margin'] > train_rows[0]['margin']
  assert {'accuracy', 'chosen_reward', 'rejected_reward', 'tokens_per_sec'} <= set(train_rows[1])


def test_bad_preference_data_is_named(tiny_llama, tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text(json.dumps({'prompt': 'a', 'chosen': 'b'}) + '\n')
  config = _config(tiny_llama.lm, f'jsonl:{path}')
  with pytest.raises(sources.DataError, match=r"bad.jsonl:1: no string field "
                     r"config.post.rejected_field='rejected'"):
    train_lib.train(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints' / '1')


def test_a_reference_of_another_shape_is_refused(tiny_llama, pairs_file, tmp_path):
  other = tmp_path / 'other'
  config = config_lib.config_from_checkpoint(tiny_llama.lm)
  config.model.d_model = 32
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  checkpoint_lib.save_params(str(other), model_lib.init_params(cfg, 0))
  (other / 'config.json').write_text(config.to_json_best_effort())
  config = _config(tiny_llama.lm, pairs_file)
  config.post.reference = str(other)
  with pytest.raises(checkpoint_lib.CheckpointError, match='do not fit the model'):
    train_lib.train(config, str(tmp_path / 'run'))


def test_the_dpo_config_runs_from_the_command_line(tiny_llama, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', os.path.join(root, 'configs', 'post', 'dpo.py'),
       '--workdir', str(tmp_path / 'dpo'), f'--config.init_from={tiny_llama.lm}',
       '--config.post.max_examples=60', '--config.data.seq_len=64', '--config.train.steps=4',
       '--config.train.batch_size=4', '--config.train.warmup_steps=1',
       '--config.train.log_every=2', '--config.train.eval_every=4', '--config.model.dtype=float32'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Preference data:' in result.stderr and 'step 4/4: loss' in result.stderr
  assert '"eval_accuracy"' in result.stderr


def test_an_moe_policy_adds_its_router_losses(tiny_llama):
  _, _, tokenizer, config = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  config.model.moe.update(num_experts=4, top_k=2, capacity_factor=2.0)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  graphdef, params = model_lib.graphdef(cfg), model_lib.init_params(cfg, 0)
  rows, _ = _pair_rows(tokenizer, RECORDS[:4])
  _fill(rows, graphdef, params)
  batch = {k: np.asarray(v) for k, v in rows.arrays.items()}
  objective, sums = dpo.loss_sums(params, batch, graphdef=graphdef, beta=0.1,
                                  loss_type='sigmoid')
  assert float(sums['moe_loss']) > 0 and 'moe_max_load_0' in sums
  np.testing.assert_allclose(float(objective), float(sums['loss'] + sums['moe_loss']), rtol=1e-6)
  # At the reference the preference loss is still log 2 a pair: the router terms sit beside it.
  assert float(sums['loss'] / sums['pairs']) == pytest.approx(math.log(2), abs=1e-5)
