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
import logging

import jax
import jax.numpy as jnp
import ml_collections

from lm import config as config_lib
from lm import model as model_lib
from lm import sharding
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
