"""Rollouts: the policy completes prompts with lm.engine, and the completions are scored, for the
modes that learn from their own samples (mode='ppo', lm/post/ppo.py; 'grpo', lm/post/grpo.py).

Each training step takes train.batch_size / post.group_size prompts of config.post.data and
completes each group_size times (continuous batching over post.rollout_slots decode rows;
completion seeds are a function of train.seed, the step and the row, so a resumed run draws the
same completions). A completion is laid out like any post-training example, [BOS] +
encode(prompt) + completion (+ EOS if it stopped), one per row of data.seq_len; prompts are cut
from the left to leave room for post.max_new_tokens. Then, on the devices, in one jitted pass
each: the policy's own per-token log-probabilities (and its values, for PPO), the reference's
(post.reference, default init_from; with LoRA the base with adapters off: no second copy) and
the score, from a reward model (post.reward_model, read at the last token as lm.post.reward
trains it) or a Python function (post.reward_function). The mode turns scores into advantages.

The rows carry everything the update needs as [B, seq_len] arrays (old_logp, ref_logp,
advantages, ...), so a batch shards one way and the optimizer step is lm.train's, with
post.update_epochs x post.minibatches updates per rollout batch.
"""

import dataclasses
import functools
import hashlib
import importlib
import time

from absl import logging
import jax
import numpy as np

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import data as data_lib
from lm import engine as engine_lib
from lm import lora as lora_lib
from lm import model as model_lib
from lm import pytree
from lm import sharding
from lm import sources as sources_lib
from lm.post import data as post_data
from lm.post import dpo
from lm.post import reward as reward_lib


@dataclasses.dataclass(frozen=True)
class Prompt:
  tokens: list[int]  # [BOS] + encode(prompt), cut from the left to fit.
  text: str
  fields: dict  # The record's other fields, passed on to a reward function.


def read_prompts(post, tokenizer, max_tokens: int) -> tuple[list[Prompt], post_data.Counts]:
  """The distinct prompts of config.post.data (post.prompt_field), at most max_tokens tokens
  each with the BOS (longer ones keep their end: the text next to the completion)."""
  counts, seen, prompts = post_data.Counts(), set(), []
  where = f'config.post.data={post.data!r}'
  for location, record in post_data.read_records(post.data, where):
    if post.max_examples and counts.records >= post.max_examples:
      break
    counts.records += 1
    text = record.get(post.prompt_field)
    if not isinstance(text, str):
      raise sources_lib.DataError(f'{location}: no string field config.post.prompt_field='
                                  f'{post.prompt_field!r} (found {sorted(record)})')
    if text in seen:
      counts.duplicates += 1
      continue
    seen.add(text)
    tokens = [tokenizer.bos_id] + tokenizer.encode(text)
    if len(tokens) > max_tokens:
      tokens = [tokenizer.bos_id] + tokens[len(tokens) - max_tokens + 1:]
      counts.truncated_prompts += 1
    fields = {k: v for k, v in record.items() if k != post.prompt_field}
    prompts.append(Prompt(tokens, text, fields))
  if counts.records == 0:
    raise sources_lib.DataError(f'{where} holds no records')
  if len(prompts) < 2:
    raise sources_lib.DataError(f'{where}: {len(prompts)} distinct prompts of {counts.records} '
                                'records: at least one to train on and one to hold out')
  return prompts, counts


def reward_function(spec: str):
  """The callable MODULE:NAME of config.post.reward_function."""
  module_name, _, name = spec.partition(':')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise config_lib.ConfigError(f'config.post.reward_function={spec!r}: cannot import '
                                 f'{module_name!r} ({e})') from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise config_lib.ConfigError(f'config.post.reward_function={spec!r}: {module_name} has no '
                                 f'function {name!r}')
  return fn


def _same_file(a: str, b: str) -> bool:
  digest = lambda path: hashlib.blake2b(open(path, 'rb').read()).digest()
  return digest(a) == digest(b)


