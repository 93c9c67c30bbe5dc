"""Training: the optimizer, the pure `train_step`, evaluation, and the loop that runs them.

Read top to bottom: `loss_sums` (per-token cross-entropy), `train_step` (gradient accumulation,
clipping, AdamW), `eval_step`, then `train`, the loop with logging, evaluation, checkpoints and
resume.
"""

from collections.abc import Callable
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time

import flax.struct
from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import data as data_lib
from lm import distributed
from lm import files as files_lib
from lm import flops
from lm import lora as lora_lib
from lm import metrics as metrics_lib
from lm import model as model_lib
from lm import peft as peft_lib
from lm import prune as prune_lib
from lm import pytree
from lm import sharding


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN or Inf; the run stops before saving that state."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # Key data (uint32) for any randomness in training, folded with the step.


def learning_rate_schedule(t: ml_collections.ConfigDict,
                           updates_per_step: int = 1) -> optax.Schedule:
  """Linear warmup to t.learning_rate, cosine decay to t.learning_rate * t.min_lr_ratio, over
  t.steps steps of `updates_per_step` optimizer updates each (PPO's epochs x minibatches)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps * updates_per_step,
      decay_steps=t.steps * updates_per_step, end_value=t.learning_rate * t.min_lr_ratio)


def trained_paths(t: ml_collections.ConfigDict, logical_axes) -> tuple[tuple[str, ...], ...] | None:
  """Paths of the parameters in t.trainable's groups (config.PARAM_GROUPS), and of the scalar
  heads (model.SCALAR_HEADS) the model has; None: all of them."""
  groups = [name.strip() for name in t.trainable.split(',')]
  if 'all' in groups:
    return None
  return tuple(path for path, axes in traverse_util.flatten_dict(logical_axes).items()
               if path[-1] in model_lib.SCALAR_HEADS
               or any(config_lib.PARAM_GROUPS[g](axes) for g in groups))


def split_trained(params: dict, trained: tuple | None) -> tuple[dict, dict]:
  """(trained parameters, frozen parameters) as two nested dicts; trained=None: all trained."""
  if trained is None:
    return params, {}
  frozen = [p for p in pytree.leaf_paths(params) if p not in set(trained)]
  return pytree.subtree(params, trained), pytree.subtree(params, frozen)


def is_decayed(name: str) -> bool:
  """Whether weight decay applies to the parameter named `name`: every weight matrix, embedding
  and LoRA adapter; no norm scale or bias ('scale', 'bias', 'b_*')."""
  return not (name in ('scale', 'bias') or name.startswith('b_'))


def make_optimizer(t: ml_collections.ConfigDict, logical_axes,
                   updates_per_step: int = 1) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay on weights and embeddings, not on norms or
  biases.

  What decays is decided by a parameter's role, its name (is_decayed), not by its rank: gpt2's
  attention biases b_q, b_k, b_v have two axes (heads, head_dim) and are still biases. The
  optimizer covers the trained parameters only (`split_trained(params, trained_paths(...))[0]`):
  frozen ones get no gradient, no optimizer state and no update, so they stay bit-identical.
  """
  trained, _ = split_trained(logical_axes, trained_paths(t, logical_axes))
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda path, _: is_decayed(path[-1].key), trained, is_leaf=pytree.is_axes)
  adamw = optax.adamw(learning_rate_schedule(t, updates_per_step), b1=t.b1, b2=t.b2, eps=t.eps,
                      weight_decay=t.weight_decay, mask=decay_mask)
  # Always chained, so turning clipping on or off keeps the optimizer state's structure.
  clip = optax.clip_by_global_norm(t.grad_clip if t.grad_clip > 0 else float('inf'))
  return optax.chain(clip, adamw)


def token_objective(logits_BTV, targets_BT, *, z_loss: float = 0.0,
                    label_smoothing: float = 0.0):
  """(nll_BT, objective_BT) of each position: the cross-entropy of its target, and the trained
  objective (label-smoothed toward the uniform distribution, plus z_loss * logsumexp^2) that
  every kind's loss (causal, masked, span corruption) sums over its own target positions."""
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  objective_BT = nll_BT
  if label_smoothing:
    uniform_nll_BT = log_z_BT - logits_BTV.mean(-1)
    objective_BT = (1 - label_smoothing) * nll_BT + label_smoothing * uniform_nll_BT
  if z_loss:
    objective_BT = objective_BT + z_loss * log_z_BT ** 2
  return nll_BT, objective_BT


