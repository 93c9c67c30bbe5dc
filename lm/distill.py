"""Knowledge distillation (Hinton et al., 2015): a student learns from a teacher's softened outputs.

config.mode='distill' trains the student (config.model, from scratch or config.init_from) on
pretraining text (config.data) with, at each target token,

  loss = (1 - alpha) * CE(student, next token) + alpha * tau^2 * KL(teacher_tau || student_tau)

where p_tau = softmax(logits / tau) (config.distill.alpha, .temperature). The tau^2 keeps the
soft term's gradient the size of the hard one's as tau grows (Hinton's §2). The teacher
(config.distill.teacher, any lm checkpoint: a training workdir, an lm.convert output, a pruned
or LoRA one, merged) runs once per step on the same global batch, sharded like the student, in
its own jitted forward pass before the train step, so the step receives its targets as batch
arrays and grad accumulation, resume and the memory planner treat them like any other field:

  top_k = 0   teacher_logp [B, T, V]: the teacher's whole tempered log-distribution; the KL is
              exact (what a test checks against a direct computation).
  top_k = k   teacher_ids, teacher_logp [B, T, k]: its k most likely tokens, renormalised over
              them; the soft term is sum_i p~(i) (log p~(i) - log q(i)) over those k, which is
              KL(p~ || q restricted to them) - log q(top k) >= 0: the student matches the
              teacher's ranking there and puts its mass on them. V/k times less batch memory.

With distill.teacher_cache the teacher runs once, before training: `python -m lm.distill` writes
its top-k targets for the rows the run will read (below), and the run reads them from disk
instead of holding the teacher and running it every step.

The logged `loss` is the hard-label cross-entropy (comparable with any run's), `kd` the KL per
token; evaluation is the student's held-out loss, perplexity and bits per byte. Teacher and
student must share the tokenizer (the same pieces in the same order; data.tokenizer defaults to
the teacher's) and the vocabulary size; their shapes may differ.

Sequence-level distillation (Kim & Rush, 2016) needs no mode of its own: the teacher writes its
completions of prompts with `--config.mode=sample --config.sample.output=teacher.jsonl`
({"prompt", "response"} records), and the student fine-tunes on them with config.mode='sft'
and config.post.data='jsonl:teacher.jsonl'.
"""

import functools
import hashlib
import json
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from lm import config as config_lib
from lm import model as model_lib
from lm import sharding
from lm import sources as sources_lib
from lm import tokenizer as tokenizer_lib
from lm import train as train_lib

# The batch fields the teacher adds: the log-probabilities and, with top_k, their token ids.
TEACHER_LOGP, TEACHER_IDS = 'teacher_logp', 'teacher_ids'


def kd_terms(student_logits_BTV, teacher_logp_BTK, teacher_ids_BTK=None, *,
             temperature: float):
  """KL(teacher_tau || student_tau) per position [B, T]: over the whole vocabulary when
  teacher_ids_BTK is None (teacher_logp_BTK is then [B, T, V]), else over the teacher's top k."""
  student_logp_BTV = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature)
  if teacher_ids_BTK is None:
    student_logp_BTK = student_logp_BTV
  else:
    student_logp_BTK = jnp.take_along_axis(student_logp_BTV, teacher_ids_BTK, axis=-1)
  teacher_p_BTK = jnp.exp(teacher_logp_BTK)
  # 0 * log 0 = 0 for tokens the teacher gives no mass (exp underflow at low temperature).
  return jnp.sum(jnp.where(teacher_p_BTK > 0, teacher_p_BTK * (teacher_logp_BTK - student_logp_BTK),
                           0.0), axis=-1)


