"""Distillation (lm/distill.py): the KD loss against a direct KL, zero KD gradient from an equal
teacher, a student that learns a trained teacher's distribution on real text, exact resume, the
teacher checks, and sequence-level distillation through sample outputs and SFT."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import data as data_lib
from lm import distill
from lm import model as model_lib
from lm import tokenizer as tokenizer_lib
from lm import train as train_lib

import loop_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = model_lib.ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            d_ff=48, max_seq_len=16)


def _batch(B=2, T=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  loss_mask = np.ones((B, T), np.float32)
  loss_mask[0, :5] = 0
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'segment_ids': np.ones((B, T), np.int32),
          'positions': np.arange(T, dtype=np.int32)[None].repeat(B, 0), 'loss_mask': loss_mask}


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kd_terms_equal_a_direct_kl_and_top_k_its_documented_form():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 3, 11)) * 3, rng.normal(size=(2, 3, 11)) * 3
  tau = 2.5
  p, log_q = np.exp(_log_softmax(teacher / tau)), _log_softmax(student / tau)
  direct = (p * (np.log(p) - log_q)).sum(-1)
  full = distill.kd_terms(jnp.asarray(student), jnp.asarray(_log_softmax(teacher / tau)),
                          temperature=tau)
  np.testing.assert_allclose(full, direct, rtol=1e-5, atol=1e-6)
  # Top k: the teacher renormalised over its k best, against the student's log-probabilities.
  k = 4
  ids = np.argsort(-teacher, -1)[..., :k]
  top_logp = _log_softmax(np.take_along_axis(teacher / tau, ids, -1))
  expected = (np.exp(top_logp) * (top_logp - np.take_along_axis(log_q, ids, -1))).sum(-1)
  top = distill.kd_terms(jnp.asarray(student), jnp.asarray(top_logp), jnp.asarray(ids),
                         temperature=tau)
  np.testing.assert_allclose(top, expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(top) >= -1e-6)  # KL(p~ || q on the k) - log q(k) >= 0.


@pytest.mark.parametrize('top_k', [0, 8])
def test_an_equal_teacher_gives_zero_kd_and_zero_gradient_at_alpha_1(top_k):
  graphdef, params = model_lib.init(CFG, 0)
  batch = distill.teacher_targets(graphdef, params, _batch(), temperature=2.0, top_k=top_k)
  assert batch[distill.TEACHER_LOGP].shape == (2, 16, top_k or CFG.vocab_size)
  sums = functools.partial(distill.loss_sums, graphdef=graphdef, temperature=2.0)
  grads, parts = jax.grad(lambda p: sums(p, batch, alpha=1.0), has_aux=True)(params)
  if top_k == 0:  # The exact KL of a distribution with itself: zero, and so is its gradient.
    assert abs(float(parts['kd'])) < 1e-4
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-5
  else:  # Over the top k the student still gains by moving mass from the other tokens.
    assert float(parts['kd']) > 0
  # alpha = 0 is plain training: the language model's loss and gradient exactly.
  objective, parts = sums(params, batch, alpha=0.0)
  lm_objective, lm_parts = train_lib.loss_sums(params, batch, graphdef=graphdef)
  np.testing.assert_allclose(objective, lm_objective, rtol=1e-6)
  np.testing.assert_allclose(parts['nll'], lm_parts['nll'], rtol=1e-6)
  assert parts['tokens'] == lm_parts['tokens'] == 27


# ---------------------------------------------------------------------------------------------
# Training on real text.


_config = loop_config.small_run


@pytest.fixture(scope='module')
def teacher(tmp_path_factory, stdlib_tokenizer):
  """A model trained 200 steps on the standard library's source."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train_lib.train(_config(stdlib_tokenizer, steps=200, eval_every=200, checkpoint_every=200,
                          learning_rate=1e-2, warmup_steps=20), workdir)
  return workdir


def _student(teacher_dir, **fields):
  config = _config('')  # data.tokenizer: the teacher's.
  config.model.update(d_model=32, d_ff=64)
  config.mode = 'distill'
  config.distill.update({'teacher': teacher_dir, **fields})
  return config