def loss_sums(params, batch, dropout_rng=None, *, graphdef, z_loss: float = 0.0,
              label_smoothing: float = 0.0):
  """Summed (not averaged) training objective over the batch's target tokens, and its parts.

  Sums, so that micro-batches add up to exactly the full batch; the caller divides by tokens.
  dropout_rng turns on the model's dropout (LoRA's, when config.lora.dropout > 0).
  """
  logits_BTV, moe_aux = model_lib.apply_with_aux(
      graphdef, params, batch['inputs'], batch['segment_ids'], batch['positions'],
      dropout_rng=dropout_rng)
  mask_BT = batch['loss_mask']
  nll_BT, objective_BT = token_objective(logits_BTV, batch['targets'], z_loss=z_loss,
                                         label_smoothing=label_smoothing)
  sums = {'nll': (nll_BT * mask_BT).sum(), 'tokens': mask_BT.sum()}
  objective = (objective_BT * mask_BT).sum()
  if moe_aux:
    moe_sums = moe_metric_sums(moe_aux, sums['tokens'])
    objective = objective + moe_sums['moe_loss']
    sums.update(moe_sums)
  return objective, sums


def moe_metric_sums(aux: dict, tokens) -> dict:
  """An MoE model's auxiliary loss and router statistics (lm/moe.py) as sums weighted by the
  batch's target tokens, so that dividing by the step's tokens averages them over micro-batches:
  the weighted loss and each statistic as means over MoE layers, and per layer the most loaded
  expert's share times num_experts (1.0 is perfect balance) and the share of dropped assignments."""
  E = aux['expert_share'].shape[-1]
  sums = {'moe_loss': aux['loss'].mean() * tokens,
          'moe_load_balance': aux['load_balance'].mean() * tokens,
          'moe_router_z': aux['router_z'].mean() * tokens,
          'moe_dropped': aux['dropped'].mean() * tokens}
  for layer, (share_E, dropped) in enumerate(zip(aux['expert_share'], aux['dropped'])):
    sums[f'moe_max_load_{layer}'] = share_E.max() * E * tokens
    sums[f'moe_dropped_{layer}'] = dropped * tokens
  return sums


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a mode minimises, as sums over a batch's units (target tokens, preference pairs), so
  that micro-batches add up to exactly the full batch.

  sums(params, batch, dropout_rng) -> (summed objective to differentiate, {name: summed metric});
  the objective's gradient and every metric are divided by the global batch's total of
  sums[count]; sums[loss] is what the logs call `loss`. eval_sums(params, batch, token_bytes)
  and report(totals, prefix) do the same for held-out batches.
  """
  sums: Callable
  count: str
  loss: str
  eval_sums: Callable
  report: Callable[[dict, str], dict]
  sequences_per_example: int = 1  # Rows of data.seq_len tokens per batch entry (DPO: 2).


def language_model_objective(graphdef, t: ml_collections.ConfigDict) -> Objective:
  """Next-token cross-entropy over the loss_mask's tokens (pretraining, SFT)."""
  return Objective(
      sums=functools.partial(loss_sums, graphdef=graphdef, z_loss=t.z_loss,
                             label_smoothing=t.label_smoothing),
      count='tokens', loss='nll', eval_sums=functools.partial(eval_step, graphdef=graphdef),
      report=language_model_report)


def mean_report(count: str, loss: str) -> Callable[[dict, str], dict]:
  """A report that divides every summed metric by sums[count] (PREFIX_loss for sums[loss])."""
  def report(totals: dict, prefix: str) -> dict:
    n = max(totals[count], 1.0)
    out = {f'{prefix}_loss': totals[loss] / n}
    out.update({f'{prefix}_{name}': value / n for name, value in totals.items()
                if name not in (count, loss)})
    return out
  return report