def loss_sums(params, batch, dropout_rng=None, *, graphdef, alpha: float, temperature: float,
              z_loss: float = 0.0, label_smoothing: float = 0.0):
  """(summed objective, sums) over the loss_mask's tokens: 'nll' (hard labels), 'kd' (the KL),
  'tokens', and an MoE student's router statistics."""
  logits_BTV, moe_aux = model_lib.apply_with_aux(
      graphdef, params, batch['inputs'], batch['segment_ids'], batch['positions'],
      dropout_rng=dropout_rng)
  mask_BT = batch['loss_mask']
  nll_BT, hard_BT = train_lib.token_objective(logits_BTV, batch['targets'], z_loss=z_loss,
                                              label_smoothing=label_smoothing)
  kd_BT = kd_terms(logits_BTV, batch[TEACHER_LOGP], batch.get(TEACHER_IDS),
                   temperature=temperature)
  objective_BT = (1 - alpha) * hard_BT + alpha * temperature ** 2 * kd_BT
  sums = {'nll': (nll_BT * mask_BT).sum(), 'kd': (kd_BT * mask_BT).sum(),
          'tokens': mask_BT.sum()}
  objective = (objective_BT * mask_BT).sum()
  if moe_aux:
    moe_sums = train_lib.moe_metric_sums(moe_aux, sums['tokens'])
    objective = objective + moe_sums['moe_loss']
    sums.update(moe_sums)
  return objective, sums


def objective(graphdef, config: ml_collections.ConfigDict) -> train_lib.Objective:
  """The distillation objective of config.distill; evaluation is the language model's."""
  d, t = config.distill, config.train
  return train_lib.Objective(
      sums=functools.partial(loss_sums, graphdef=graphdef, alpha=d.alpha,
                             temperature=d.temperature, z_loss=t.z_loss,
                             label_smoothing=t.label_smoothing),
      count='tokens', loss='nll',
      eval_sums=functools.partial(train_lib.eval_step, graphdef=graphdef),
      report=train_lib.language_model_report)


def teacher_targets(graphdef, params, batch, *, temperature: float, top_k: int) -> dict:
  """batch with the teacher's tempered log-probabilities of every position (TEACHER_LOGP; with
  top_k its k largest, renormalised, and their ids TEACHER_IDS)."""
  logits_BTV, _ = model_lib.apply_with_aux(graphdef, params, batch['inputs'],
                                           batch['segment_ids'], batch['positions'])
  scaled_BTV = logits_BTV.astype(jnp.float32) / temperature
  if not top_k:
    return {**batch, TEACHER_LOGP: jax.nn.log_softmax(scaled_BTV)}
  top_BTK, ids_BTK = jax.lax.top_k(scaled_BTV, top_k)
  return {**batch, TEACHER_LOGP: jax.nn.log_softmax(top_BTK), TEACHER_IDS: ids_BTK}


def batch_fields(config: ml_collections.ConfigDict) -> dict:
  """{name: (dtype, trailing shape)} of the arrays the teacher adds to a [B, T] batch."""
  d, vocab = config.distill, config.model.vocab_size
  if not d.top_k:
    return {TEACHER_LOGP: (jnp.float32, (vocab,))}
  return {TEACHER_LOGP: (jnp.float32, (d.top_k,)), TEACHER_IDS: (jnp.int32, (d.top_k,))}


def check_teacher(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.distill.teacher's run config; ConfigError when that model cannot teach this student
  (not a decoder, another vocabulary size), read before any data or parameters are."""
  path = config.distill.teacher
  try:
    teacher = config_lib.checkpoint_config(path)
  except FileNotFoundError as e:
    raise config_lib.ConfigError(f'config.distill.teacher={path!r}: {e}') from e
  if teacher.model.get('kind', 'decoder') != 'decoder':
    raise config_lib.ConfigError(
        f"config.distill.teacher={path!r} is a model.kind={teacher.model.kind!r}; distillation "
        'matches next-token distributions, which only a decoder has')
  if teacher.model.vocab_size != config.model.vocab_size:
    raise config_lib.ConfigError(
        f'config.distill.teacher={path!r} has model.vocab_size={teacher.model.vocab_size}, the '
        f'student config.model.vocab_size={config.model.vocab_size}: their distributions must '
        'be over the same tokens (set the student\'s vocab_size to the teacher\'s)')
  return teacher


def teacher_model_config(config: ml_collections.ConfigDict, dtype: str) -> model_lib.ModelConfig:
  """The teacher's model as it runs: its checkpoint's shape, LoRA merged, computing in dtype."""
  teacher = check_teacher(config).copy_and_resolve_references()
  with teacher.unlocked():
    teacher.lora = config.lora.copy_and_resolve_references()
    teacher.lora.rank = 0  # Adapters are merged on load.
  return model_lib.ModelConfig.from_config(teacher, dtype)


def teacher_flops_per_token(config: ml_collections.ConfigDict) -> float:
  """The teacher's forward FLOPs per token (a third of lm.flops' training count): part of every
  step's work, so tokens/s and MFU count it."""
  from lm import flops  # pylint: disable=g-import-not-at-top
  return flops.flops_per_token(teacher_model_config(config, 'float32'), config.data.seq_len) / 3