def test_a_student_learns_the_teachers_distribution(tmp_path, teacher):
  config = _student(teacher, alpha=1.0, temperature=1.0)
  config.train.update(steps=150, eval_every=150, checkpoint_every=150, log_every=10,
                      learning_rate=1e-2, warmup_steps=10)
  _, metrics = train_lib.train(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  kd = [r['kd'] for r in rows if 'kd' in r]
  assert kd[-1] < 0.5 * kd[0], kd  # The student moves toward the teacher's distribution...
  # ...and so learns the text from the teacher alone (alpha=1: no hard labels).
  assert metrics['eval_loss'] < 0.75 * np.log(512), metrics
  saved = json.load(open(tmp_path / 'config.json'))
  # The teacher's tokenizer is the run's, recorded so that the student loads on its own.
  assert saved['data']['tokenizer'] == json.load(open(os.path.join(teacher, 'config.json')))[
      'data']['tokenizer'] and saved['distill']['teacher'] == teacher
  from lm import generate  # pylint: disable=g-import-not-at-top
  generate.load_checkpoint(str(tmp_path))


def _top_k_student(teacher_dir):
  config = _student(teacher_dir, top_k=8)
  config.train.update(steps=6, eval_every=6, checkpoint_every=3)
  return config


@pytest.fixture(scope='module')
def top_k_run(tmp_path_factory, teacher):
  """The parameters after 6 steps of distillation from the teacher's top 8, on the fly."""
  state, _ = train_lib.train(_top_k_student(teacher), str(tmp_path_factory.mktemp('straight')))
  return state.params


def test_distillation_from_the_top_k_resumes_exactly(tmp_path, teacher, top_k_run):
  config = _top_k_student(teacher)
  config.train.steps_per_run = 3
  train_lib.train(config, str(tmp_path / 'resumed'))
  config.train.steps_per_run = 0
  resumed, _ = train_lib.train(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(top_k_run), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)


def _cache_arrays(directory):
  """The cache's keys, ids and log-probabilities, its chunks concatenated in order."""
  chunks = sorted(n for n in os.listdir(directory) if n.startswith('chunk-'))
  return [np.concatenate([np.load(os.path.join(directory, c, name)) for c in chunks])
          for name in ('keys.npy', 'ids.npy', 'logp.npy')]


def test_precomputed_targets_train_the_student_as_the_teacher_running_does(tmp_path, teacher,
                                                                          top_k_run):
  config = _top_k_student(teacher)
  config.distill.teacher_cache = str(tmp_path / 'cache')
  workdir = str(tmp_path / 'student')
  with pytest.raises(config_lib.ConfigError, match='has no manifest.json: its targets were never '
                     'precomputed'):
    train_lib.train(config, workdir)
  # The command writes them (one chunk); a precompute in chunks of 2 steps, killed after its
  # second chunk and rerun, writes the same rows.
  config_file = tmp_path / 'config.json'
  config_file.write_text(config.to_json())
  result = subprocess.run(
      [sys.executable, '-m', 'lm.distill', '--config', str(config_file), '--workdir', workdir],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'teacher targets of 48 rows (6 steps)' in result.stdout
  chunked = config.copy_and_resolve_references()
  chunked.distill.teacher_cache = str(tmp_path / 'chunked')
  distill.precompute_teacher_targets(chunked, workdir, chunk_steps=2)
  os.remove(tmp_path / 'chunked' / distill.CACHE_MANIFEST)
  shutil.rmtree(tmp_path / 'chunked' / 'chunk-00000004')
  manifest = distill.precompute_teacher_targets(chunked, workdir, chunk_steps=2)
  assert manifest['rows'] == 48 and manifest['steps'] == 6
  keys, ids, logp = _cache_arrays(tmp_path / 'chunked')
  for a, b in zip(_cache_arrays(tmp_path / 'cache'), (keys, ids, logp)):
    np.testing.assert_array_equal(a, b)
  assert ids.dtype == np.uint16 and ids.shape == (48, 64, 8) and len(set(keys.tolist())) == 48

  # Read back, they train the student exactly as the teacher computing them each step did.
  state, metrics = train_lib.train(chunked, workdir)
  for a, b in zip(jax.tree.leaves(top_k_run), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert np.isfinite(metrics['kd'])

  # A run that reads rows the precompute did not, or targets made otherwise: refused.
  longer = chunked.copy_and_resolve_references()
  longer.train.update(steps=8, eval_every=8)
  with pytest.raises(data_lib.DataError, match='rows of this batch have no targets in '
                     r'config.distill.teacher_cache=.* \(precomputed for 6 steps of batch 8\)'):
    train_lib.train(longer, str(tmp_path / 'longer'))
  hotter = chunked.copy_and_resolve_references()
  hotter.distill.temperature = 4.0
  with pytest.raises(config_lib.ConfigError, match=r'holds targets made otherwise \(temperature: '
                     r'cache 2.0, config 4.0\)'):
    train_lib.train(hotter, str(tmp_path / 'hotter'))


def test_a_teacher_that_cannot_teach_is_refused(tmp_path, teacher, stdlib_tokenizer):
  config_lib.validate(_student(teacher))
  for fields, message in [
      ({'teacher': ''}, 'needs config.distill.teacher'),
      ({'teacher': str(tmp_path / 'nowhere')}, 'no such directory'),
      ({'alpha': 1.5}, r'config.distill.alpha=1.5: must be in \[0, 1\]'),
      ({'temperature': 0.0}, 'config.distill.temperature=0.0: must be positive'),
      ({'top_k': 512}, 'config.distill.top_k=512')]:
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(_student(teacher, **fields))
  other = _student(teacher)
  other.model.vocab_size = 600
  with pytest.raises(config_lib.ConfigError, match='has model.vocab_size=512, the student '
                     'config.model.vocab_size=600'):
    train_lib.train(other, str(tmp_path / 'vocab'))
  texts = [open(os.path.join(ROOT, 'lm', name)).read() for name in ('train.py', 'model.py')]
  foreign = tokenizer_lib.train_tokenizer(texts, 512, str(tmp_path / 'other.model'),
                                          max_chars=0, seed=0)
  different = _student(teacher)
  different.data.tokenizer = foreign.path
  with pytest.raises(config_lib.ConfigError, match='is not the tokenizer of '
                     'config.distill.teacher'):
    train_lib.train(different, str(tmp_path / 'tokenizer'))
  assert not os.path.exists(tmp_path / 'tokenizer' / 'checkpoints' / '0')
  same = _student(teacher)
  same.data.tokenizer = stdlib_tokenizer  # The teacher's own file: accepted.
  same.train.update(steps=3, warmup_steps=1, eval_every=3, checkpoint_every=3)
  train_lib.train(same, str(tmp_path / 'same'))


def test_sequence_level_distillation_is_sample_then_sft(tmp_path, teacher):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('def main(\nimport os\nclass Parser(\n')
  output = tmp_path / 'teacher.jsonl'
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', os.path.join(teacher, 'config.json'),
       '--workdir', teacher, '--config.mode=sample', f'--config.sample.prompts_file={prompts}',
       '--config.sample.max_new_tokens=12', '--config.sample.temperature=0',
       f'--config.sample.output={output}'], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(output)]
  assert [r['prompt'] for r in records] == ['def main(', 'import os', 'class Parser(']
  assert all(r['response'] for r in records)
  config = _config(json.load(open(os.path.join(teacher, 'config.json')))['data']['tokenizer'],
                   steps=4, warmup_steps=1, eval_every=4, checkpoint_every=4, batch_size=2)
  config.model.update(d_model=32, d_ff=64)
  config.mode = 'sft'
  config.post.data = f'jsonl:{output}'
  _, metrics = train_lib.train(config, str(tmp_path / 'student'))
  assert np.isfinite(metrics['loss'])


@pytest.mark.parametrize('top_k', [0, 8])
def test_the_memory_plan_holds_the_teacher_and_matches_xla(teacher, top_k):
  from lm import memory  # pylint: disable=g-import-not-at-top
  config = _student(teacher, top_k=top_k)
  plan = memory.estimate(config)
  teacher_params = model_lib.count_params(
      model_lib.init_params(model_lib.ModelConfig.from_config(_config('')), 0))
  assert plan.teacher == 4 * teacher_params  # fp32, one device.
  assert plan.teacher_targets == 8 * 64 * (8 * 8 if top_k else 512 * 4)
  assert plan.total == max(plan.train_step, plan.teacher_pass) > plan.teacher
  # The step itself (the teacher is not one of its buffers) against XLA's count.
  compiled = memory.xla_bytes(config)['total']
  assert 0.9 < (plan.train_step - plan.teacher) / compiled < 1.1
