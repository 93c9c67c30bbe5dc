"""Per-device memory of a training step, planned from the config alone and checked against XLA.

  python -m lm.memory --config configs/llama_1b.py --num_devices 256 [--device_gb 80]
      [--config.mesh.fsdp=8 --config.mode=dpo ...]

prints what each device holds during one train step of config.mode (parameters, gradients,
AdamW state, activations with and without remat; for DPO also the reference pass before
training) and, with --device_gb, the cheapest mesh and remat setting that fits. `estimate` is
arithmetic on the config and the real parameter shapes: no devices, no compilation and no data
or checkpoints, so a laptop can plan a 256-device run. `xla_bytes` compiles the real sharded
train step for a mesh (without running it) and returns XLA's own figure, which
tests/multidevice/test_memory.py checks the estimate against (within 15%).

The formula, in bytes per device. P is the parameter bytes this device holds, exactly: every
parameter's real shape (jax.eval_shape) split the way lm/sharding.py's rules split it on this
mesh (data, fsdp, tensor, expert). P_g is the same with the batch axes data and fsdp gathered,
i.e. split by tensor, and by expert for an MoE model's expert weights in capacity mode (experts
compute where they live; dropless gathers them to the tokens).

  parameters    P                             param_dtype (fp32: 4 B/param)
  gradients     P                             same dtype and sharding as the parameters
  optimizer     2P                            AdamW mu and nu (fp32: 8 B/param)
  accumulation  P if grad_accum_steps > 1     summed gradients carried across micro-batches
  reduction     P_g of the parameters that    gradients before their all-reduce/reduce-scatter
                a batch axis does not split   (data, fsdp, expert: act_batch's axes; expert
                                              weights split over expert skip that axis)
  weights       W                             weights sliced, cast and gathered for compute
  activations   A                             tensors kept for the backward pass (below)

  train step = parameters + optimizer + accumulation + max(gradients + reduction,
                                                          activations + weights)
  peak = train step, or for DPO max(train step, reference pass) (Modes, below)

When config.train.trainable names only some parameters (LoRA adapters, embeddings), gradients,
optimizer, accumulation and reduction count those parameters' bytes alone: frozen weights get
no gradient and no state (lm/train.py). Activations are planned as for full training: the
backward pass still runs through every block to reach the adapters below. With adapters on all
projections (config.lora.targets='all') that holds; with only some, XLA drops the inputs that
only a frozen weight's gradient would need, and the plan is high (17% for 'q,v' on 8 devices).

Gradients fill up while the backward pass frees activations: activations peak as the backward
pass starts, gradients (with their reduction buffers) as it ends, so the peak holds the larger
of the two rather than their sum. "4 bytes of weights plus 20 more per parameter" is the
unsharded rule of thumb; parameters + gradients + optimizer alone are 16 B/param in fp32.

Activations. b = train.batch_size / grad_accum_steps / (data x fsdp x expert) sequences per
device, T = data.seq_len, c bytes of the compute dtype (model.dtype; 'auto' is planned as
bfloat16, what it resolves to on GPUs and TPUs), D, F, H, K, Q, V, L the model sizes, /t the
split by tensor of heads, kv heads, d_ff and vocab (by the act_* rules); for an MoE model also
E = moe.num_experts and k = moe.top_k:

  block         b·T·c·(6D + 2(H/t + K/t)Q + 5F/t)   residual stream and norm outputs, q, k, v,
                                                    attention output; gate, up and product of
                                                    SwiGLU (gpt2: 9D and 3F: LayerNorm, GELU)
              + b·(H/t)·T²·(4 + c)                  attention scores in fp32 and probabilities
                                                    ('xla', 'einsum', and 'auto' planned as the
                                                    XLA path; cuDNN flash attention on GPUs
                                                    would not keep these). 'blocked': only the
                                                    causal triangle's blocks of scores, plus
                                                    each block's copy of k and v
  moe block     block with its 5F/t replaced by:    (config.model.moe; gpt2's experts 3F/t)
   capacity     b·E·C·c·(2D + 5F/t)                 C slots per expert and row (lm/moe.py's
                                                    capacity()): the dispatched tokens and the
                                                    experts' outputs [E, G, C, D] (E/expert
                                                    experts of b x expert rows: b·E·C slots per
                                                    device), the experts' gate, up and product
              + 2·b·T·E·C·c                         dispatch and combine [G, S, E, C] (cast for
                                                    their einsums)
              + b·T·k·(E + C)·4                     the one-hot choices [G, k, S, E] and slots
              + 2·b·T·E·4                           [G, k, S, C], fp32; router logits and probs
   dropless     A·c·(D + 5F/t) + b·T·k·D·c          A = k·T·(b x data x fsdp x expert): rows
              + 2·b·T·E·4                           sorted by expert and their grouped matmuls'
                                                    outputs; the expert outputs in token order;
                                                    the router. The sort spans the batch, so
                                                    every device sorts the whole micro-batch
  head          b·T·(3D·c + 2·4·V/t)                embedding output, final norm; fp32 logits
                                                    and their softmax
  out_grad      4·V·D/t                             the output projection's gradient: made
                                                    first in the backward pass, kept to the end
  remat off     L·block + head + out_grad           (each block dense or MoE)
  remat on      L·b·T·D·c + max(group, head)        each block keeps only its input; the logits
                + out_grad                          are freed before the first block is
                                                    recomputed, then one group of blocks at a
                                                    time (group: moe.every_n_layers blocks,
                                                    one for a dense model; XLA recomputes a scan
                                                    step's blocks together). An MoE block's
                                                    backward (capacity, expert > 1) adds its
                                                    output gradient gathered over expert,
                                                    expert·b·T·D·c

With scan_layers=True the scan's stacked gradients of all blocks (P of them) are allocated when
the backward pass starts, so they count with the activations; and a scan reduce-scatters each
group's block gradients over fsdp inside the loop, so the reduction term holds one group's.

Weights W: with scan_layers=False every block's weights are sliced out of the stacked
parameters (and gathered over fsdp) and XLA keeps them all for the backward pass; with
scan_layers=True one group's at a time (the scan runs over groups of blocks: one block each in
a dense model, moe.every_n_layers in an MoE one). The output projection adds its gathered copy
when fsdp splits it or the compute dtype differs from param_dtype. All in the compute dtype.

Where the counts come from, and how close they are. The per-block counts (6D, 5F, two T²
tensors) and the other terms are the buffers XLA keeps live at its peak, read from its buffer
assignment (--xla_dump_to; jax 0.10.2, XLA:CPU, fp32), not constants fitted to a total. Against
memory_analysis over 40 fp32 (config, mesh) pairs the plan is 11% low to 9% high: unrolled
layers 4% low to 9% high on 2-8 devices and 4-10% low on one device (XLA keeps a third T²
buffer there); scan_layers=True 1-11% low, because XLA:CPU packs a while loop's temporaries
loosely (it allocates 5-30% more than the live bytes at its own peak, which this plan tracks).
bf16 cannot be checked on CPU: XLA:CPU computes bf16 matmuls and elementwise ops in fp32, ~20%
above this plan. remat=True needs scan_layers=True: with unrolled layers XLA merged the
recomputation back into the forward pass and saved nothing (seen in the optimized HLO schedule
on XLA:CPU), so remat=True with scan_layers=False is planned as remat off, and 'remat on' in
the table and the fit search means remat with scan_layers.

Mixture of Experts. The MoE terms above are the buffers XLA keeps (its buffer assignment; XLA:CPU,
fp32, 8 devices; the experts' F-wide count is the dense MLP's, 5 for llama, 3 for gpt2).
Against memory_analysis, capacity mode with unrolled layers is 1% low to 2% high (expert=4 x
data=2, expert=2 x fsdp=2 x tensor=2, expert=8 with top-1, moe.every_n_layers=2, gpt2 blocks).
With scan_layers=True it is 11-17% low with remat (12% on expert=2 x fsdp=2 x tensor=2 and
with every_n_layers=2, 15-17% with T=256 on expert=4 x data=2, data=4 x expert=2 and data=8)
and 15% low without: lm/model.py's trunk reshapes the stacked blocks into [groups, per group]
for the scan, and XLA then holds up to about two more copies of them inside the loop (dense
models too: the remat cases of tests/multidevice/test_memory.py are 5% and 11% low, 1% and 6%
without the reshape, an 8-layer d_model 256 model 20% low, 5% without; without it these MoE
cases are 7-14% low). Dropless cannot be checked on XLA:CPU with more than one expert: CPU lowers
jax.lax.ragged_dot to one masked dense matmul per expert ([E, A, D] and [E, A, F] buffers),
while GPUs and TPUs run grouped matmuls, which the plan assumes; with one expert the two keep
the same, and the plan is 2% low on data=8. Dropless's gathered expert weights (in W and the
reduction) are not checked: one expert has nothing to split. DPO's reference pass of an MoE
model adds the MoE layer's forward peak (its input, dispatch and combine or the sorted rows, two
F-wide tensors), also not checked against XLA.

Encoder-decoders (model.kind='encoder_decoder'). Span corruption turns a row of T tokens into
inputs of length I and targets of length O (lm.span_corruption.lengths): the decoder's blocks
are planned at O with cross-attention added to each, b·O·c·(2D + 2(H/t)Q) for its norm output,
residual, queries and output, b·2(K/t)·Q·I·c for the encoded input's keys and values, and
b·(H/t)·O·I·(4 + c) for its scores; the encoder's blocks (encoder_layers of them) at I, without
logits. With remat each stack keeps its blocks' inputs. Against memory_analysis (XLA:CPU, fp32,
one device, configs/t5_tiny.py, batch 16 x 128) the plan is 10% low with unrolled layers and 1%
low with remat and scan_layers (tests/test_encoder_decoder.py checks both within 15%).

Distillation (config.mode='distill', lm/distill.py). The teacher's parameters (its
checkpoint's config.json gives the shape; split like the student's) stay on the devices for the
whole run, and each step's batch carries its targets: fp32 [rows, T, V] log-probabilities, or
with distill.top_k = k the k best ids and log-probabilities (8k bytes a token), for the step's
batch_size / (data x fsdp x expert) rows. The KD term adds fp32 [b, T, V/t] tensors kept for
its gradient: 4 with the whole distribution, 3 with top_k (from memory_analysis: XLA:CPU, fp32,
one device, the plan then 1-2% low at d_model 32, 9% low at batch 16, 12% high with remat at
d_model 64). Before each step the teacher's forward pass over those rows runs beside the
student's state (teacher pass = parameters + optimizer + teacher + targets + its gathered
weights + forward activations); total = max(train step, teacher pass). With
distill.teacher_cache the targets come from disk: no teacher on the devices, only its targets.

Modes (config.mode). A batch entry is lm.train's Objective.sequences_per_example rows of T
tokens (1; 2 for a 'dpo' or 'reward' preference pair, chosen and rejected), and b counts rows:
a DPO batch of n pairs has the activations of 2n sequences. 'reward' reads a scalar head off the
final hidden states: no logits, no output projection gradient. DPO's train step holds no
reference weights, only the reference's per-token log-probabilities in the batch (two fp32
[pairs, T] arrays; inputs are not counted). Those come from a reference pass before training
(lm.post.dpo.make_data, run before the train state exists): the reference's P, restored with
the leaves its checkpoint lacks initialised in place (lm.post.dpo.complete_params: at most the
LoRA adapters and scalar heads, A, beside it; no second copy of the model), then forward passes
that keep nothing for a backward pass, each of one side of a micro-batch of pairs (b = the
train step's micro-batch of pairs per device, train.batch_size / grad_accum_steps /
(data x fsdp), so half the train step's rows):

  reference pass  P + max(A, W + max(block_f, head_f))
  block_f         b·T·c·(D + K/t·Q)          the block's input, a copy of k
                + b·(H/t)·T²·(8 + c)         scores and their masked copy (fp32), probabilities
  head_f          b·T·(D·c + 4·V/t)          final norm output, fp32 logits

so the reference pass is never the peak: a train step on twice its rows keeps every block's
activations at (4 + c) bytes per score, and holds the same P and W. Against memory_analysis on
8 CPU devices (xla_bytes, xla_reference_bytes; fp32, 10 DPO configs with and without LoRA, fsdp,
tensor, remat and blocked attention, 8 of them with grad_accum_steps > 1) the DPO train step,
and so the peak, is 14% low to 3% high, the reference pass 11% low to 18% high (high with tensor
and no fsdp, where XLA reads each block's weights in place rather than slicing out copies).

Fit search (--device_gb): every data x fsdp x tensor (x expert, for an MoE model)
factorization of --num_devices whose tensor size divides the heads, kv heads, d_ff and vocab,
whose expert size divides moe.num_experts (and whose data x fsdp x expert divides the
micro-batch), with remat off and on, in this order of preference: remat off before on (no
recompute), then less tensor parallelism (its activations all-reduce every block), then less
fsdp (fsdp gathers weights every step), then less expert and more data (expert moves every MoE
layer's tokens by all-to-all, and splits the experts' weights, gradients and AdamW state). The
first that fits is printed.
--device_gb is in GiB (2^30 bytes) of what the process may use: JAX on a GPU preallocates 75%
of the device's memory unless told otherwise (XLA_PYTHON_CLIENT_MEM_FRACTION).
"""