def load_teacher(config: ml_collections.ConfigDict):
  """(graphdef, params, tokenizer) of config.distill.teacher on the run's mesh, computing in
  the run's dtype (check_teacher first)."""
  from lm import generate  # pylint: disable=g-import-not-at-top
  check_teacher(config)
  graphdef, params, tokenizer, _ = generate.load_checkpoint(
      config.distill.teacher, dtype=config.model.dtype, mesh_config=config.mesh)
  return graphdef, params, tokenizer


def check_tokenizers(student: tokenizer_lib.Tokenizer, teacher: tokenizer_lib.Tokenizer,
                     teacher_path: str) -> None:
  """ConfigError unless both tokenizers hold the same pieces in the same order."""
  if student.pieces() != teacher.pieces():
    raise config_lib.ConfigError(
        f'config.data.tokenizer={student.path!r} is not the tokenizer of config.distill.teacher='
        f'{teacher_path!r} ({teacher.path}): a student learns the teacher\'s distribution over '
        'its tokens, so both must tokenize alike (leave config.data.tokenizer empty to use the '
        "teacher's)")


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.data with data.tokenizer defaulting to the teacher's (check_teacher first)."""
  from lm import generate  # pylint: disable=g-import-not-at-top
  teacher = check_teacher(config)
  d = config.data
  if d.tokenizer:
    return d
  d = d.copy_and_resolve_references()
  d.tokenizer = generate.find_tokenizer(config.distill.teacher, teacher)
  return d


def make_augment(run, tokenizer: tokenizer_lib.Tokenizer):
  """global batch -> the batch with the teacher's targets (teacher_targets, jitted on the run's
  mesh); the teacher's parameters stay on device for the run."""
  config = run.config
  graphdef, params, teacher_tokenizer = load_teacher(config)
  check_tokenizers(tokenizer, teacher_tokenizer, config.distill.teacher)
  logging.info('distilling from config.distill.teacher=%s (%s params), top_k=%d, temperature %g',
               config.distill.teacher, f'{model_lib.count_params(params):,}',
               config.distill.top_k, config.distill.temperature)
  forward = jax.jit(
      functools.partial(teacher_targets, graphdef, temperature=config.distill.temperature,
                        top_k=config.distill.top_k),
      in_shardings=(jax.tree.map(lambda x: x.sharding, params), run.batch_sharding),
      out_shardings=run.batch_sharding)  # [B, T, K] split like [B, T]: by rows.

  def augment(batch):
    with sharding.active(run.mesh, run.rules):
      return forward(params, batch)
  return augment


# ---------------------------------------------------------------------------------------------
# Precomputed targets (config.distill.teacher_cache): the teacher runs once, not every step.
#
# `python -m lm.distill --config C --workdir W` runs the teacher over the rows that the first
# train.steps steps of config C read and writes its top-k targets to config.distill.teacher_cache;
# the training run (the same config) then reads them instead of holding and running the teacher.
# A row's targets are found by a hash of its inputs, which alone determine them (segment ids and
# positions follow from the inputs): so any order, epoch, process count or resumed run finds the
# rows it reads, and one it does not find (a longer run, other data) is an error, never a silent
# misalignment. Each row is computed once, however many epochs read it.
#
#   CACHE/manifest.json     what made the targets (teacher, temperature, top_k, dtype, ...) and
#                           how many steps they cover; written last, so its absence means unfinished
#   CACHE/chunk-NNNNN/      steps [first, last) of the run: keys.npy (uint64 [R]), ids.npy
#                           ([R, T, k], uint16 below 65,536 tokens, else int32) and logp.npy
#                           ([R, T, k] in distill.cache_dtype), memory-mapped by the run
#
# Chunks are renamed into place whole, so a killed precompute reruns only its unfinished chunk;
# a rerun with more train.steps keeps the finished ones and adds the rest. Exact for any dense or
# dropless teacher; an MoE teacher that drops tokens over capacity stores what it computed on the
# precompute's batches.