class RewardModel:
  """A mode='reward' checkpoint, sharded over the run's mesh, scoring rows of token ids."""

  def __init__(self, run, path: str, tokenizer):
    from lm import generate  # pylint: disable=g-import-not-at-top
    from lm import train as train_lib  # pylint: disable=g-import-not-at-top
    where = f'config.post.reward_model={path!r}'
    try:
      config = config_lib.checkpoint_config(path)
    except FileNotFoundError as e:
      raise config_lib.ConfigError(f'{where}: {e}') from None
    # In the run's compute dtype (config.model.dtype), like the policy and the reference.
    self.cfg = model_lib.ModelConfig.from_config(config, run.cfg.dtype)
    if not self.cfg.reward_head:
      raise config_lib.ConfigError(f'{where} has no reward head: train one with mode=reward')
    if self.cfg.vocab_size != run.cfg.vocab_size:
      raise config_lib.ConfigError(
          f'{where} has vocab_size={self.cfg.vocab_size} but the policy has '
          f'{run.cfg.vocab_size}: the reward model must read the policy\'s token ids')
    try:
      theirs = generate.find_tokenizer(path, config)
    except FileNotFoundError:
      theirs = None
    if theirs is not None and not _same_file(theirs, tokenizer.path):
      raise config_lib.ConfigError(f'{where} was trained with the tokenizer {theirs}, which '
                                   f'differs from the policy\'s {tokenizer.path}')
    if self.cfg.max_seq_len < run.config.data.seq_len + 1:
      raise config_lib.ConfigError(
          f'{where} reads at most max_seq_len={self.cfg.max_seq_len} tokens; rollouts have up to '
          f'data.seq_len + 1 = {run.config.data.seq_len + 1}')
    shapes = jax.eval_shape(functools.partial(model_lib.init_params, self.cfg, 0))
    shardings = sharding.tree_shardings(model_lib.logical_axes(self.cfg), shapes, run.mesh,
                                        run.rules)
    target = jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                          shapes, shardings)
    saved = set(pytree.leaf_paths(checkpoint_lib.params_shapes(path)))
    if ('reward_head',) not in saved:
      raise config_lib.ConfigError(f'{where} holds no trained reward head')
    self.params = checkpoint_lib.restore_params(path, train_lib.init_from_target(path, target))
    missing = [p for p in pytree.leaf_paths(shapes) if p not in set(
        pytree.leaf_paths(self.params))]
    if missing:  # Initialised alone: XLA computes only these leaves of the init.
      fresh = jax.jit(lambda: pytree.subtree(model_lib.init_params(self.cfg, 0), missing),
                      out_shardings=pytree.subtree(shardings, missing))
      self.params = pytree.union(self.params, fresh())
    self.score = jax.jit(functools.partial(reward_lib.rewards, graphdef=model_lib.graphdef(self.cfg)),
                         in_shardings=(shardings, run.batch_sharding))


class KLController:
  """The KL penalty's coefficient: fixed, or adapted towards post.kl_target (Ziegler et al.,
  2019): multiplied by 1 + clip(KL / target - 1, -0.2, 0.2) * batch_size / kl_horizon after
  each rollout batch. Its value is part of the data state saved with each checkpoint."""

  def __init__(self, post, batch_size: int):
    self.value, self.target, self.horizon = post.kl_coef, post.kl_target, post.kl_horizon
    self.batch_size = batch_size

  def update(self, kl: float) -> None:
    if self.target > 0:
      error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
      self.value *= 1 + error * self.batch_size / self.horizon