import dataclasses
import functools
import inspect
import math
import sys
import types

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from lm import attention as attention_lib
from lm import config as config_lib
from lm import lora as lora_lib
from lm import model as model_lib
from lm import moe as moe_lib
from lm import peft as peft_lib
from lm import pytree
from lm import sharding

GIB = 2 ** 30
RULE_OF_THUMB_BYTES_PER_PARAM = 24  # 4 B of fp32 weights + 20 B more to train with AdamW.

# Per block, the tensors XLA keeps for the backward pass in units of [b, T, width] in the
# compute dtype (d_model-wide, d_ff-wide); q, k, v, attention output and the T x T scores come
# on top (see the module docstring).
_KEPT_PER_BLOCK = {'llama': (6, 5), 'gpt2': (9, 3)}
_KEPT_OUTSIDE_BLOCKS = 3  # d_model-wide: embedding output, final norm input and output.
_LOGITS_COPIES = 2  # fp32 [b, T, V]: the logits and their softmax (which becomes the gradient).
# An MoE block's router keeps its fp32 [b, T, E] logits and probabilities.
_ROUTER_COPIES = 2
# Capacity mode: the tokens dispatched to the experts and the experts' outputs, [E, G, C, D].
_DISPATCHED_COPIES = 2


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes per device of one training step on one mesh (see the module docstring)."""
  mesh: tuple  # (data, fsdp, tensor, expert)
  remat: bool  # Whether `activations` are the remat ones (remat=True with scan_layers=True).
  num_params: int
  micro_batch: int  # Sequences (rows) per device per micro-batch: examples x rows_per_example.
  parameters: int
  gradients: int
  optimizer: int
  accumulation: int
  reduction: int
  weights: int
  activations: int
  logits: int  # Part of `activations`.
  mode: str = 'train'  # config.mode planned.
  rows_per_example: int = 1  # Rows of data.seq_len tokens per batch entry (a DPO pair: 2).
  reference_activations: int = 0  # Of DPO's reference pass (forward only); 0: no such pass.
  reference_fresh: int = 0  # DPO: the LoRA adapters and scalar heads the reference may lack.
  experts: int = 0  # config.model.moe.num_experts (0: a dense model).
  # Distillation (lm/distill.py): the teacher's parameters, held for the whole run; its targets
  # in the step's batch; its forward pass's activations and gathered weights, before the step.
  teacher: int = 0
  teacher_targets: int = 0
  teacher_activations: int = 0
  teacher_weights: int = 0

  @property
  def train_step(self) -> int:
    return (self.parameters + self.optimizer + self.accumulation + self.teacher
            + self.teacher_targets
            + max(self.gradients + self.reduction, self.activations + self.weights))

  @property
  def teacher_pass(self) -> int:
    """Distillation's teacher forward pass on a step's batch, beside the student's state."""
    if self.mode != 'distill':
      return 0
    return (self.parameters + self.optimizer + self.accumulation + self.teacher
            + self.teacher_targets + self.teacher_weights + self.teacher_activations)

  @property
  def reference_pass(self) -> int:
    """DPO's reference log-probabilities before training; 0 in the other modes."""
    if self.mode != 'dpo':
      return 0
    return self.parameters + max(self.reference_fresh,
                                 self.weights + self.reference_activations)

  @property
  def total(self) -> int:
    return max(self.train_step, self.reference_pass, self.teacher_pass)