CACHE_MANIFEST = 'manifest.json'
CACHE_FORMAT = 1
CHUNK_STEPS = 256  # Steps per chunk: what a killed precompute recomputes at most.
# What the targets depend on: a cache made with other values must not be read.
_CACHE_IDENTITY = ('teacher', 'temperature', 'top_k', 'cache_dtype')


def row_keys(inputs_BT: np.ndarray) -> np.ndarray:
  """uint64 [B]: each row's key, a 64-bit BLAKE2 hash of its int32 input ids."""
  inputs_BT = np.ascontiguousarray(inputs_BT, np.int32)
  return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(),
                                  'little') for row in inputs_BT], np.uint64)


def _cache_identity(config: ml_collections.ConfigDict) -> dict:
  d = config.distill
  return {**{name: d[name] for name in _CACHE_IDENTITY}, 'seq_len': config.data.seq_len,
          'vocab_size': config.model.vocab_size, 'dtype': config.model.dtype}


def _read_manifest(directory: str) -> dict | None:
  path = os.path.join(directory, CACHE_MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f'config.distill.teacher_cache={directory!r}: unreadable '
                                 f'{CACHE_MANIFEST} ({e}); precompute into a new directory') from e


def _check_identity(directory: str, manifest: dict, config: ml_collections.ConfigDict) -> None:
  expected = _cache_identity(config)
  differ = {k: (manifest.get('identity', {}).get(k), v) for k, v in expected.items()
            if manifest.get('identity', {}).get(k) != v}
  if manifest.get('format') != CACHE_FORMAT or differ:
    described = ', '.join(f'{k}: cache {a!r}, config {b!r}' for k, (a, b) in differ.items())
    raise config_lib.ConfigError(
        f'config.distill.teacher_cache={directory!r} holds targets made otherwise '
        f'({described or "another format"}); precompute them for this config into a new '
        'directory (python -m lm.distill)')


def _chunks(directory: str) -> list[tuple[int, int, str]]:
  """(first step, last step, path) of the cache's finished chunks, in order."""
  found = []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    path = os.path.join(directory, name)
    if name.startswith('chunk-') and os.path.isfile(os.path.join(path, 'meta.json')):
      with open(os.path.join(path, 'meta.json')) as f:
        meta = json.load(f)
      found.append((meta['first_step'], meta['last_step'], path))
  return found