def completion_rows(prompts: list[list[int]], completions: list[list[int]], seq_len: int,
                    pad_id: int) -> dict[str, np.ndarray]:
  """[B, seq_len] rows of prompt + completion (lm.post.data's layout), the loss mask on the
  completion; and `last` [B], the index of each row's last token as an input (the reward model
  reads there, in `scored` rows of seq_len + 1 that take the final token as an input too)."""
  B = len(prompts)
  rows = dict(inputs=np.full((B, seq_len), pad_id, np.int32),
              targets=np.full((B, seq_len), pad_id, np.int32),
              segment_ids=np.zeros((B, seq_len), np.int32),
              positions=np.zeros((B, seq_len), np.int32),
              loss_mask=np.zeros((B, seq_len), np.float32))
  scored = np.full((B, seq_len + 1), pad_id, np.int32)
  for r, (prompt, completion) in enumerate(zip(prompts, completions)):
    tokens = np.asarray(list(prompt) + list(completion), np.int32)
    n = len(tokens) - 1
    if n > seq_len:
      raise ValueError(f'row {r}: {len(tokens)} tokens exceed data.seq_len + 1 = {seq_len + 1}')
    rows['inputs'][r, :n], rows['targets'][r, :n] = tokens[:-1], tokens[1:]
    rows['segment_ids'][r, :n] = 1
    rows['positions'][r, :n] = np.arange(n)
    rows['loss_mask'][r, len(prompt) - 1:n] = 1
    scored[r, :n + 1] = tokens
  return rows, scored