def compute_dtype(model_config) -> str:
  """model.dtype, with 'auto' planned as bfloat16 (what it resolves to on GPUs and TPUs)."""
  return 'bfloat16' if model_config.dtype == 'auto' else model_config.dtype


def model_config(config: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  return model_lib.ModelConfig.from_config(config, compute_dtype(config.model))


@functools.cache
def _parameters(cfg: model_lib.ModelConfig) -> tuple:
  """(dotted name, shape, itemsize, logical axes) of every parameter; abstract, so no memory."""
  shapes = jax.eval_shape(functools.partial(model_lib.init_params, cfg, 0))
  axes = model_lib.logical_axes(cfg)
  flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=pytree.is_axes)[0]
  flat_shapes = jax.tree.leaves(shapes)
  return tuple(
      (pytree.dotted(path), tuple(s.shape), jnp.dtype(s.dtype).itemsize, names)
      for (path, names), s in zip(flat_axes, flat_shapes))


def _mesh_sizes(mesh) -> dict:
  """{mesh axis: size}; axes past the tuple's end (a (data, fsdp, tensor) mesh) have size 1."""
  if len(mesh) > len(sharding.MESH_AXES):
    raise sharding.ShardingError(f'mesh {tuple(mesh)}: at most {len(sharding.MESH_AXES)} sizes, '
                                 f'{" x ".join(sharding.MESH_AXES)}')
  padded = tuple(mesh) + (1,) * (len(sharding.MESH_AXES) - len(mesh))
  return dict(zip(sharding.MESH_AXES, padded))


def _in_blocks(name: str) -> bool:
  """Whether a parameter (dotted name) is in a stack of blocks (lm.model.STACKS)."""
  return name.startswith(tuple(stack + '.' for stack in model_lib.STACKS))


def _split_axes(param, sizes: dict, rules: dict) -> set:
  """The mesh axes (of size > 1) that split a parameter on a mesh of these sizes."""
  name, shape, _, axes = param
  spec = sharding.spec(axes, rules, types.SimpleNamespace(shape=sizes), shape, name)
  return {a for part in spec if part for a in ((part,) if isinstance(part, str) else part)}


def _reduced(params, sizes: dict, compute: dict, rules: dict) -> tuple:
  """The parameters whose gradients are summed over devices: some batch axis (act_batch's, of
  size > 1 in `sizes`) does not split them where they are computed (`compute` sizes)."""
  batch = [a for a in rules['act_batch'] if sizes[a] > 1]
  return tuple(p for p in params if set(batch) - _split_axes(p, compute, rules))


def _shard_bytes(params, sizes: dict, rules: dict) -> int:
  """Bytes of `params` one device holds on a mesh of these sizes (no devices needed).

  Raises sharding.ShardingError naming the parameter whose dimension a split does not divide.
  """
  mesh = types.SimpleNamespace(shape=sizes)
  total = 0
  for name, shape, itemsize, axes in params:
    spec = sharding.spec(axes, rules, mesh, shape, name)
    elements = 1
    for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      parts = () if part is None else (part,) if isinstance(part, str) else part
      elements *= dim // math.prod(sizes[a] for a in parts)
    total += elements * itemsize
  return total