def precompute_teacher_targets(config: ml_collections.ConfigDict, workdir: str, *,
                               chunk_steps: int = CHUNK_STEPS) -> dict:
  """Writes config.distill.teacher's top-k targets for the rows of train.steps steps of config
  (read from workdir's data, as the run reads them) to config.distill.teacher_cache; returns its
  manifest. Resumes an unfinished or shorter cache of the same identity."""
  from lm import files as files_lib  # pylint: disable=g-import-not-at-top
  directory = config.distill.teacher_cache
  if not directory:
    raise config_lib.ConfigError('config.distill.teacher_cache: the directory to write the '
                                 "teacher's targets to is empty")
  if not config.distill.top_k:
    raise config_lib.ConfigError(
        'config.distill.teacher_cache holds top-k targets: set config.distill.top_k > 0 (the '
        'whole distribution is V floats a token, too many to store)')
  if jax.process_count() > 1:
    raise config_lib.ConfigError('python -m lm.distill runs on one process (its devices may be '
                                 'many); the run that reads the cache may use any number')
  computing = config.copy_and_resolve_references()
  computing.distill.teacher_cache = ''  # Set up as a run that computes the targets on the fly.
  run = train_lib.setup(computing)
  manifest = _read_manifest(directory)
  if manifest is not None:
    _check_identity(directory, manifest, run.config)
  os.makedirs(directory, exist_ok=True)
  steps = run.config.train.steps
  finished = {first: (last, path) for first, last, path in _chunks(directory)}
  data = train_lib.make_data(run, workdir)
  cache_dtype = np.dtype(run.config.distill.cache_dtype)
  ids_dtype = np.uint16 if run.config.model.vocab_size <= 2 ** 16 else np.int32
  seen: set[int] = set()
  rows = 0
  progress = tqdm(total=steps, desc='teacher targets', unit='step', dynamic_ncols=True,
                  disable=not sys.stderr.isatty())
  for first in range(0, steps, chunk_steps):
    last = min(first + chunk_steps, steps)
    done = finished.get(first)
    if done is not None and done[0] >= last:  # Finished before: its rows are known, not rerun.
      for _ in range(first, last):
        next(data.train_iter)
      keys = np.load(os.path.join(done[1], 'keys.npy'))
      seen.update(keys.tolist())
      rows += len(keys)
      progress.update(last - first)
      continue
    if done is not None:  # A shorter run's last chunk: computed again to its new end.
      shutil.rmtree(done[1])
    keys_parts, ids_parts, logp_parts = [], [], []
    for _ in range(first, last):
      local = next(data.train_iter)
      keys = row_keys(local['inputs'])
      new = [i for i, key in enumerate(keys.tolist()) if key not in seen]
      seen.update(keys.tolist())
      new = [i for i in new if keys[i] not in keys[:i]]  # A row twice in one batch: once.
      if new:
        targets = data.augment(jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(run.batch_sharding, x), local))
        keys_parts.append(keys[new])
        ids_parts.append(np.asarray(targets[TEACHER_IDS])[new].astype(ids_dtype))
        logp_parts.append(np.asarray(targets[TEACHER_LOGP])[new].astype(cache_dtype))
      progress.update(1)
    k, T = run.config.distill.top_k, run.config.data.seq_len
    parts = {'keys.npy': np.concatenate(keys_parts) if keys_parts else np.zeros(0, np.uint64),
             'ids.npy': np.concatenate(ids_parts) if ids_parts else np.zeros((0, T, k), ids_dtype),
             'logp.npy': (np.concatenate(logp_parts) if logp_parts
                          else np.zeros((0, T, k), cache_dtype))}
    with files_lib.atomic_directory(os.path.join(directory, f'chunk-{first:08d}')) as tmp:
      for name, array in parts.items():
        np.save(os.path.join(tmp, name), array)
      with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump({'first_step': first, 'last_step': last, 'rows': len(parts['keys.npy'])}, f)
    rows += len(parts['keys.npy'])
    logging.info('teacher targets: steps [%d, %d) done, %d rows so far', first, last, rows)
  progress.close()
  manifest = {'format': CACHE_FORMAT, 'identity': _cache_identity(run.config), 'steps': steps,
              'batch_size': run.config.train.batch_size, 'rows': rows,
              'tokenizer': data.tokenizer.path}
  files_lib.write_atomically(os.path.join(directory, CACHE_MANIFEST),
                             lambda f: json.dump(manifest, f, indent=2))
  logging.info('wrote the teacher targets of %d rows (%d steps) to %s', rows, steps, directory)
  return manifest