class Rollouts:
  """The training iterator of PPO and GRPO: next() gives a batch of prompt indices (this
  process's); complete(state, batch) turns it into the rows of a rollout batch and its metrics.

  finish(rows, scores, kl_coef) -> (rows, metrics) is the mode's: advantages from the scores.
  get_state()/set_state() cover the prompt order and the KL controller, so a checkpoint resumes
  both.
  """

  def __init__(self, run, tokenizer, prompts: list[Prompt], held_out: list[Prompt], *,
               values: bool, finish, reward_model: RewardModel | None, reward_fn):
    config = run.config
    self.run, self.config, self.post, self.t = run, config, config.post, config.train
    self.tokenizer, self.prompts, self.held_out = tokenizer, prompts, held_out
    self.finish, self.reward_model, self.reward_fn = finish, reward_model, reward_fn
    self.group_size = self.post.group_size
    self.prompts_per_step = self.t.batch_size // self.group_size
    self.kl = KLController(self.post, self.t.batch_size)
    self._prompt_iter = post_data.train_iterator(
        _Indices(len(prompts)), batch_size=self.prompts_per_step, seed=self.t.seed)
    self.engine = engine_lib.Engine(run.cfg, None, slots=self.post.rollout_slots)
    graphdef = run.graphdef
    in_shardings = (run.shardings.params, run.batch_sharding)
    if values:
      policy = lambda params, rows: _logps_and_values(params, rows, graphdef=graphdef)
    else:
      policy = lambda params, rows: (dpo.token_logps(params, rows, graphdef=graphdef), None)
    self._policy = jax.jit(policy, in_shardings=in_shardings)
    # The reference's log-probabilities: None without a KL term; with LoRA and the init
    # checkpoint as reference, the policy's params with adapters off (inside the jit: no copy).
    self._reference, self.reference_params = None, None
    if self.post.kl_coef > 0 or self.post.kl_target > 0:
      reference = self.post.reference or config.init_from
      if run.cfg.lora_rank and reference == config.init_from:
        logps = lambda params, rows: dpo.token_logps(lora_lib.adapters_off(params), rows,
                                                     graphdef=graphdef)
      else:
        logps = functools.partial(dpo.token_logps, graphdef=graphdef)
        self.reference_params = dpo.reference_params(run)
      self._reference = jax.jit(logps, in_shardings=in_shardings)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._prompt_iter)

  def get_state(self) -> dict:
    return {'prompts': self._prompt_iter.get_state(), 'kl_coef': self.kl.value}

  def set_state(self, state: dict) -> None:
    self._prompt_iter.set_state(state['prompts'])
    self.kl.value = state['kl_coef']

  def complete(self, state, batch: dict) -> tuple[dict, dict]:
    """The rollout batch of a batch of prompt indices, completed by state.params, and its
    metrics (rollout's and the mode's)."""
    step = int(jax.device_get(state.step))
    prompts = [self.prompts[i] for i in batch['index'] for _ in range(self.group_size)]
    seeds = [_seed(self.t.seed, step, int(i), g) for i in batch['index']
             for g in range(self.group_size)]
    rows, scores, metrics = self.score(state.params, prompts, seeds, self.post.temperature)
    kl_coef = self.kl.value
    rows, mode_metrics = self.finish(rows, scores, kl_coef)
    self.kl.update(metrics['kl'])
    metrics.update(mode_metrics, kl_coef=kl_coef)
    return rows, metrics

  def score(self, params, prompts: list[Prompt], seeds: list[int], temperature: float):
    """(rows with old_logp and ref_logp [and old_values], scores [B], metrics) of one completion
    per prompt drawn with its seed."""
    post, seq_len = self.post, self.config.data.seq_len
    start = time.perf_counter()
    requests = [engine_lib.Request(
        prompt=p.tokens, max_new_tokens=post.max_new_tokens, stop_tokens=(self.tokenizer.eos_id,),
        temperature=temperature, top_k=post.top_k, top_p=post.top_p, seed=seed)
                for p, seed in zip(prompts, seeds)]
    self.engine.params = params
    with self.run.active():
      completions = [c.tokens for c in self.engine.run(requests)]
    generated = time.perf_counter()
    rows, scored = completion_rows([p.tokens for p in prompts], completions, seq_len,
                                   self.tokenizer.pad_id)
    stopped = np.asarray([c[-1] == self.tokenizer.eos_id for c in completions], np.float32)
    with self.run.active():
      logp, values = self._policy(params, rows)
      rows['old_logp'] = np.asarray(jax.device_get(logp), np.float32)
      if values is not None:
        rows['old_values'] = np.asarray(jax.device_get(values), np.float32) * rows['loss_mask']
      if self._reference is not None:
        reference = params if self.reference_params is None else self.reference_params
        rows['ref_logp'] = np.asarray(jax.device_get(self._reference(reference, rows)))
      else:
        rows['ref_logp'] = rows['old_logp'].copy()
    scores = self._scores(prompts, completions, rows, scored)
    scores = scores - post.missing_eos_penalty * (1 - stopped)
    finished = time.perf_counter()
    tokens = rows['loss_mask'].sum(-1)
    kl = ((rows['old_logp'] - rows['ref_logp']) * rows['loss_mask']).sum(-1)
    metrics = {'reward': float(scores.mean()), 'reward_std': float(scores.std()),
               'kl': float(kl.mean()), 'completion_tokens': float(tokens.mean()),
               'stopped': float(stopped.mean()), 'time_rollout': generated - start,
               'time_scoring': finished - generated}
    return rows, scores, metrics

  def _scores(self, prompts, completions, rows, scored) -> np.ndarray:
    if self.reward_model is not None:
      segment_ids = (np.arange(scored.shape[1])[None] <= rows['segment_ids'].sum(-1)[:, None])
      scored_rows = {'inputs': scored, 'segment_ids': segment_ids.astype(np.int32),
                     'positions': np.broadcast_to(np.arange(scored.shape[1], dtype=np.int32),
                                                  scored.shape)}
      with self.run.active():
        return np.asarray(jax.device_get(self.reward_model.score(self.reward_model.params,
                                                                 scored_rows)), np.float32)
    eos = self.tokenizer.eos_id
    texts = [self.tokenizer.decode([t for t in c if t != eos]) for c in completions]
    fields = {name: [p.fields.get(name) for p in prompts] for name in prompts[0].fields}
    scores = self.reward_fn(prompts=[p.text for p in prompts], completions=texts, **fields)
    scores = np.asarray(scores, np.float32)
    if scores.shape != (len(prompts),) or not np.isfinite(scores).all():
      raise sources_lib.DataError(
          f'config.post.reward_function={self.post.reward_function!r} returned '
          f'{scores.shape} scores (finite: {bool(np.isfinite(scores).all())}) for '
          f'{len(prompts)} completions: it must return one finite float per completion')
    return scores

  def evaluate(self, params) -> dict:
    """Held-out prompts (up to train.eval_batches batches' worth), one completion each with
    fixed seeds: eval_reward, eval_kl and eval_completion_tokens of the current policy."""
    n = min(len(self.held_out), self.t.eval_batches * self.prompts_per_step)
    prompts = self.held_out[:n]
    # Pad to whole batches so the jitted scoring passes keep their one shape.
    padded = prompts + [prompts[-1]] * (-n % self.t.batch_size)
    totals = {'reward': 0.0, 'kl': 0.0, 'completion_tokens': 0.0}
    for start in range(0, len(padded), self.t.batch_size):
      chunk = padded[start:start + self.t.batch_size]
      seeds = [_seed(self.t.seed, -1, start + i, 0) for i in range(len(chunk))]
      rows, scores, _ = self.score(params, chunk, seeds, self.post.temperature)
      keep = min(len(chunk), n - start)
      kl = ((rows['old_logp'] - rows['ref_logp']) * rows['loss_mask']).sum(-1)
      totals['reward'] += float(scores[:keep].sum())
      totals['kl'] += float(kl[:keep].sum())
      totals['completion_tokens'] += float(rows['loss_mask'][:keep].sum())
    return {f'eval_{name}': value / n for name, value in totals.items()}