def _ways(logical: str, sizes: dict, rules: dict) -> int:
  return math.prod(sizes[a] for a in rules.get(logical, ()))


def micro_batch_per_device(config: ml_collections.ConfigDict, sizes: dict, rules: dict) -> int:
  """Sequences each device runs per micro-batch; raises ShardingError if they do not divide."""
  t = config.train
  ways = _ways('act_batch', sizes, rules)
  if t.batch_size % t.grad_accum_steps or (t.batch_size // t.grad_accum_steps) % ways:
    splits = ' x '.join(f'{a}={sizes[a]}' for a in rules['act_batch'])
    raise sharding.ShardingError(
        f'config.train.batch_size={t.batch_size} / config.train.grad_accum_steps='
        f'{t.grad_accum_steps} is not divisible by {splits} = {ways}')
  return t.batch_size // t.grad_accum_steps // ways


def _attention_elements(T: int, attention: str) -> tuple[int, int]:
  """(attention scores per head, key/value rows per kv head) kept per sequence.

  T x T scores for the XLA and einsum paths ('auto' is planned as jax.nn.dot_product_attention's
  XLA path). 'blocked' keeps only the causal triangle's blocks of scores, but also each block's
  slice of k and v: for query block [start, stop), keys [0, stop).
  """
  if attention != 'blocked':
    return T * T, 0
  size = inspect.signature(attention_lib.blocked_attention).parameters['block_size'].default
  stops = [min(start + size, T) for start in range(0, T, size)]
  return sum((stop - start) * stop for start, stop in zip(range(0, T, size), stops)), sum(stops)


def _split_sizes(cfg: model_lib.ModelConfig, sizes: dict, rules: dict) -> tuple:
  """(H/t, K/t, F/t, V/t): heads, kv heads, d_ff and vocab as the act_* rules split them."""
  return tuple(n / _ways(logical, sizes, rules) for n, logical in (
      (cfg.num_heads, 'act_heads'), (cfg.num_kv_heads, 'act_kv_heads'), (cfg.d_ff, 'act_mlp'),
      (cfg.vocab_size, 'act_vocab')))


def _sorted_rows(b: int, sizes: dict, rules: dict) -> int:
  """Rows whose tokens a dropless MoE layer sorts together on each device: lm/moe.py's
  dropless_moe sorts the whole micro-batch's assignments (the sort spans the split batch axis,
  so XLA gathers it onto every device), not each device's own b rows."""
  return b * _ways('act_batch', sizes, rules)


def _moe_kept(cfg: model_lib.ModelConfig, b: int, T: int, sizes: dict, rules: dict) -> int:
  """Bytes per device an MoE layer keeps for the backward pass instead of a dense MLP's kept_F
  d_ff-wide tensors (module docstring): capacity or dropless, and the router."""
  c = jnp.dtype(cfg.dtype).itemsize
  D, E, top_k = cfg.d_model, cfg.moe_num_experts, cfg.moe_top_k
  F = _split_sizes(cfg, sizes, rules)[2]
  kept_F = _KEPT_PER_BLOCK[cfg.block][1]
  router = b * T * E * 4 * _ROUTER_COPIES
  if cfg.moe_capacity_factor > 0:
    C = moe_lib.capacity(cfg.moe_capacity_factor, top_k, T, E)
    # [E, G, C, *] per device: E/expert experts of b x expert rows, so b * E * C slots.
    experts = b * E * C * c * (_DISPATCHED_COPIES * D + kept_F * F)
    dispatch_combine = 2 * b * T * E * C * c
    one_hots = b * T * top_k * (E + C) * 4  # chosen [G, k, S, E], slots [G, k, S, C]; fp32.
    return int(experts + dispatch_combine + one_hots + router)
  A = _sorted_rows(b, sizes, rules) * T * top_k  # Assignments, sorted by expert.
  return int(A * c * (D + kept_F * F) + b * T * top_k * D * c + router)


def _moe_forward(cfg: model_lib.ModelConfig, b: int, T: int, sizes: dict, rules: dict) -> int:
  """Bytes per device at an MoE layer's forward peak, keeping nothing for a backward pass: its
  input, the dispatch (capacity) or sorted rows (dropless), and two d_ff-wide tensors."""
  c = jnp.dtype(cfg.dtype).itemsize
  D, E, top_k = cfg.d_model, cfg.moe_num_experts, cfg.moe_top_k
  F = _split_sizes(cfg, sizes, rules)[2]
  if cfg.moe_capacity_factor > 0:
    C = moe_lib.capacity(cfg.moe_capacity_factor, top_k, T, E)
    return int(b * T * D * c + 2 * b * T * E * C * c + b * E * C * c * (D + 2 * F))
  A = _sorted_rows(b, sizes, rules) * T * top_k
  return int(b * T * D * c + A * c * (D + 2 * F))


def _activations(cfg: model_lib.ModelConfig, b: int, T: int, sizes: dict, rules: dict,
                 remat: bool, has_logits: bool = True, cross_rows: int = 0) -> tuple[int, int]:
  """(activation bytes per device, of which logits): the formula in the module docstring.

  has_logits=False: the loss reads the final hidden states (a reward head, an encoder's output),
  so there are no logits and no output projection gradient. cross_rows: the encoded input's
  length S that an encoder_decoder's decoder blocks attend to (0: no cross-attention).
  """
  c = jnp.dtype(cfg.dtype).itemsize
  D, Q, L = cfg.d_model, cfg.head_dim, cfg.num_layers
  H, K, F, V = _split_sizes(cfg, sizes, rules)
  kept_D, kept_F = _KEPT_PER_BLOCK[cfg.block]
  scores, kv_rows = _attention_elements(T, cfg.attention)
  trunk = (b * T * c * (kept_D * D + 2 * (H + K) * Q)  # All but the MLP's kept tensors.
           + b * H * scores * (4 + c) + b * 2 * K * Q * kv_rows * c)
  if cross_rows:  # Norm output, residual, q and output; the input's k and v; [T, S] scores.
    trunk += (b * T * c * (2 * D + 2 * H * Q) + b * 2 * K * Q * cross_rows * c
              + b * H * T * cross_rows * (4 + c))
  groups, dense, moe = cfg.layer_groups
  blocks = [trunk + b * T * c * kept_F * F] * dense  # One group's blocks.
  if moe:
    moe_block = trunk + _moe_kept(cfg, b, T, sizes, rules)
    if remat and cfg.moe_capacity_factor > 0 and sizes['expert'] > 1:
      # Recomputed one group at a time, the peak is inside an MoE block's backward pass, which
      # also holds its output gradient all-gathered over expert ([b x expert, T, D]) to reach
      # the experts of every expert device's rows.
      moe_block += sizes['expert'] * b * T * D * c
    blocks += [moe_block] * moe
  logits = b * T * _LOGITS_COPIES * 4 * V if has_logits else 0
  head = b * T * _KEPT_OUTSIDE_BLOCKS * D * c + logits
  # Kept from first to last.
  output_gradient = jnp.dtype(cfg.param_dtype).itemsize * V * D if has_logits else 0
  if remat:  # The logits are gone before the first group of blocks is recomputed.
    return int(L * b * T * D * c + max(sum(blocks), head) + output_gradient), int(logits)
  return int(groups * sum(blocks) + head + output_gradient), int(logits)


def _forward_activations(cfg: model_lib.ModelConfig, b: int, T: int, sizes: dict,
                         rules: dict) -> int:
  """Bytes per device of a forward pass that keeps nothing for a backward pass (DPO's
  reference log-probabilities): the larger of one block's and the head's (module docstring)."""
  c = jnp.dtype(cfg.dtype).itemsize
  D, Q = cfg.d_model, cfg.head_dim
  H, K, _, V = _split_sizes(cfg, sizes, rules)
  scores, kv_rows = _attention_elements(T, cfg.attention)
  block = (b * T * c * (D + K * Q) + b * H * scores * (8 + c)
           + b * 2 * K * Q * kv_rows * c)
  head = b * T * (D * c + 4 * V)
  moe = _moe_forward(cfg, b, T, sizes, rules) if cfg.moe_num_experts else 0
  return int(max(block, head, moe))


@functools.cache
def _graphdef(cfg: model_lib.ModelConfig):
  return model_lib.graphdef(cfg)


def rows_per_example(config: ml_collections.ConfigDict) -> int:
  """Rows of data.seq_len tokens per batch entry in config.mode: lm.train's
  Objective.sequences_per_example (2 for DPO's and a reward model's preference pairs)."""
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  graphdef = _graphdef(dataclasses.replace(  # Any settings: only the mode's rows matter.
      model_config(config), dtype='float32', remat=False, scan_layers=False))
  return train_lib.mode_objective(config, graphdef).sequences_per_example


def estimate(config: ml_collections.ConfigDict, mesh: tuple | None = None,
             num_devices: int | None = None) -> Estimate:
  """Per-device bytes of a train step of config.mode (and DPO's reference pass) for `config` on
  `mesh` = (data, fsdp, tensor, expert) (a 3-tuple has expert=1).

  mesh defaults to config.mesh resolved for num_devices (default: jax.device_count()).
  Raises sharding.ShardingError when the mesh does not divide the model or the batch.
  """
  if mesh is None:
    mesh = sharding.mesh_shape(config.mesh, num_devices or jax.device_count())
  sizes = _mesh_sizes(tuple(int(s) for s in mesh))
  mesh = tuple(sizes.values())
  rules = sharding.parse_rules(config.mesh.rules)
  cfg = model_config(config)
  # Where weights are computed with: gathered over the batch axes (data, fsdp), still split by
  # tensor, and by expert where the experts compute where they live (capacity mode; dropless
  # gathers every expert to the tokens).
  dropless = bool(cfg.moe_num_experts) and cfg.moe_capacity_factor == 0
  gathered = {**sizes, 'data': 1, 'fsdp': 1, **({'expert': 1} if dropless else {})}
  b = micro_batch_per_device(config, sizes, rules)
  params = _parameters(dataclasses.replace(
      cfg, dtype='float32', remat=False, scan_layers=False, attention='einsum'))
  blocks = [p for p in params if _in_blocks(p[0])]
  output = [p for p in params if p[0] == ('embed' if cfg.tie_embeddings else 'unembed')]
  P = _shard_bytes(params, sizes, rules)
  blocks_gathered = _shard_bytes(blocks, gathered, rules)
  # Gradients, optimizer state and their buffers exist for the trained parameters only
  # (config.train.trainable; e.g. LoRA adapters).
  trained = _trained(params, config, cfg)
  trained_blocks = [p for p in trained if _in_blocks(p[0])]
  P_t = _shard_bytes(trained, sizes, rules)
  T, groups = config.data.seq_len, cfg.layer_groups[0]  # A scan runs over groups of blocks.
  remat = cfg.remat and cfg.scan_layers  # Unrolled, XLA merges the recomputation away.
  rows = rows_per_example(config)  # A preference pair's b entries are 2b sequences.
  if cfg.kind == 'encoder_decoder':  # The encoder on the corrupted inputs, the decoder on targets.
    from lm import span_corruption  # pylint: disable=g-import-not-at-top
    span = config.span_corruption
    lengths = span_corruption.lengths(T, span.noise_density, span.mean_noise_span_length)
    activations, logits = _activations(cfg, b, lengths.targets, sizes, rules, remat,
                                       cross_rows=lengths.inputs)
    encoder = dataclasses.replace(cfg, num_layers=cfg.num_encoder_layers)
    activations += _activations(encoder, b, lengths.inputs, sizes, rules, remat,
                                has_logits=False)[0]
  else:
    activations, logits = _activations(cfg, rows * b, T, sizes, rules, remat,
                                       has_logits=config.mode != 'reward')
  # DPO's reference pass: one side of a micro-batch's pairs at a time, b rows per device; before
  # it, the leaves the reference checkpoint lacks are initialised beside it.
  reference_activations = reference_fresh = 0
  if config.mode == 'dpo':
    reference_activations = _forward_activations(cfg, b, T, sizes, rules)
    reference_fresh = _shard_bytes([p for p in params if _maybe_fresh(p[0])], sizes, rules)

  teacher = _teacher_bytes(config, b, sizes, gathered, rules) if config.mode == 'distill' else {}
  if teacher:  # The KD term's fp32 [b, T, V] tensors: 4 with the whole distribution, 3 top_k.
    kd = (3 if config.distill.top_k else 4) * b * T * _split_sizes(cfg, sizes, rules)[3] * 4
    activations, logits = activations + kd, logits + kd

  # Weights sliced out of the stacked blocks, cast and gathered: all blocks' unrolled, one
  # block's in a scan; and the output projection when it is gathered or cast.
  cast = jnp.dtype(cfg.dtype).itemsize / jnp.dtype(cfg.param_dtype).itemsize
  weights = blocks_gathered / (groups if cfg.scan_layers else 1)
  if cfg.scan_layers and cfg.kind == 'encoder_decoder':  # One group of each stack at a time.
    encoder_blocks = _shard_bytes([p for p in blocks if p[0].startswith('encoder_')], gathered,
                                  rules)
    weights = ((blocks_gathered - encoder_blocks) / groups
               + encoder_blocks / cfg.groups_of(cfg.num_encoder_layers)[0])
  output_gathered = _shard_bytes(output, gathered, rules)
  if output_gathered != _shard_bytes(output, sizes, rules) or cast != 1:
    weights += output_gathered
  weights *= cast

  # Gradients before their cross-device reduction, as computed (gathered): of the parameters
  # that a batch axis does not split (expert weights in capacity mode are split over expert, the
  # rest are not). XLA reduces them all together at the end, except that a scan reduce-scatters
  # each group's block gradients over fsdp inside the loop, and the other batch axes then
  # all-reduce the scattered gradients.
  reduced = _reduced(trained, sizes, gathered, rules)
  reduction = _shard_bytes(reduced, gathered, rules)
  if cfg.scan_layers and sizes['fsdp'] > 1:
    reduced_blocks = _shard_bytes([p for p in reduced if _in_blocks(p[0])], gathered, rules)
    reduction += (reduced_blocks // groups - reduced_blocks + _shard_bytes(
        _reduced(trained, {**sizes, 'fsdp': 1}, gathered, rules), sizes, rules))
  if cfg.scan_layers:  # The scan's stacked block gradients exist from the backward's start.
    activations += _shard_bytes(trained_blocks, sizes, rules)

  return Estimate(
      mesh=mesh, remat=remat, num_params=sum(math.prod(p[1]) for p in params),
      micro_batch=rows * b, parameters=P, gradients=P_t, optimizer=2 * P_t,
      accumulation=P_t if config.train.grad_accum_steps > 1 else 0, reduction=reduction,
      weights=int(weights), activations=activations, logits=logits, mode=config.mode,
      rows_per_example=rows, reference_activations=reference_activations,
      reference_fresh=reference_fresh, experts=cfg.moe_num_experts, **teacher)