class TeacherCache:
  """A precompute's targets, memory-mapped: targets(inputs) looks rows up by their keys."""

  def __init__(self, config: ml_collections.ConfigDict):
    directory = self.directory = config.distill.teacher_cache
    manifest = _read_manifest(directory)
    if manifest is None:
      raise config_lib.ConfigError(
          f'config.distill.teacher_cache={directory!r} has no {CACHE_MANIFEST}: its targets were '
          'never precomputed, or the precompute did not finish; run python -m lm.distill with '
          'this config first')
    _check_identity(directory, manifest, config)
    self.manifest = manifest
    chunks = [path for first, last, path in _chunks(directory) if first < manifest['steps']]
    keys = [np.load(os.path.join(path, 'keys.npy')) for path in chunks]
    self._ids = [np.load(os.path.join(path, 'ids.npy'), mmap_mode='r') for path in chunks]
    self._logp = [np.load(os.path.join(path, 'logp.npy'), mmap_mode='r') for path in chunks]
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    self._order = np.argsort(all_keys, kind='stable')
    self._sorted = all_keys[self._order]
    self._chunk = np.concatenate([np.full(len(k), i) for i, k in enumerate(keys)] or [[]])
    self._row = np.concatenate([np.arange(len(k)) for k in keys] or [[]])

  def targets(self, inputs_BT: np.ndarray) -> dict[str, np.ndarray]:
    """{TEACHER_IDS: int32 [B, T, k], TEACHER_LOGP: float32 [B, T, k]} of these rows."""
    keys = row_keys(inputs_BT)
    at = np.minimum(np.searchsorted(self._sorted, keys), max(len(self._sorted) - 1, 0))
    missing = np.flatnonzero((self._sorted[at] != keys) if len(self._sorted) else keys == keys)
    if len(missing):
      raise sources_lib.DataError(
          f'{len(missing)} of the {len(keys)} rows of this batch have no targets in '
          f'config.distill.teacher_cache={self.directory!r} (precomputed for '
          f'{self.manifest["steps"]} steps of batch {self.manifest["batch_size"]}): the run reads '
          'more steps or other data than the precompute did; run python -m lm.distill with '
          'this config to add them')
    index = self._order[at]
    ids = np.stack([self._ids[self._chunk[i]][self._row[i]] for i in index])
    logp = np.stack([self._logp[self._chunk[i]][self._row[i]] for i in index])
    return {TEACHER_IDS: ids.astype(np.int32), TEACHER_LOGP: logp.astype(np.float32)}


class _WithCachedTargets:
  """A training iterator whose batches carry their rows' precomputed teacher targets; its
  state is the wrapped iterator's (the targets follow from the rows)."""

  def __init__(self, batches, cache: TeacherCache):
    self._batches, self._cache = batches, cache

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._batches)
    return {**batch, **self._cache.targets(batch['inputs'])}

  def get_state(self):
    return self._batches.get_state()

  def set_state(self, state):
    self._batches.set_state(state)


def with_cached_targets(train_iter, config: ml_collections.ConfigDict,
                        tokenizer: tokenizer_lib.Tokenizer):
  """train_iter with config.distill.teacher_cache's targets added to each batch (the cache
  checked against the config and the run's tokenizer first)."""
  from lm import generate  # pylint: disable=g-import-not-at-top
  cache = TeacherCache(config)
  teacher_tokenizer = generate.find_tokenizer(config.distill.teacher, check_teacher(config))
  check_tokenizers(tokenizer, tokenizer_lib.Tokenizer(teacher_tokenizer), config.distill.teacher)
  logging.info('distilling from the targets of config.distill.teacher=%s precomputed in %s '
               '(%d rows, %d steps)', config.distill.teacher, cache.directory,
               cache.manifest['rows'], cache.manifest['steps'])
  return _WithCachedTargets(train_iter, cache)


def define_flags():
  """The command's flags, defined when it runs (lm.train imports this module)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).')
  workdir = flags.DEFINE_string('workdir', None, "The student's run directory (its data cache).")
  flags.mark_flags_as_required(['config', 'workdir'])
  return config, workdir


def main(argv, config_flag, workdir_flag):
  """`python -m lm.distill --config C --workdir W [--config.a.b=v]`: precomputes the teacher
  targets config C's run in W reads, into config.distill.teacher_cache."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    manifest = precompute_teacher_targets(config_flag.value, workdir_flag.value)
  except config_lib.input_errors() as e:
    sys.exit(f'error: {e}')
  print(f'teacher targets of {manifest["rows"]:,} rows ({manifest["steps"]} steps) in '
        f'{config_flag.value.distill.teacher_cache}', flush=True)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _config_flag, _workdir_flag = define_flags()
  app.run(functools.partial(main, config_flag=_config_flag, workdir_flag=_workdir_flag),
          flags_parser=config_lib.parse_flags)