class _Indices:
  """Prompt indices as grain rows: {'index': i}."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'index': np.int32(i)}


def _seed(seed: int, step: int, prompt: int, sample: int) -> int:
  """A completion's sampling seed: the same run, step, prompt and sample draw the same tokens."""
  digest = hashlib.blake2b(f'{seed}/{step}/{prompt}/{sample}'.encode(), digest_size=4).digest()
  return int.from_bytes(digest, 'little')


def _logps_and_values(params, rows, *, graphdef):
  """The policy's per-token log p(target) and values [B, T] at the loss mask's tokens."""
  logits_BTV, values_BT, _ = model_lib.apply_with_values(
      graphdef, params, rows['inputs'], rows['segment_ids'], rows['positions'])
  return dpo.target_logps(logits_BTV, rows), values_BT


def make_data(run, tokenizer, *, values: bool, finish, shard_index: int = 0,
              shard_count: int = 1) -> data_lib.Data:
  """config.post.data's prompts as lm.data.Data whose train_iter is a Rollouts: a seeded
  eval_fraction of the prompts held out for evaluate()."""
  config = run.config
  post, t = config.post, config.train
  if shard_count > 1:
    raise config_lib.ConfigError(
        f'config.mode={config.mode} runs in one process (any mesh of its devices); '
        f'this job has {shard_count}')
  max_prompt = config.data.seq_len + 1 - post.max_new_tokens
  prompts, counts = read_prompts(post, tokenizer, max_prompt)
  train_prompts, eval_prompts = post_data.split(prompts, post.eval_fraction, t.seed)
  reward_model = RewardModel(run, post.reward_model, tokenizer) if post.reward_model else None
  reward_fn = reward_function(post.reward_function) if post.reward_function else None
  rollouts = Rollouts(run, tokenizer, train_prompts, eval_prompts, values=values, finish=finish,
                      reward_model=reward_model, reward_fn=reward_fn)
  stats = dict(records=counts.records, duplicates=counts.duplicates,
               truncated_prompts=counts.truncated_prompts, prompts=len(prompts),
               train_prompts=len(train_prompts), eval_prompts=len(eval_prompts),
               reward=post.reward_model or post.reward_function, tokenizer=tokenizer.path)
  logging.info('Prompts: %s', stats)
  if counts.truncated_prompts:
    logging.warning('%d prompts lost tokens from the left to fit data.seq_len=%d with '
                    'post.max_new_tokens=%d', counts.truncated_prompts, config.data.seq_len,
                    post.max_new_tokens)
  return data_lib.Data(tokenizer=tokenizer, train_iter=rollouts, eval_batches=lambda n: [],
                       token_bytes=tokenizer.token_bytes(), stats=stats,
                       rollout=rollouts.complete, evaluate=rollouts.evaluate)