def _teacher_bytes(config: ml_collections.ConfigDict, b: int, sizes: dict, gathered: dict,
                   rules: dict) -> dict:
  """Estimate's teacher fields for config.mode='distill': the teacher (its checkpoint's
  config.json) sharded like the student, its targets for the step's batch_size / (data x fsdp x
  expert) rows per device (fp32 [rows, T, V], or top_k ids and log-probabilities), and its
  forward pass over those rows, all its weights gathered and cast (a forward pass keeps none
  for a backward one, but XLA may gather them all up front)."""
  from lm import distill  # pylint: disable=g-import-not-at-top
  rows, T = b * config.train.grad_accum_steps, config.data.seq_len
  k = config.distill.top_k
  if config.distill.teacher_cache:  # Targets read from disk: no teacher on the devices.
    return {'teacher_targets': rows * T * k * 8}
  tcfg = distill.teacher_model_config(config, compute_dtype(config.model))
  params = _parameters(dataclasses.replace(
      tcfg, dtype='float32', remat=False, scan_layers=False, attention='einsum'))
  cast = jnp.dtype(tcfg.dtype).itemsize / jnp.dtype(tcfg.param_dtype).itemsize
  return {'teacher': _shard_bytes(params, sizes, rules),
          'teacher_targets': rows * T * (k * 8 if k else config.model.vocab_size * 4),
          'teacher_activations': _forward_activations(tcfg, rows, T, sizes, rules),
          'teacher_weights': int(_shard_bytes(params, gathered, rules) * cast)}