def train_step(state: TrainState, batch, *, objective: Objective, optimizer,
               t: ml_collections.ConfigDict, trained: tuple | None = None, epochs: int = 1,
               minibatches: int = 1, prune=None):
  """One step on a global batch: one optimizer update, or epochs x minibatches of them.

  Gradients of the summed objective are accumulated with lax.scan over t.grad_accum_steps
  micro-batches and divided once by the (mini)batch's count (objective.count: its target tokens,
  its pairs), so k micro-batches equal one k-times batch. Only the `trained` parameters
  (trained_paths; None: all) are differentiated and updated: a LoRA step computes no gradient
  for the frozen weights. PPO and GRPO pass over each rollout batch `epochs` times, each time
  in a fresh seeded order cut into `minibatches` updates (config.post.update_epochs,
  config.post.minibatches); their metrics are means over the updates. `prune` (an
  lm.prune.Schedule, config.prune) keeps pruned weights at zero through each update and prunes
  further on its schedule; `sparsity` is then logged.
  """
  trained_params, frozen_params = split_trained(state.params, trained)
  grad_fn = jax.grad(
      lambda trained_params, batch, rng: objective.sums(
          pytree.union(trained_params, frozen_params), batch, rng), has_aux=True)
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def gradients(trained_params, batch, rng):
    if t.grad_accum_steps == 1:
      return grad_fn(trained_params, batch, rng)
    # Micro-batch j takes rows j, j + k, j + 2k, ...: every device holds a share of each one.
    micro_batches = jax.tree.map(
        lambda x: x.reshape(-1, t.grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, micro_batch_and_index):
      micro_batch, index = micro_batch_and_index
      grads, sums = grad_fn(trained_params, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    shapes = jax.eval_shape(grad_fn, trained_params, jax.tree.map(lambda x: x[0], micro_batches),
                            rng)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(
        accumulate, zeros, (micro_batches, jnp.arange(t.grad_accum_steps)))
    return grads, sums

  def update(params_and_opt_state, batch_and_rng):
    trained_params, opt_state = params_and_opt_state
    grads, sums = gradients(trained_params, *batch_and_rng)
    count = jnp.maximum(sums[objective.count], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, opt_state, trained_params)
    metrics = {name: value / count for name, value in sums.items()
               if name not in (objective.count, objective.loss)}
    metrics.update({'loss': sums[objective.loss] / count, 'grad_norm': optax.tree.norm(grads),
                    objective.count: sums[objective.count]})
    updated = optax.apply_updates(trained_params, updates)
    if prune is not None:
      updated, metrics['sparsity'] = prune_lib.keep_pruned(trained_params, updated,
                                                           state.step + 1, prune)
    return (updated, opt_state), metrics

  if epochs * minibatches == 1:
    (trained_params, opt_state), metrics = update((trained_params, state.opt_state),
                                                  (batch, step_rng))
  else:
    rows = jax.tree.leaves(batch)[0].shape[0]
    orders = [jax.random.permutation(jax.random.fold_in(step_rng, epoch), rows)
              for epoch in range(epochs)]
    minibatch_of = lambda x: jnp.concatenate([x[order] for order in orders]).reshape(
        epochs * minibatches, rows // minibatches, *x.shape[1:])
    rngs = jax.random.split(jax.random.fold_in(step_rng, epochs), epochs * minibatches)
    (trained_params, opt_state), metrics = jax.lax.scan(
        update, (trained_params, state.opt_state), (jax.tree.map(minibatch_of, batch), rngs))
    metrics = jax.tree.map(lambda m: m.mean(0), metrics)
    metrics[objective.count] = metrics[objective.count] * minibatches  # The whole batch's.
  metrics['learning_rate'] = learning_rate_schedule(t, epochs * minibatches)(
      state.step * epochs * minibatches)
  new_state = state.replace(step=state.step + 1, params=pytree.union(trained_params, frozen_params),
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch, token_bytes_V, *, graphdef):
  """Summed held-out negative log-likelihood, tokens, and the UTF-8 bytes those tokens encode."""
  _, sums = loss_sums(params, batch, graphdef=graphdef)
  bytes_BT = token_bytes_V[batch['targets']] * batch['loss_mask']
  return {**sums, 'bytes': bytes_BT.sum()}


def language_model_report(totals: dict, prefix: str) -> dict:
  """Loss, perplexity and bits per byte (PREFIX_loss, ...) from eval_step's summed totals."""
  loss = totals['nll'] / max(totals['tokens'], 1.0)
  return {
      f'{prefix}_loss': loss,
      f'{prefix}_perplexity': math.exp(min(loss, 50.0)),
      f'{prefix}_bits_per_byte': totals['nll'] / math.log(2) / max(totals['bytes'], 1.0),
  }


def evaluate(eval_fn, params, batches, token_bytes, prefix: str = 'eval',
             report: Callable[[dict, str], dict] = language_model_report) -> dict:
  """The objective's held-out metrics (PREFIX_loss, ...) over the batches, summed then reported."""
  totals = {}
  for batch in batches:
    sums = jax.device_get(eval_fn(params, batch, token_bytes))
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
  return report(totals, prefix) if totals else {}


def init_state(cfg: model_lib.ModelConfig, optimizer, seed: int, params=None,
               trained: tuple | None = None) -> TrainState:
  """A fresh train state, from `params` if given (config.init_from's; leaves it lacks, such as
  new LoRA adapters, are initialised); pure, so jit with out_shardings creates it sharded.
  Optimizer state exists for the `trained` parameters only (trained_paths; None: all)."""
  fresh = model_lib.init_params(cfg, seed)
  if params is not None:
    fresh = pytree.union(fresh, params)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=fresh,
      opt_state=optimizer.init(split_trained(fresh, trained)[0]),
      rng=jax.random.key_data(jax.random.key(seed)))


def state_shardings(cfg: model_lib.ModelConfig, optimizer, mesh, rules,
                    trained: tuple | None = None) -> TrainState:
  """Where each leaf of the train state lives: parameters by their logical axes (raising
  ShardingError for a split that does not divide), optimizer moments like their parameters,
  and everything else replicated."""
  abstract = jax.eval_shape(functools.partial(init_state, cfg, optimizer, 0, trained=trained))
  params = sharding.tree_shardings(model_lib.logical_axes(cfg), abstract.params, mesh, rules)
  replicated = NamedSharding(mesh, P())
  opt_state = optax.tree_map_params(
      optimizer, lambda _, param_sharding: param_sharding, abstract.opt_state,
      split_trained(params, trained)[0], transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def sharded_train_step(cfg: model_lib.ModelConfig, t: ml_collections.ConfigDict, optimizer,
                       shardings: TrainState, batch_sharding: NamedSharding,
                       trained: tuple | None = None, objective: Objective | None = None,
                       updates: tuple[int, int] = (1, 1), prune=None):
  """train_step jitted for the shardings of state_shardings (donating the state); objective
  defaults to the language model's, updates (epochs, minibatches) to one update per step.

  Call it inside `sharding.active(mesh, rules)` so the model's activation constraints apply when
  it is traced.
  """
  replicated = NamedSharding(batch_sharding.mesh, P())
  objective = objective or language_model_objective(model_lib.graphdef(cfg), t)
  return jax.jit(
      functools.partial(train_step, objective=objective, optimizer=optimizer, t=t,
                        trained=trained, epochs=updates[0], minibatches=updates[1],
                        prune=prune),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
      donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run builds from its config before touching data or parameters (`setup`).

  Training, the memory planner, the benchmarks and every other mode that steps an optimizer
  start here, so a mesh, a model config or a sharding is decided in exactly one place.
  """
  config: ml_collections.ConfigDict  # config.model_from_init applied; validated.
  mesh: jax.sharding.Mesh
  rules: dict
  cfg: model_lib.ModelConfig  # The model, with its compute dtype resolved.
  optimizer: optax.GradientTransformation
  trained: tuple | None  # Paths of the trained parameters (trained_paths); None: all.
  shardings: TrainState  # Where each leaf of the train state lives.
  batch_sharding: NamedSharding  # Of [batch, seq] input arrays.
  objective: Objective  # The mode's loss (language_model_objective, lm.post's).
  step_fn: Callable  # Jitted, donated train_step; call it inside `active()`.

  @property
  def graphdef(self):
    return model_lib.graphdef(self.cfg)

  def abstract_state(self) -> TrainState:
    """The train state as jax.ShapeDtypeStructs carrying their shardings: nothing allocated."""
    return jax.tree.map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
        jax.eval_shape(functools.partial(init_state, self.cfg, self.optimizer,
                                         self.config.train.seed, trained=self.trained)),
        self.shardings)

  def init_state(self, params=None) -> TrainState:
    """A fresh train state created sharded (from `params`, as init_state takes them)."""
    return jax.jit(functools.partial(init_state, self.cfg, self.optimizer,
                                     self.config.train.seed, trained=self.trained),
                   out_shardings=self.shardings, donate_argnums=0)(params)

  def active(self):
    """The context in which the model's activation sharding constraints apply."""
    return sharding.active(self.mesh, self.rules)


def setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """Validates `config` (raising config.ConfigError) and builds its mesh, model, optimizer,
  shardings and jitted step, joining a multi-process job first (config.distributed).

  Raises sharding.ShardingError when the mesh does not divide the model or the batch. `devices`
  (default: all) lets a planner or benchmark build the run on a subset.
  """
  config = config_lib.resolve_model_from_init(config)
  config_lib.validate(config)
  if config.mode == 'distill' and not config.data.tokenizer:  # The teacher's, saved with the run.
    from lm import distill  # pylint: disable=g-import-not-at-top
    config = config.copy_and_resolve_references()
    config.data = distill.data_config(config)
  distributed.initialize(config.distributed)  # Before anything touches a device.
  t = config.train
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.parse_rules(config.mesh.rules)
  cfg = model_lib.ModelConfig.from_config(config, flops.resolve_dtype(config.model.dtype))
  axes = model_lib.logical_axes(cfg)
  updates = updates_per_step(config)
  optimizer = make_optimizer(t, axes, updates[0] * updates[1])
  trained = trained_paths(t, axes)
  shardings = state_shardings(cfg, optimizer, mesh, rules, trained)  # Checks the model fits.
  if updates[1] == 1:
    sharding.check_batch(t.batch_size // t.grad_accum_steps, mesh, rules,
                         'config.train.batch_size / config.train.grad_accum_steps')
  else:
    sharding.check_batch(t.batch_size // updates[1] // t.grad_accum_steps, mesh, rules,
                         'config.train.batch_size / config.post.minibatches / '
                         'config.train.grad_accum_steps')
  batch_sharding = sharding.batch_sharding(mesh, rules)
  objective = mode_objective(config, model_lib.graphdef(cfg))
  if config.qat.bits:
    objective = quantization_aware(
        objective, config.qat, jax.eval_shape(functools.partial(model_lib.init_params, cfg, 0)))
  return Setup(
      config=config, mesh=mesh, rules=rules, cfg=cfg, optimizer=optimizer, trained=trained,
      shardings=shardings, batch_sharding=batch_sharding, objective=objective,
      step_fn=sharded_train_step(cfg, t, optimizer, shardings, batch_sharding, trained,
                                 objective, updates, prune_lib.schedule_from_config(config.prune)))


def quantization_aware(objective: Objective, qat: ml_collections.ConfigDict,
                       abstract_params) -> Objective:
  """objective computed on fake-quantized weights (config.qat; lm.quantize.fake_quantize_params),
  in training and evaluation; ConfigError when a weight's inputs do not divide into groups."""
  from lm import quantize  # pylint: disable=g-import-not-at-top
  quantized = functools.partial(quantize.fake_quantize_params, bits=qat.bits,
                                group_size=qat.group_size, include_embed=qat.include_embed)
  try:
    jax.eval_shape(quantized, abstract_params)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.qat: {e}') from None
  return dataclasses.replace(
      objective,
      sums=lambda params, batch, rng: objective.sums(quantized(params), batch, rng),
      eval_sums=lambda params, batch, token_bytes: objective.eval_sums(
          quantized(params), batch, token_bytes))


# Modes whose batches the policy generates as it trains (lm/post/rollout.py).
RL_MODES = ('ppo', 'grpo')


def updates_per_step(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(epochs, minibatches) of optimizer updates per step: config.post's for the modes that
  learn from their own rollouts (PPO, GRPO), one update otherwise."""
  if config.mode in RL_MODES:
    return config.post.update_epochs, config.post.minibatches
  return 1, 1


def mode_objective(config: ml_collections.ConfigDict, graphdef) -> Objective:
  """config.mode's loss: the language model's for 'train' and 'sft', lm.post's for the others;
  an encoder's (config.model.kind='encoder', mode 'train') is the masked LM's (lm/mlm.py), an
  encoder_decoder's span corruption (lm/span_corruption.py)."""
  if config.model.kind == 'encoder':
    from lm import mlm  # pylint: disable=g-import-not-at-top
    return mlm.objective(graphdef, config)
  if config.model.kind == 'encoder_decoder':
    from lm import span_corruption  # pylint: disable=g-import-not-at-top
    return span_corruption.objective(graphdef, config)
  if config.mode == 'distill':
    from lm import distill  # pylint: disable=g-import-not-at-top
    return distill.objective(graphdef, config)
  if config.mode == 'dpo':
    from lm.post import dpo  # pylint: disable=g-import-not-at-top
    return dpo.objective(graphdef, config.post)
  if config.mode == 'reward':
    from lm.post import reward  # pylint: disable=g-import-not-at-top
    return reward.objective(graphdef)
  if config.mode == 'ppo':
    from lm.post import ppo  # pylint: disable=g-import-not-at-top
    return ppo.objective(graphdef, config.post)
  if config.mode == 'grpo':
    from lm.post import grpo  # pylint: disable=g-import-not-at-top
    return grpo.objective(graphdef, config.post)
  return language_model_objective(graphdef, config.train)


class StepLog:
  """Per-step metrics, fetched lazily: checked for NaN/Inf and averaged over each log window.

  Fetching a step's metrics waits for that step, so the loop checks the previous step while the
  current one runs. Time spent in evaluation and checkpointing is kept out of tokens/s.
  """

  def __init__(self, *, tokens_per_step, flops_per_token, peak_flops, where_to_resume,
               learning_rate):
    self._tokens_per_step = tokens_per_step
    self._flops_per_token = flops_per_token
    self._peak_flops = peak_flops
    self._where_to_resume = where_to_resume
    self._learning_rate = learning_rate
    self._pending = []  # (step, device metrics) not yet fetched.
    self._window = []  # Fetched host metrics of this log window.
    self.restart_window()

  def add(self, step, metrics):
    self._pending.append((step, metrics))

  def check(self, keep_last=False):
    """Fetches queued metrics; raises NonFiniteLossError on the first NaN/Inf loss or grad."""
    checked = self._pending[:-1] if keep_last else self._pending
    self._pending = self._pending[len(checked):]
    for step, metrics in checked:
      metrics = jax.device_get(metrics)
      if not (np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])):
        raise NonFiniteLossError(
            f'loss={float(metrics["loss"])}, grad_norm={float(metrics["grad_norm"])} at step '
            f'{step}; stopping without saving it ({self._where_to_resume()}). Try a lower '
            f'config.train.learning_rate (now {self._learning_rate}) or config.train.grad_clip.')
      self._window.append(metrics)

  def restart_window(self):
    self._window, self._excluded = [], 0.0
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    yield
    self._excluded += time.perf_counter() - start

  def summary(self) -> dict:
    """Window means of the loss, grad norm and the objective's other metrics, the latest
    learning rate, throughput and MFU."""
    self.check()
    if not self._window:
      return {}
    elapsed = time.perf_counter() - self._start - self._excluded
    loss = float(np.mean([m['loss'] for m in self._window]))
    tokens_per_sec = len(self._window) * self._tokens_per_step / elapsed
    out = {name: float(np.mean([m[name] for m in self._window])) for name in self._window[0]
           if name not in ('learning_rate', 'tokens', 'pairs')}
    out.update({
        'loss': loss,
        'perplexity': math.exp(min(loss, 50.0)),
        'grad_norm': float(np.mean([m['grad_norm'] for m in self._window])),
        'learning_rate': float(self._window[-1]['learning_rate']),
        'tokens_per_sec': tokens_per_sec,
        'step_time': elapsed / len(self._window),
        'mfu': (self._flops_per_token * tokens_per_sec / self._peak_flops
                if self._peak_flops else float('nan')),
    })
    self.restart_window()
    return out


def first_step_row(summary: dict) -> dict:
  """The first step's metrics (its loss is the model's at its starting point) without throughput,
  which compilation dominates: its wall time, compilation included, as first_step_seconds."""
  row = {k: v for k, v in summary.items() if k not in ('tokens_per_sec', 'mfu', 'step_time')}
  row['first_step_seconds'] = summary['step_time']
  return row


class _StopRequested:
  """SIGTERM (preemption) sets a flag; the loop then saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def init_from_target(path: str, abstract_params: dict) -> dict:
  """The parameters to take from config.init_from: all of the model's, except LoRA adapters
  (or config.peft's adapters and soft prompt) that checkpoint lacks (a base model's), which start
  fresh (B = 0, adapters' up projections = 0: the base model's outputs),
  and a reward or value head it lacks (a language model's), which starts fresh too."""
  stored = set(pytree.leaf_paths(checkpoint_lib.params_shapes(path)))
  return pytree.subtree(abstract_params, [
      p for p in pytree.leaf_paths(abstract_params)
      if p in stored or not (lora_lib.is_adapter(p[-1]) or peft_lib.is_peft(p[-1])
                             or p[-1] in model_lib.SCALAR_HEADS)])


def _restore_frozen(frozen_dir: str, target: dict) -> dict:
  if not os.path.isdir(os.path.join(frozen_dir, 'params')):
    raise checkpoint_lib.CheckpointError(
        f'{frozen_dir} is missing: the checkpoints of this run hold only the parameters it trains '
        '(config.train.trainable) and the others were saved there when it started')
  return checkpoint_lib.restore_params(frozen_dir, target)


# The fields that shape the learning-rate curve: a resumed run that changes one would bend it
# mid-run, so resuming refuses unless config.train.allow_schedule_change says otherwise.
SCHEDULE_FIELDS = ('steps', 'warmup_steps', 'learning_rate', 'min_lr_ratio')


def _record_config(config: ml_collections.ConfigDict, workdir: str, resumed_step) -> None:
  """Writes workdir/config.json; when resuming, first compares the schedule with the saved one.

  A changed schedule raises ConfigError unless config.train.allow_schedule_change, in which case
  it is logged and the previous config.json is kept as config.step-STEP.json.
  """
  path = os.path.join(workdir, 'config.json')
  if resumed_step is not None and os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f).get('train', {})
    changed = {name: (saved[name], config.train[name]) for name in SCHEDULE_FIELDS
               if name in saved and saved[name] != config.train[name]}
    if changed:
      described = ', '.join(f'config.train.{name} {old!r} -> {new!r}'
                            for name, (old, new) in changed.items())
      if not config.train.allow_schedule_change:
        raise config_lib.ConfigError(
            f'resuming {workdir} at step {resumed_step} with a different learning-rate schedule '
            f'({described}); set config.train.allow_schedule_change=True to continue on the new '
            'schedule, or train in a new --workdir')
      logging.warning('resuming at step %d on a changed schedule: %s', resumed_step, described)
      if jax.process_index() == 0:
        shutil.copyfile(path, os.path.join(workdir, f'config.step-{resumed_step}.json'))
  if jax.process_index() == 0:
    files_lib.write_atomically(path, lambda f: f.write(config.to_json_best_effort(indent=2)))


def make_data(run: Setup, workdir: str) -> data_lib.Data:
  """The mode's data, this process's slice of it: pretraining text (lm.data), or config.post's
  prompt/response examples (mode 'sft', lm.post.data), preference pairs (mode 'reward',
  lm.post.reward; 'dpo', lm.post.dpo, with the reference's log-probabilities) or prompts that
  the policy completes as it trains ('ppo', 'grpo': lm.post.rollout); for 'distill' the text
  with the teacher's targets added to each batch (lm.distill)."""
  config, vocab_size = run.config, run.cfg.vocab_size
  shards = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  if config.mode in ('sft', 'reward', 'dpo') + RL_MODES:
    from lm.post import data as post_data  # pylint: disable=g-import-not-at-top
    from lm.post import dpo, grpo, ppo, reward  # pylint: disable=g-import-not-at-top
    tokenizer = post_data.load_tokenizer(config, vocab_size)
    if config.mode == 'sft':
      return post_data.make_sft_data(config, tokenizer, **shards)
    modes = {'dpo': dpo, 'reward': reward, 'ppo': ppo, 'grpo': grpo}
    return modes[config.mode].make_data(run, tokenizer, **shards)
  t, data_config = config.train, config.data
  if config.model.kind == 'encoder':  # A tokenizer with the [MASK] piece.
    from lm import mlm  # pylint: disable=g-import-not-at-top
    data_config = mlm.data_config(config, workdir)
  elif config.model.kind == 'encoder_decoder':  # A tokenizer with the sentinel pieces.
    from lm import span_corruption  # pylint: disable=g-import-not-at-top
    data_config = span_corruption.data_config(config, workdir)
  elif config.mode == 'distill':  # The teacher's tokenizer, and its targets for each batch.
    from lm import distill  # pylint: disable=g-import-not-at-top
    data = data_lib.make_data(distill.data_config(config), vocab_size=vocab_size,
                              batch_size=t.batch_size, seed=t.seed, workdir=workdir, **shards)
    if config.distill.teacher_cache:  # Precomputed by python -m lm.distill: read, not run.
      return dataclasses.replace(data, train_iter=distill.with_cached_targets(
          data.train_iter, config, data.tokenizer))
    return dataclasses.replace(data, augment=distill.make_augment(run, data.tokenizer))
  return data_lib.make_data(data_config, vocab_size=vocab_size, batch_size=t.batch_size,
                            seed=t.seed, workdir=workdir, **shards)


def train(config: ml_collections.ConfigDict, workdir: str):
  """Trains (resuming from workdir/checkpoints if there is one); returns (state, last metrics)."""
  run = setup(config)
  config, t, cfg = run.config, run.config.train, run.cfg
  os.makedirs(workdir, exist_ok=True)
  directory = os.path.join(workdir, 'checkpoints')
  saved = [int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else [])
           if n.isdigit()]  # Orbax's unfinished saves and moved-aside steps are not digits.
  _record_config(config, workdir, max(saved) if saved else None)
  # The data before the checkpointer: an unreadable corpus then stops the run before any of
  # orbax's threads exist (they would print a traceback at exit).
  data = make_data(run, workdir)
  checkpointer = checkpoint_lib.Checkpointer(directory, keep=t.keep_checkpoints)
  try:  # Until the loop's own try takes over: close the checkpointer on any error.
    abstract_state = run.abstract_state()
    trained = run.trained
    # Parameters the run does not train are saved once, in frozen_dir; checkpoints hold the rest.
    frozen_dir = os.path.join(workdir, checkpoint_lib.FROZEN)
    checkpointed = lambda state: state.replace(params=split_trained(state.params, trained)[0])
    restored = checkpointer.restore_latest(checkpointed(abstract_state))
    if restored is not None:
      state, data_state = restored
      if trained is not None:
        state = state.replace(params=pytree.union(state.params, _restore_frozen(
            frozen_dir, split_trained(abstract_state.params, trained)[1])))
      data.train_iter.set_state(data_state)
      logging.info('resumed from step %d', int(state.step))
    else:
      params = None
      if config.init_from:
        params = checkpoint_lib.restore_params(
            config.init_from, init_from_target(config.init_from, abstract_state.params))
        logging.info('parameters from config.init_from=%s', config.init_from)
      state = run.init_state(params)
      if config.prune.masks:  # A pruned pattern (lm.prune's masks.npz), kept from here on.
        masks = prune_lib.load_masks(config.prune.masks, state.params)
        state = state.replace(params=jax.jit(
            prune_lib.apply_masks, out_shardings=run.shardings.params)(state.params, masks))
        logging.info('weights pruned as config.prune.masks=%s says', config.prune.masks)
      if trained is not None:
        checkpoint_lib.save_params(frozen_dir, split_trained(state.params, trained)[1], force=True)

    num_params = model_lib.count_params(state.params)
    num_trained = model_lib.count_params(split_trained(state.params, trained)[0])
    experts, top_k, _ = flops.moe_shape(cfg)
    share = top_k / experts if experts else 1.0
    matmul, trained_matmul = flops.matmul_param_counts(
        abstract_state.params, trained, cfg.tie_embeddings, active_expert_share=share)
    if cfg.kind == 'encoder_decoder':  # Per raw token of the rows span corruption corrupts.
      from lm import span_corruption  # pylint: disable=g-import-not-at-top
      span = config.span_corruption
      lengths = span_corruption.lengths(config.data.seq_len, span.noise_density,
                                        span.mean_noise_span_length)
      flops_per_token = flops.encoder_decoder_flops_per_token(
          cfg, abstract_state.params, trained, raw_len=config.data.seq_len,
          inputs_len=lengths.inputs, targets_len=lengths.targets, active_expert_share=share)
    else:
      flops_per_token = flops.flops_per_token(cfg, config.data.seq_len, matmul, trained_matmul)
    if config.mode == 'distill' and not config.distill.teacher_cache:  # The teacher runs too.
      from lm import distill  # pylint: disable=g-import-not-at-top
      flops_per_token += distill.teacher_flops_per_token(config)
    peak = flops.peak_flops_per_device(cfg.dtype)
    peak = peak * jax.device_count() if peak else None
    logging.info('model: %s params (%s trained), %.3g FLOPs/token (%s), compute dtype %s, mesh %s',
                 f'{num_params:,}', f'{num_trained:,}', flops_per_token,
                 flops.describe_flops(matmul, trained_matmul), cfg.dtype, dict(run.mesh.shape))

    replicated = NamedSharding(run.mesh, P())
    eval_fn = jax.jit(run.objective.eval_sums,
                      in_shardings=(run.shardings.params, run.batch_sharding, replicated),
                      out_shardings=replicated)
    token_bytes = jax.device_put(data.token_bytes, replicated)

    def global_batch(local_batch):
      """This process's rows of a batch -> one array over all devices."""
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(run.batch_sharding, x), local_batch)
  except BaseException:
    checkpointer.close()
    raise

  writer = metrics_lib.MetricsWriter(workdir)

  step = first_step = int(state.step)
  last_step = min(t.steps, step + t.steps_per_run) if t.steps_per_run else t.steps
  step_log = StepLog(
      tokens_per_step=t.batch_size * config.data.seq_len * run.objective.sequences_per_example,
      flops_per_token=flops_per_token, peak_flops=peak,
      where_to_resume=lambda: (f'the last good checkpoint is step {checkpointer.latest_step()} '
                               f'in {checkpointer.directory}'),
      learning_rate=t.learning_rate)
  last = {}
  # A bar on a terminal; a redirected log (clusters, sweeps) gets one line per log window.
  logs = jax.process_index() == 0  # One process speaks for the job.
  on_terminal = logs and sys.stderr.isatty()
  progress = tqdm(total=t.steps, initial=step, desc='train', unit='step', dynamic_ncols=True,
                  disable=not on_terminal)
  try:
    with _StopRequested() as stop, run.active():
      while step < last_step and not stop.requested:
        local_batch, rollout_metrics = next(data.train_iter), {}
        if data.rollout is not None:  # PPO, GRPO: the policy completes the batch's prompts.
          local_batch, rollout_metrics = data.rollout(state, local_batch)
        batch = global_batch(local_batch)
        if data.augment is not None:  # Distillation: the teacher's targets, on device.
          batch = data.augment(batch)
        state, step_metrics = run.step_fn(state, batch)
        step += 1
        step_log.add(step, {**step_metrics, **rollout_metrics})
        if step == first_step + 1:  # Its metrics on their own row, compilation out of tokens/s.
          last = first_step_row(step_log.summary())
          writer.write(step, last)
        else:  # Check the previous step while this one runs: NaN is caught one step late.
          step_log.check(keep_last=True)
        progress.update(1)

        if step % t.log_every == 0 or step == last_step:
          summary = step_log.summary()  # Empty when the first step was this window's only one.
          if summary:
            last = summary
            writer.write(step, last)
            progress.set_postfix(loss=f'{last["loss"]:.3f}', tok_s=f'{last["tokens_per_sec"]:,.0f}')
            if logs and not on_terminal:
              logging.info('step %d/%d: loss %.4f, %s tokens/s, MFU %.1f%%', step, t.steps,
                           last['loss'], f'{last["tokens_per_sec"]:,.0f}', 100 * last['mfu'])

        if step % t.eval_every == 0 or step == t.steps:
          step_log.check()
          with step_log.paused():
            eval_batches = [global_batch(b) for b in data.eval_batches(t.eval_batches)]
            eval_metrics = evaluate(eval_fn, state.params, eval_batches, token_bytes,
                                    report=run.objective.report)
            if data.evaluate is not None:  # PPO, GRPO: the policy on held-out prompts.
              eval_metrics.update(data.evaluate(state.params))
            for name, batches_of in data.eval_sets.items():  # A mixture's sources, one by one.
              eval_metrics.update(evaluate(
                  eval_fn, state.params, [global_batch(b) for b in batches_of(t.eval_batches)],
                  token_bytes, prefix=f'eval_{name}', report=run.objective.report))
          writer.write(step, eval_metrics)
          last.update(eval_metrics)
          logging.info('step %d: %s', step, json.dumps(eval_metrics))

        if step % t.checkpoint_every == 0 or step == last_step or stop.requested:
          step_log.check()  # Never save a state whose loss was not finite.
          with step_log.paused():
            checkpointer.save(step, checkpointed(state), data.train_iter.get_state())
  finally:
    progress.close()
    checkpointer.close()  # Waits for an async save in flight to complete.
    writer.close()
  return state, last