def _maybe_fresh(name: str) -> bool:
  """Whether a parameter (dotted name) may be missing from a reference or init_from checkpoint
  and start fresh: a LoRA adapter or a scalar head (lm.train.init_from_target)."""
  last = name.split('.')[-1]
  return lora_lib.is_adapter(last) or peft_lib.is_peft(last) or last in model_lib.SCALAR_HEADS


def _trained(params: tuple, config: ml_collections.ConfigDict, cfg) -> tuple:
  """The entries of _parameters that config.train.trainable trains."""
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  paths = train_lib.trained_paths(config.train, model_lib.logical_axes(cfg))
  if paths is None:
    return params
  names = {'.'.join(path) for path in paths}
  return tuple(p for p in params if p[0] in names)


def batch_fields(mode: str) -> dict:
  """{name: dtype} of a training batch's [batch_size, seq_len] arrays in config.mode: rows as
  lm.post.data lays them out; for 'dpo' and 'reward', lm.post.dpo.PairRows' pairs of them
  (chosen_*, rejected_*) with the reference's per-token log-probabilities."""
  from lm.post import data as post_data  # pylint: disable=g-import-not-at-top
  from lm.post import dpo  # pylint: disable=g-import-not-at-top
  rows = {name: jnp.float32 if name == 'loss_mask' else jnp.int32
          for name in post_data.ROW_FIELDS}
  if mode not in ('dpo', 'reward'):
    return rows
  return {f'{side}_{name}': dtype for side in dpo.SIDES
          for name, dtype in {**rows, 'ref_logp': jnp.float32}.items()}


def _xla_setup(config: ml_collections.ConfigDict, devices):
  """lm.train.setup of config as estimate() plans it ('auto' compute dtype as bfloat16)."""
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.model.dtype = compute_dtype(config.model)
  return train_lib.setup(config, devices)


def analysed_bytes(compiled) -> dict:
  """A compiled computation's memory_analysis, and its total (xla_bytes' docstring)."""
  stats = compiled.memory_analysis()
  out = {
      'argument': stats.argument_size_in_bytes, 'output': stats.output_size_in_bytes,
      'alias': stats.alias_size_in_bytes, 'temp': stats.temp_size_in_bytes,
      'generated_code': stats.generated_code_size_in_bytes}
  out['total'] = (out['argument'] + out['output'] - out['alias'] + out['temp']
                  + out['generated_code'])
  return out


def _abstract_batch(fields: dict, rows: int, seq_len: int, where, extra: dict | None = None):
  """[rows, seq_len] arrays of fields' dtypes, and extra's {name: (dtype, trailing shape)}."""
  batch = {name: jax.ShapeDtypeStruct((rows, seq_len), dtype, sharding=where)
           for name, dtype in fields.items()}
  for name, (dtype, trailing) in (extra or {}).items():
    batch[name] = jax.ShapeDtypeStruct((rows, seq_len, *trailing), dtype, sharding=where)
  return batch


def xla_bytes(config: ml_collections.ConfigDict, devices=None) -> dict:
  """XLA's own per-device bytes for the real sharded train step, compiled but never run.

  config must validate as a run's would (lm.train.setup): for DPO, with config.post.data and a
  reference directory named, though neither is read.

  The state and batch are jax.ShapeDtypeStructs with their shardings, so nothing is allocated.
  On XLA:CPU the temporaries live in one preallocated block whose size (temp) the heap
  simulator sets, arguments and outputs in their own buffers, and outputs donated into their
  arguments (the train state) are counted once: total = argument + output - alias + temp
  (+ generated code, 0 on CPU).
  """
  setup = _xla_setup(config, devices)
  extra = None
  if config.mode == 'distill':  # The teacher's targets (lm.distill).
    from lm import distill  # pylint: disable=g-import-not-at-top
    extra = distill.batch_fields(config)
  batch = _abstract_batch(batch_fields(config.mode), config.train.batch_size,
                          config.data.seq_len, setup.batch_sharding, extra)
  with setup.active():
    return analysed_bytes(setup.step_fn.lower(setup.abstract_state(), batch).compile())


def xla_reference_bytes(config: ml_collections.ConfigDict, devices=None) -> dict:
  """XLA's per-device bytes for DPO's reference pass (lm.post.dpo), compiled but never run, as
  xla_bytes does the train step: {'complete': lm.post.dpo.complete_params on a reference that
  lacks every LoRA adapter and scalar head (a base model's checkpoint; the restored leaves are
  its argument), 'forward': one reference_logps pass of reference_batch_size rows, 'total': the
  larger}. config as xla_bytes takes it, with config.mode='dpo'."""
  from lm.post import dpo  # pylint: disable=g-import-not-at-top
  setup = _xla_setup(config, devices)
  params = setup.abstract_state().params
  restored = pytree.subtree(params, [path for path in pytree.leaf_paths(params)
                                     if not _maybe_fresh('.'.join(path))])
  rows = _abstract_batch(batch_fields('sft'), dpo.reference_batch_size(setup.config),
                         config.data.seq_len, setup.batch_sharding)
  with setup.active():
    out = {'complete': analysed_bytes(dpo.complete_params(setup).lower(restored).compile()),
           'forward': analysed_bytes(dpo.reference_logps(setup).lower(params, rows).compile())}
  out['total'] = max(out['complete']['total'], out['forward']['total'])
  return out


def _with_model(config: ml_collections.ConfigDict, **model) -> ml_collections.ConfigDict:
  """An unlocked copy of config with config.model fields replaced."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(model)
  return config


def remat_options(config: ml_collections.ConfigDict) -> dict:
  """{'remat off': config, 'remat on': config} as the table and the fit search compare them.

  'remat on' also sets scan_layers=True: without it XLA saves nothing (module docstring).
  """
  return {'remat off': _with_model(config, remat=False),
          'remat on': _with_model(config, remat=True, scan_layers=True)}


def meshes(num_devices: int, num_experts: int = 0) -> list[tuple[int, int, int, int]]:
  """Every (data, fsdp, tensor, expert) with product num_devices, expert dividing num_experts
  (always 1 for a dense model, num_experts=0), in the fit search's order of preference: less
  tensor parallelism first, then less fsdp, then less expert (more data)."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  experts = [e for e in divisors if num_experts % e == 0] if num_experts else [1]
  return [(num_devices // tensor // fsdp // expert, fsdp, tensor, expert)
          for tensor in divisors for fsdp in divisors for expert in experts
          if num_devices % (tensor * fsdp * expert) == 0]


def search(config: ml_collections.ConfigDict, num_devices: int, device_bytes: float):
  """(first estimate that fits, or None; the smallest estimate of all) over meshes x remat.

  Order of preference: remat off, then less tensor, then less fsdp, then less expert (module
  docstring); expert meshes only for an MoE model.
  Raises sharding.ShardingError when no mesh of num_devices divides the model and batch.
  """
  experts = model_config(config).moe_num_experts
  candidates = []
  for remat_config in remat_options(config).values():
    for mesh in meshes(num_devices, experts):
      try:
        candidates.append(estimate(remat_config, mesh))
      except sharding.ShardingError:
        continue  # The model's heads, d_ff, vocab or experts, or the batch, do not divide it.
  if not candidates:
    axes = ' x '.join(sharding.MESH_AXES if experts else sharding.MESH_AXES[:3])
    m = config.model
    raise sharding.ShardingError(
        f'no {axes} mesh of {num_devices} devices divides this model and batch '
        f'(config.train.batch_size={config.train.batch_size}, config.train.grad_accum_steps='
        f'{config.train.grad_accum_steps}, config.model.num_heads={m.num_heads}, '
        f'num_kv_heads={m.num_kv_heads}, d_ff={m.d_ff}, vocab_size={m.vocab_size}'
        + (f', moe.num_experts={experts}' if experts else '') + ')')
  fitting = [e for e in candidates if e.total <= device_bytes]
  return (fitting[0] if fitting else None), min(candidates, key=lambda e: e.total)


def _gib(n: float) -> str:
  return f'{n / GIB:.2f}'


def _mesh_items(e: Estimate) -> list[tuple[str, int]]:
  """(mesh axis, size) of an estimate's mesh; the expert axis only for an MoE model (or when
  set)."""
  items = list(zip(sharding.MESH_AXES, e.mesh))
  return items if e.experts or e.mesh[3] > 1 else items[:3]


def _describe_mesh(e: Estimate) -> str:
  return ' '.join(f'{a}={s}' for a, s in _mesh_items(e))


def _describe_setting(e: Estimate) -> str:
  return 'remat on (with scan_layers)' if e.remat else 'remat off'


def _describe_mode(config: ml_collections.ConfigDict, e: Estimate) -> str:
  pair = ' (a preference pair: 2 rows per batch entry)' if e.rows_per_example == 2 else ''
  trainable = '' if config.train.trainable == 'all' else f', trains {config.train.trainable}'
  return f'mode {config.mode}{pair}{trainable}'


def _peak_phase(e: Estimate) -> str:
  return 'the reference pass' if e.reference_pass > e.train_step else 'the train step'


def table(config: ml_collections.ConfigDict, num_devices: int, name: str = 'config') -> str:
  """The per-device table for config.mesh on num_devices: remat off and on, side by side."""
  from lm.post import dpo  # pylint: disable=g-import-not-at-top
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  off, on = (estimate(c, mesh) for c in remat_options(config).values())
  rows = [
      ('parameters', 'parameters'),
      ('gradients', 'gradients'),
      ('optimizer state (AdamW mu, nu)', 'optimizer'),
      ('gradient accumulation', 'accumulation'),
      ('gradients before reduction', 'reduction'),
      ('weights cast/gathered for compute', 'weights'),
      ('activations', 'activations'),
      ('  of which logits (fp32)', 'logits'),
  ]
  reference = off.mode == 'dpo'
  if off.mode == 'distill':
    rows += [
        ('teacher parameters', 'teacher'),
        ("teacher's targets (in the batch)", 'teacher_targets'),
        ('train step', 'train_step'),
        ('teacher pass: weights', 'teacher_weights'),
        ('teacher pass: activations', 'teacher_activations'),
        ('teacher pass', 'teacher_pass'),
    ]
  if reference:
    rows += [
        ('train step', 'train_step'),
        ('reference pass: parameters', 'parameters'),
        ('reference pass: activations', 'reference_activations'),
        ('reference pass', 'reference_pass'),
    ]
  dtype = compute_dtype(config.model)
  unit, scale = ('GiB', GIB) if off.total >= GIB else ('MiB', 2 ** 20)  # Tiny models in MiB.
  lines = [
      f'{name}, {_describe_mode(config, off)}: {off.num_params:,} parameters on {num_devices} '
      f'devices as {_describe_mesh(off)}; {off.micro_batch} x {config.data.seq_len} tokens per '
      f'device per micro-batch; compute {dtype}'
      + (" (model.dtype='auto' planned as bfloat16)" if config.model.dtype == 'auto' else ''),
      '',
      f'{unit + " per device":<36}{"remat off":>11}{"remat on":>11}',
  ]
  for label, field in rows:
    lines.append(f'  {label:<34}{getattr(off, field) / scale:>11.2f}'
                 f'{getattr(on, field) / scale:>11.2f}')
  lines.append(f'  {"total (peak)":<34}{off.total / scale:>11.2f}{on.total / scale:>11.2f}')
  lines.append('')
  step = ('parameters + optimizer + accumulation + max(gradients + reduction, activations + '
          'weights)')
  if off.mode == 'distill':
    lines.append(f'total = max(train step, teacher pass); train step = teacher + its targets + '
                 f'{step}; teacher pass = the student\'s state + teacher + its targets + the '
                 "teacher's forward pass on the step's batch, before each step")
  elif reference:
    lines.append(f'total = max(train step, reference pass); train step = {step}')
    lines.append(
        'reference pass = parameters + max(fresh adapters and heads, weights + its activations):'
        ' before training, the reference is restored with the leaves its checkpoint lacks '
        'initialised, then runs forward passes of one side of a micro-batch '
        f'(config.train.batch_size / grad_accum_steps = {dpo.reference_batch_size(config)} '
        'pairs); the train step holds no reference')
  else:
    lines.append(f'total = {step}')
  lines.append("'remat on' is remat=True with scan_layers=True. This config: "
               + ('remat on' if config.model.remat and config.model.scan_layers else 'remat off')
               + '.')
  if config.model.remat and not config.model.scan_layers:
    lines.append('note: config.model.remat=True with scan_layers=False saves no memory (XLA '
                 'merges the recomputation into the forward pass); set '
                 'config.model.scan_layers=True.')
  one = estimate(remat_options(config)['remat off'], (1, 1, 1))
  state = one.parameters + one.gradients + one.optimizer
  lines.append(
      f'rule of thumb, unsharded: {RULE_OF_THUMB_BYTES_PER_PARAM} B/param = '
      f'{_gib(RULE_OF_THUMB_BYTES_PER_PARAM * one.num_params)} GiB; this estimate, unsharded: '
      f'parameters + gradients + AdamW {state / one.num_params:g} B/param = {_gib(state)} GiB, '
      f'total {_gib(one.total)} GiB with activations (remat off)')
  return '\n'.join(lines)


def fit_report(config: ml_collections.ConfigDict, num_devices: int,
               device_gb: float) -> tuple[str, bool]:
  """(what to print, whether anything fits) for the search over meshes and remat."""
  best, smallest = search(config, num_devices, device_gb * GIB)
  if best is None:
    remedy = (' Use more devices, a smaller config.train.batch_size (or more '
              'config.train.grad_accum_steps), or a smaller model.')
    return (f'nothing fits in {device_gb:g} GiB per device on {num_devices} devices: the '
            f'smallest is {_describe_mesh(smallest)}, {_describe_setting(smallest)}, at '
            f'{_gib(smallest.total)} GiB per device, {_gib(smallest.total - device_gb * GIB)} '
            'GiB more than there is.' + remedy), False
  flags_ = ' '.join(f'--config.mesh.{a}={s}' for a, s in _mesh_items(best))
  flags_ += ' --config.model.remat=True --config.model.scan_layers=True' if best.remat else (
      ' --config.model.remat=False')
  peak = f', peak in {_peak_phase(best)}' if best.reference_pass else ''
  return (f'fits in {device_gb:g} GiB per device on {num_devices} devices: '
          f'{_describe_mesh(best)}, {_describe_setting(best)}, {_gib(best.total)} GiB per '
          f'device ({_gib(device_gb * GIB - best.total)} GiB spare{peak})\n  {flags_}'), True


def validate(config: ml_collections.ConfigDict) -> None:
  """config_lib.validate, less what only reading data and checkpoints needs, since a plan reads
  neither: config.post.data may be empty, and config.init_from and DPO's reference need not
  exist (DPO's own checks, beta and the reference, are skipped with them)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.init_from = config.post.reference = ''
  if config.mode in ('sft', 'reward', 'dpo'):
    config.post.data = config.post.data or 'stdlib:function_pairs'  # Never read.
  if config.mode == 'dpo':
    config.mode = 'sft'  # The post-training checks without DPO's.
  config_lib.validate(config)


def define_flags() -> types.SimpleNamespace:
  """The command's flags. Defined when it runs, not on import, so that importing this module
  beside another command's module (tests, notebooks) does not define --config twice."""
  names = types.SimpleNamespace(
      config=config_flags.DEFINE_config_file('config', None,
                                             'Path to a config file (configs/*.py).'),
      device_gb=flags.DEFINE_float(
          'device_gb', None, 'Memory of one device in GiB: print the cheapest mesh and remat '
          'setting that fits.'),
      num_devices=flags.DEFINE_integer(
          'num_devices', None,
          'Devices to plan for (default: jax.device_count()); they need not exist.'))
  flags.mark_flag_as_required('config')
  return names


def main(argv, args: types.SimpleNamespace):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    config = config_lib.resolve_model_from_init(args.config.value)
    validate(config)
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')
  num_devices = args.num_devices.value or jax.device_count()
  failed = False
  try:
    print(table(config, num_devices, config_flags.get_config_filename(flags.FLAGS['config'])))
  except sharding.ShardingError as e:
    print(f'error: {e}', file=sys.stderr)
    failed = True
  if args.device_gb.value is not None:
    try:
      text, fits = fit_report(config, num_devices, args.device_gb.value)
    except sharding.ShardingError as e:
      text, fits = f'error: {e}', False
    print(('\n' if not failed else '') + text)
    failed = failed or not fits
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  app.run(functools.partial(main, args=define_flags()), flags_parser=config_lib.parse_flags)
