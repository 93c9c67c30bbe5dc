"""Pruning a trained model's weights to zeros: magnitude, N:M (2:4) and Wanda.

  python -m lm.prune --checkpoint DIR --method magnitude|nm|wanda --sparsity S --out DIR2 \\
      [--scope layer|global] [--n 2 --m 4] [--calibration SOURCE --calibration_tokens N] \\
      [--include_embed]

What is pruned: the projection matrices of attention (w_q, w_k, w_v, w_o, and cross-attention's),
of the MLPs (w_up, w_gate, w_down) and of MoE experts (each expert its own matrix). Embeddings and
the unembedding join with include_embed; norms, biases, MoE routers and scalar heads never do.

A weight is a stack of matrices [L, (E,) inputs..., outputs...]: layers, experts, then the axes
its matmul contracts (lm.lora.INPUT_AXES; w_o [H, Q, D] has two), then its outputs. An embedding
table [V, D] is a matrix in its unembedding role, x @ embed.T: inputs D, outputs V (as
lm/quantize.py scales it). Methods, with s the sparsity:
  magnitude  the s smallest |W| go: per matrix (scope='layer'), or below one threshold over all
             prunable matrices together (scope='global'), so layers end up unequally sparse.
  nm         N:M (NVIDIA's 2:4): in every group of m consecutive input-dim weights of one output,
             the n largest |W| stay (s = 1 - n/m). The flattened input size must divide by m.
  wanda      Wanda (Sun et al. 2023): a weight from input j to output i scores |W_ji| * ||X_j||_2,
             X_j being input feature j over the calibration tokens; the s lowest scores go within
             each output i. The norms come from `collect_input_norms`, a forward pass over text
             read like config.data.source and tokenized by the checkpoint's tokenizer: the
             blocks run one at a time while lm.model's `project` (every attention and MLP
             projection) and MoE's experts are wrapped to add up their inputs' squares, so the
             inputs are the model's own and lm/model.py needs no hooks.
             An embedding that is only looked up (untied, pos_embed) has no input activations:
             its norms are ones, which is magnitude within each row.
Each method prunes exactly round(s * size) weights of each group it compares within (a matrix,
an output, or all of them); ties go in index order.

Masks are a params-shaped pytree: a bool array (True: kept) at each pruned leaf, None at every
other leaf, so `apply_masks(params, masks)` (jittable) can enforce them again after any update,
e.g. in training. Arrays of ones would double as masks too, at a byte per weight of every leaf.

The pruned checkpoint OUT loads wherever a checkpoint does (`--config.mode=sample --workdir OUT`,
config.init_from=OUT, lm.eval's checkpoint=OUT). It is a workdir whose one step holds only params:
  checkpoints/0/    the pruned parameters (state holds {'params': ...}; lm.checkpoint reads it)
  config.json       the source's config, init_from and data.tokenizer pointing here, LoRA off
                    (a LoRA run's adapters are merged into their weights before pruning)
  config.py         its get_config() (lm.vocab's), wherever the directory has moved
  tokenizer.model   the source's tokenizer
  masks.npz         the masks: one bool array per pruned leaf, keyed 'blocks/attention/w_q'
                    (`load_masks` rebuilds the pytree)
  prune_report.json what was asked and achieved: sparsity per leaf, per matrix, in total
  hf_config.json    copied when the source was imported from HF (lm/convert.py)
"""

import argparse
from collections.abc import Iterable, Sequence
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lm import lora as lora_lib
from lm import model as model_lib
from lm import pytree

METHODS = ('magnitude', 'nm', 'wanda')
SCOPES = ('layer', 'global')
# The stacks of blocks (a leading layers axis on every leaf) and those holding MoE experts.
STACKS, MOE_STACKS = model_lib.STACKS, model_lib.MOE_STACKS
EMBEDDINGS = ('embed', 'encoder_embed', 'pos_embed')  # [rows, D] tables.
MASKS_FILE = 'masks.npz'
REPORT_FILE = 'prune_report.json'


# ---------------------------------------------------------------------------------------------
# Which leaves are matrices, and how.


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a prunable leaf holds its matrices: `lead` leading axes (layers, experts) of separate
  matrices, then `inputs` contracted axes and the outputs; `transposed` for [rows, D] tables."""
  lead: int
  inputs: int
  transposed: bool = False


def layout(path, include_embed: bool = False) -> Layout | None:
  """The Layout of the leaf at `path` (key tuple or jax key path); None if it is never pruned."""
  keys = pytree.keys(path)
  name = keys[-1]
  if keys[0] in STACKS and name in lora_lib.INPUT_AXES:
    experts = keys[0] in MOE_STACKS and keys[-2] == 'mlp'
    return Layout(lead=2 if experts else 1, inputs=lora_lib.INPUT_AXES[name])
  if include_embed and len(keys) == 1:
    if name in EMBEDDINGS:
      return Layout(lead=0, inputs=1, transposed=True)
    if name == 'unembed':
      return Layout(lead=0, inputs=1)
  return None


def _to_GIO(w, lay: Layout):
  """w as [matrices G, inputs I, outputs O]."""
  w = w.T if lay.transposed else w
  s = w.shape
  return w.reshape(math.prod(s[:lay.lead]), math.prod(s[lay.lead:lay.lead + lay.inputs]), -1)


def _from_GIO(x_GIO, shape, lay: Layout):
  """The inverse of _to_GIO, for a leaf of `shape`."""
  if lay.transposed:
    return x_GIO.reshape(shape[::-1]).T
  return x_GIO.reshape(shape)


def norms_shape(shape, lay: Layout) -> tuple[int, ...]:
  """The shape of a leaf's input norms: its lead and input axes ([L, D] for w_q [L, D, H, Q])."""
  if lay.transposed:
    return tuple(shape[1:])
  return tuple(shape[:lay.lead + lay.inputs])


def _prunable(params, include_embed: bool) -> dict:
  """{key tuple: Layout} of the leaves pruned, in the tree's order."""
  out = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    lay = layout(path, include_embed)
    if lay is not None:
      out[pytree.keys(path)] = lay
  return out


def _where(keys) -> str:
  """params['blocks']['mlp']['w_up'], as lm.checkpoint names a leaf."""
  return 'params' + ''.join(f'[{k!r}]' for k in keys)


def _leaf(tree, keys):
  for key in keys:
    tree = tree[key]
  return tree


def _masks_tree(params, masks_by_path: dict) -> dict:
  """params-shaped: masks_by_path's arrays at their paths, None elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: masks_by_path.get(pytree.keys(path)), params)


# ---------------------------------------------------------------------------------------------
# Dropping the k lowest scores exactly.


def _count(sparsity: float, size: int) -> int:
  """Weights to prune of `size`: round(sparsity * size), halves up."""
  return min(size, math.floor(sparsity * size + 0.5))


def _bits(scores):
  """Non-negative float32 scores as int32 bit patterns, which sort as the floats do (NaN as inf)."""
  scores = scores.astype(jnp.float32)
  scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
  return jax.lax.bitcast_convert_type(scores, jnp.int32)


def _kth_bits(count_at_most, k: int, shape):
  """The smallest t (per group, of `shape`) with count_at_most(t) >= k, by bisection over bit
  patterns (32 halvings of [-1, bits(inf)]): no sort, and no copy beyond the bits."""
  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = count_at_most(mid) >= k
    return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)
  lo = jnp.full(shape, -1, jnp.int32)
  hi = jnp.full(shape, 0x7f800000, jnp.int32)  # inf: count_at_most(hi) is every score.
  return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


@functools.partial(jax.jit, static_argnums=1)
def drop_lowest(scores_GN, k: int):
  """Bool [G, N]: False at exactly the k lowest of each row's N scores (ties: lower index first)."""
  if k == 0:
    return jnp.ones(scores_GN.shape, bool)
  return _drop_lowest(scores_GN, k)


def _drop_lowest(scores_GN, k):
  """drop_lowest for any k, a traced int32 too (k = 0 keeps every score)."""
  bits_GN = _bits(scores_GN)
  t_G1 = _kth_bits(lambda t: jnp.sum(bits_GN <= t[:, None], axis=1), k, bits_GN.shape[:1])[:, None]
  below_GN, tied_GN = bits_GN < t_G1, bits_GN == t_G1
  room_G1 = k - jnp.sum(below_GN, axis=1, keepdims=True)
  return ~(below_GN | (tied_GN & (jnp.cumsum(tied_GN, axis=1) <= room_G1)))


@jax.jit
def _count_at_most(w, t):
  """How many |w| have bits <= t, per index of the first axis (int32 stays exact per matrix)."""
  below = _bits(jnp.abs(w)) <= t
  return jnp.sum(below.reshape(below.shape[0] if below.ndim else 1, -1), axis=1)


@jax.jit
def _keep_global(w, t, room):
  """~(|w| below t, or among the first `room` of w's entries tied at t); and how many are tied."""
  bits = _bits(jnp.abs(w))
  tied = bits == t
  rank = jnp.cumsum(tied.reshape(-1)).reshape(bits.shape)
  return ~((bits < t) | (tied & (rank <= room))), jnp.sum(tied)


def drop_lowest_global(leaves: list, k: int) -> list:
  """Bool masks, one per array of `leaves`: False at exactly the k smallest |w| of them all
  (ties: earlier leaves, then lower indices, first). The bisection runs here, counting on the
  device leaf by leaf and summing on the host, so the counts of a whole model stay exact."""
  if k == 0:
    return [jnp.ones(np.shape(w), bool) for w in leaves]
  count = lambda t: sum(int(np.asarray(_count_at_most(w, t), np.int64).sum()) for w in leaves)
  lo, hi = -1, 0x7f800000  # count(lo) < k <= count(hi): bits(inf) counts every weight.
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if count(mid) >= k else (mid, hi)
  room = k - count(hi - 1)  # hi - 1 < hi: every weight strictly below the threshold.
  keep = []
  for w in leaves:
    kept, tied = _keep_global(w, np.int32(hi), np.int32(min(room, 2**31 - 1)))
    keep.append(kept)
    room = max(room - int(tied), 0)
  return keep


# ---------------------------------------------------------------------------------------------
# Masks.


def _check_sparsity(sparsity: float) -> None:
  if not 0 <= sparsity < 1:
    raise ValueError(f'sparsity={sparsity}: must be in [0, 1) (the share of weights set to 0)')


def magnitude_masks(params, sparsity: float, scope: str = 'layer',
                    include_embed: bool = False) -> dict:
  """Masks dropping the `sparsity` smallest |W| of each matrix (scope='layer': each layer's, each
  expert's) or of all prunable matrices together (scope='global')."""
  _check_sparsity(sparsity)
  if scope not in SCOPES:
    raise ValueError(f'scope={scope!r}: expected one of {SCOPES}')
  prunable = _prunable(params, include_embed)
  leaves = {keys: _leaf(params, keys) for keys in prunable}
  if scope == 'global':
    keep = drop_lowest_global(list(leaves.values()),
                              _count(sparsity, sum(int(np.size(w)) for w in leaves.values())))
    return _masks_tree(params, dict(zip(leaves, keep)))
  masks = {}
  for keys, lay in prunable.items():
    w = leaves[keys]
    w_GIO = _to_GIO(jnp.abs(w), lay)
    G, I, O = w_GIO.shape
    keep_GN = drop_lowest(w_GIO.reshape(G, I * O), _count(sparsity, I * O))
    masks[keys] = _from_GIO(keep_GN.reshape(G, I, O), w.shape, lay)
  return _masks_tree(params, masks)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _nm_keep(scores_GIO, n: int, m: int):
  G, I, O = scores_GIO.shape
  groups = scores_GIO.reshape(G, I // m, m, O)
  order = jnp.argsort(groups, axis=2, stable=True)
  rank = jnp.argsort(order, axis=2, stable=True)  # 0: the smallest |W| of its group.
  return (rank >= m - n).reshape(G, I, O)


def nm_masks(params, n: int = 2, m: int = 4, include_embed: bool = False) -> dict:
  """N:M masks: n of every m consecutive weights along each matrix's (flattened) input axes, for
  each output, are kept (the largest |W|; ties: the higher index stays)."""
  if not 0 < n < m:
    raise ValueError(f'n={n}, m={m}: N:M keeps n of every m weights, so 0 < n < m')
  masks = {}
  for keys, lay in _prunable(params, include_embed).items():
    w = _leaf(params, keys)
    w_GIO = _to_GIO(jnp.abs(w), lay)
    if w_GIO.shape[1] % m:
      raise ValueError(f'm={m}: {_where(keys)} has {w_GIO.shape[1]} inputs per '
                       f'output (shape {tuple(w.shape)}), not a multiple of m')
    masks[keys] = _from_GIO(_nm_keep(w_GIO, n, m), w.shape, lay)
  return _masks_tree(params, masks)


def wanda_masks(params, input_norms, sparsity: float) -> dict:
  """Wanda masks for the leaves input_norms holds (collect_input_norms): within each output i,
  the `sparsity` lowest |W_ji| * ||X_j||_2 go. input_norms' leaves have norms_shape(leaf)."""
  _check_sparsity(sparsity)
  masks = {}
  for keys, norms in leaves_by_path(input_norms).items():
    lay = layout(keys, include_embed=True)
    w = _leaf(params, keys)
    if lay is None:
      raise ValueError(f'input_norms has {_where(keys)}, which is not pruned')
    if tuple(np.shape(norms)) != norms_shape(w.shape, lay):
      raise ValueError(f'input_norms{_where(keys)[6:]} is {tuple(np.shape(norms))}; '
                       f'{_where(keys)} {tuple(w.shape)} needs '
                       f'{norms_shape(w.shape, lay)}')
    w_GIO = _to_GIO(jnp.abs(w).astype(jnp.float32), lay)
    G, I, O = w_GIO.shape
    scores_GOI = (w_GIO * jnp.reshape(norms, (G, I, 1))).transpose(0, 2, 1)
    keep_GOI = drop_lowest(scores_GOI.reshape(G * O, I), _count(sparsity, I)).reshape(G, O, I)
    masks[keys] = _from_GIO(keep_GOI.transpose(0, 2, 1), w.shape, lay)
  return _masks_tree(params, masks)


def leaves_by_path(tree) -> dict:
  """{key tuple: array} of a tree's non-None leaves."""
  return {pytree.keys(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def apply_masks(params, masks):
  """params with every masked-out weight set to 0 (same dtypes); leaves whose mask is None or
  absent come back as they are. Pure and jittable: training can re-apply it after each step."""
  flat = leaves_by_path(masks)
  unknown = set(flat) - set(leaves_by_path(params))
  if unknown:
    raise ValueError(f'masks hold {_where(min(unknown))}, which params lack')

  def mask(path, w):
    keep = flat.get(pytree.keys(path))
    if keep is None:
      return w
    if tuple(keep.shape) != tuple(w.shape):
      raise ValueError(f'the mask of {_where(pytree.keys(path))} is {tuple(keep.shape)}, the '
                       f'weight {tuple(w.shape)}')
    return jnp.where(keep, w, jnp.zeros((), w.dtype))
  return jax.tree_util.tree_map_with_path(mask, params)


def sparsity_report(params, masks) -> dict:
  """Pruned counts and sparsity per masked leaf ('per_matrix': each matrix's, nested over the
  lead axes), over the masked leaves together and over every parameter of the model."""
  leaves, pruned_total, prunable_total = {}, 0, 0
  for keys, keep in leaves_by_path(masks).items():
    keep = np.asarray(keep)
    lay = layout(keys, include_embed=True)
    lead = keep.shape[:lay.lead] if lay and not lay.transposed else ()
    pruned_lead = (~keep).reshape(*lead, -1).sum(-1)
    size = keep.size
    leaves['/'.join(keys)] = dict(
        shape=list(keep.shape), params=size, pruned=int(pruned_lead.sum()),
        sparsity=float(pruned_lead.sum()) / size,
        per_matrix=(pruned_lead / (size // max(math.prod(lead), 1))).round(6).tolist())
    pruned_total += int(pruned_lead.sum())
    prunable_total += size
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  return dict(leaves=leaves, prunable_params=prunable_total, pruned_params=pruned_total,
              sparsity=pruned_total / max(prunable_total, 1), total_params=total,
              unpruned_params=total - pruned_total, model_sparsity=pruned_total / max(total, 1))


def save_masks(path: str, masks) -> None:
  """masks.npz: one bool array per masked leaf, keyed by its '/'-joined path."""
  arrays = {'/'.join(keys): np.asarray(keep, bool) for keys, keep in leaves_by_path(masks).items()}
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


def load_masks(path: str, params) -> dict:
  """The params-shaped masks (None at leaves save_masks did not store) of a masks.npz."""
  with np.load(path) as stored:
    by_path = {tuple(name.split('/')): stored[name] for name in stored.files}
  missing = set(by_path) - set(leaves_by_path(params))
  if missing:
    raise ValueError(f'{path} holds a mask for {_where(min(missing))}, which the '
                     'model lacks')
  return _masks_tree(params, by_path)


# ---------------------------------------------------------------------------------------------
# Pruning while training (config.prune): a gradual schedule, and masks kept through updates.


@dataclasses.dataclass(frozen=True)
class Schedule:
  """config.prune as the train step applies it (schedule_from_config).

  Gradual magnitude pruning (Zhu & Gupta, 2017): from start_step to end_step the target sparsity
  of every prunable matrix rises as s_t = s (1 - (1 - (t - start) / (end - start))^3), fast
  while many weights are redundant, slowly near the end; every `every` steps (and at end_step)
  the smallest |W| of each matrix are pruned to s_t. Between updates, and always once a
  pattern is set (config.prune.masks, applied when the run starts), a weight that is zero
  before an optimizer update is zero after it: the zero pattern is the mask, so it needs no
  state of its own, survives checkpoints and makes resume exact. (A kept weight that an update
  left at exactly 0.0 would stay pruned; with float weights that does not happen in practice.)
  """
  sparsity: float = 0.0  # Final target; 0: no schedule, only the kept pattern.
  start_step: int = 0
  end_step: int = 0
  every: int = 1
  include_embed: bool = False

  def sparsity_at(self, step):
    """The schedule's target after `step` updates (a traced int32 too)."""
    if not self.sparsity:
      return jnp.float32(0.0)
    span = max(self.end_step - self.start_step, 1)
    done = jnp.clip((jnp.asarray(step, jnp.float32) - self.start_step) / span, 0.0, 1.0)
    return jnp.float32(self.sparsity) * (1.0 - (1.0 - done) ** 3)

  def updates_at(self, step):
    """Whether step prunes the matrices further (a traced bool too)."""
    if not self.sparsity:
      return jnp.bool_(False)
    within = (step >= self.start_step) & (step <= self.end_step)
    return within & (((step - self.start_step) % self.every == 0) | (step == self.end_step))


def schedule_from_config(prune_config) -> Schedule | None:
  """config.prune's Schedule; None when the run neither prunes nor keeps a pruned pattern."""
  if not (prune_config.sparsity or prune_config.masks):
    return None
  return Schedule(sparsity=prune_config.sparsity, start_step=prune_config.start_step,
                  end_step=prune_config.end_step, every=prune_config.every,
                  include_embed=prune_config.include_embed)


def keep_pruned(old_params, new_params, step, schedule: Schedule):
  """(new_params with old_params' zeros kept at zero, pruned further when the schedule updates at
  `step`, and the share of prunable weights now zero). Pure and jittable (lm.train's step)."""
  prunable = _prunable(new_params, schedule.include_embed)
  target = schedule.sparsity_at(step)
  pruned = {}
  zeros = total = 0
  for keys, lay in prunable.items():
    old, new = _leaf(old_params, keys), _leaf(new_params, keys)
    new = jnp.where(old != 0, new, jnp.zeros((), new.dtype))

    def prune_further(w, lay=lay):
      w_GIO = _to_GIO(jnp.abs(w), lay)
      G, I, O = w_GIO.shape
      k = jnp.floor(target * (I * O) + 0.5).astype(jnp.int32)
      keep = _from_GIO(_drop_lowest(w_GIO.reshape(G, I * O), k).reshape(G, I, O), w.shape, lay)
      return jnp.where(keep, w, jnp.zeros((), w.dtype))
    new = jax.lax.cond(schedule.updates_at(step), prune_further, lambda w: w, new)
    pruned[keys] = new
    zeros += jnp.sum(new == 0, dtype=jnp.float32)
    total += new.size
  out = jax.tree_util.tree_map_with_path(
      lambda path, w: pruned.get(pytree.keys(path), w), new_params)
  return out, zeros / max(total, 1)


# ---------------------------------------------------------------------------------------------
# Wanda's input norms: a forward pass that sees what each projection reads.


def _sum_squares(x, inputs: int):
  """Sum of x^2 over every axis but the last `inputs` (the features a projection contracts)."""
  return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(x.ndim - inputs)))


class _Recorder:
  """Sums of squares of each projection's input features, keyed by (module, weight name)."""

  def __init__(self):
    self.sums = {}

  def add(self, module, name: str, sums):
    key = (id(module), name)
    self.sums[key] = sums if key not in self.sums else self.sums[key] + sums

  def by_path(self, root: nnx.Module) -> dict:
    """{path under root + (weight name,): sums} for the modules of root."""
    paths = {id(module): tuple(str(k) for k in path) for path, module in nnx.iter_modules(root)}
    return {paths[i] + (name,): sums for (i, name), sums in self.sums.items()}


@contextlib.contextmanager
def _recording(recorder: _Recorder):
  """While a forward pass is traced, lm.model's `project` (which every attention and MLP
  projection goes through) and MoE's experts also add their inputs' squares to `recorder`.
  The model computes what it always does: only what it reads is recorded."""
  project, experts = model_lib.project, model_lib.MoE._experts  # pylint: disable=protected-access

  def recording_project(module, name, x, dropout_rng=None):
    recorder.add(module, name, _sum_squares(x, lora_lib.INPUT_AXES[name]))
    return project(module, name, x, dropout_rng)

  def recording_experts(moe, x, expert_of_row=None, group_sizes_E=None):
    for name, sums_EI in _expert_input_sums(moe, x, expert_of_row, group_sizes_E).items():
      recorder.add(moe, name, sums_EI)
    return experts(moe, x, expert_of_row, group_sizes_E)

  model_lib.project, model_lib.MoE._experts = recording_project, recording_experts
  try:
    yield
  finally:
    model_lib.project, model_lib.MoE._experts = project, experts


def _expert_input_sums(moe, x, expert_of_row, group_sizes_E) -> dict:
  """Per expert, the sums of squares of the inputs of w_up / w_gate (the tokens it was given) and
  of w_down (its hidden units), as lm.model.MoE._experts computes them: x is [E, G, C, D] slots
  (capacity; empty slots are all zero and left out) or [A, D] rows sorted by expert (dropless)."""
  cfg = moe.cfg
  E = cfg.moe_num_experts
  weight = lambda name: getattr(moe, name)[...].astype(cfg.dtype)
  if group_sizes_E is None:
    filled_EGC1 = jnp.any(x != 0, axis=-1, keepdims=True)
    per_expert = lambda h: jnp.sum(jnp.where(filled_EGC1, jnp.square(h.astype(jnp.float32)), 0),
                                   axis=(1, 2))
    matmul = lambda h, w: jnp.einsum('egcd,edf->egcf', h, w)
    bias = lambda name: weight(name)[:, None, None, :]
  else:
    per_expert = lambda h: jax.ops.segment_sum(jnp.square(h.astype(jnp.float32)), expert_of_row,
                                               num_segments=E, indices_are_sorted=True)
    matmul = lambda h, w: jax.lax.ragged_dot(h, w, group_sizes_E)
    bias = lambda name: jnp.take(weight(name), expert_of_row, axis=0)
  up = matmul(x, weight('w_up'))
  if cfg.block == 'llama':
    hidden = jax.nn.silu(matmul(x, weight('w_gate'))) * up
  else:
    hidden = jax.nn.gelu(up + bias('b_up'), approximate=True)
  sums = {'w_up': per_expert(x), 'w_down': per_expert(hidden)}
  if cfg.block == 'llama':
    sums['w_gate'] = sums['w_up']
  return sums


def _input_sums(graphdef, params, tokens_BT, segment_ids_BT, positions_BT,
                include_embed: bool = False) -> dict:
  """Sums of squares of every prunable matrix's input features over one batch: the blocks run
  one at a time in layer order (as Transformer.trunk runs them), each while recorded."""
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  x_BTD = jnp.take(params['embed'], tokens_BT, axis=0)
  if cfg.block == 'gpt2':
    x_BTD = x_BTD + jnp.take(params['pos_embed'], positions_BT, axis=0)
  x_BTD = x_BTD.astype(cfg.dtype)
  groups, dense, moe = cfg.layer_groups
  graphs = {name: nnx.split(getattr(model, name))[0]
            for name, count in (('blocks', dense), ('moe_blocks', moe)) if count}
  per_layer = {name: [] for name in graphs}
  for group in range(groups):
    for j in range(dense + moe):
      name, index = ('blocks', group * dense + j) if j < dense else ('moe_blocks', group)
      block = nnx.merge(graphs[name], jax.tree.map(lambda p, i=index: p[i], params[name]))
      recorder = _Recorder()
      with _recording(recorder):
        x_BTD, _, _ = block(x_BTD, segment_ids_BT, positions_BT)
      per_layer[name].append(recorder.by_path(block))
  sums = {}
  for name, layers in per_layer.items():
    for path in layers[0]:
      sums[(name,) + path] = jnp.stack([layer[path] for layer in layers])
  if include_embed:
    hidden_D = _sum_squares(model.final_norm(x_BTD), 1)
    sums[('unembed',) if 'unembed' in params else ('embed',)] = hidden_D
  return pytree.unflatten(sums)


def collect_input_norms(graphdef, params, batches: Iterable[dict],
                        include_embed: bool = False) -> dict:
  """Wanda's ||X_j||_2 for every input feature j of every prunable matrix, over the tokens of
  `batches` (dicts with inputs, segment_ids, positions: lm.data.make_batch's): a tree of the
  prunable leaves' paths with norms_shape(leaf) arrays. Lookup-only embeddings get ones."""
  cfg = nnx.merge(graphdef, params).cfg
  if getattr(cfg, 'kind', 'decoder') == 'encoder_decoder':
    raise ValueError("Wanda's calibration runs decoder and encoder models; "
                     "config.model.kind='encoder_decoder' is not supported (use magnitude or nm)")
  step = jax.jit(_input_sums, static_argnums=(0, 5))
  sums = None
  for batch in batches:
    batch_sums = step(graphdef, params, batch['inputs'], batch['segment_ids'],
                      batch['positions'], include_embed)
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
  if sums is None:
    raise ValueError('no calibration batches: Wanda needs tokens to measure inputs on')
  norms = jax.tree.map(jnp.sqrt, sums)
  if include_embed:
    flat = leaves_by_path(norms)
    for keys, lay in _prunable(params, include_embed=True).items():
      if keys not in flat:  # A table that is only looked up.
        flat[keys] = jnp.ones(norms_shape(_leaf(params, keys).shape, lay), jnp.float32)
    norms = pytree.unflatten({k: flat[k] for k in _prunable(params, True)})
  return norms


def calibration_batches(source: str, tokenizer, *, tokens: int, seq_len: int,
                        batch_size: int = 8, text_field: str = 'text') -> tuple[list[dict], int]:
  """(batches, tokens in them): the first `tokens` tokens of `source` (a config.data.source
  spelling) framed [BOS] doc [EOS] as training reads them, in rows of seq_len (fewer when the
  source is short), batch_size rows a batch."""
  from lm import data as data_lib  # pylint: disable=g-import-not-at-top
  where = f'--calibration={source!r}'
  stream = []
  for doc in data_lib.iter_documents(source, text_field, where=where):
    stream += [tokenizer.bos_id] + tokenizer.encode(doc) + [tokenizer.eos_id]
    if len(stream) > tokens:
      break
  available = min(len(stream) - 1, tokens)
  if available < 1:
    raise ValueError(f'{where} holds no text to calibrate on')
  seq_len = min(seq_len, available)
  rows = data_lib.rows_of(np.asarray(stream, np.int32), seq_len)
  rows_BxL1 = np.stack([rows[i] for i in range(available // seq_len)])
  batches = [data_lib.make_batch(rows_BxL1[i:i + batch_size], tokenizer.bos_id)
             for i in range(0, len(rows_BxL1), batch_size)]
  return batches, len(rows_BxL1) * seq_len


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def check_arguments(method: str, sparsity: float | None, *, scope: str = 'layer', n: int = 2,
                    m: int = 4, calibration: str | None = None, calibration_tokens: int = 1,
                    calibration_seq_len: int = 0, calibration_batch_size: int = 1,
                    checkpoint: str | None = None) -> float:
  """The sparsity to prune to, once the arguments (spelled as the command's flags) check out;
  ValueError naming the flag otherwise."""
  if method not in METHODS:
    raise ValueError(f'--method={method!r}: expected one of {METHODS}')
  if checkpoint is not None and not os.path.isdir(checkpoint):
    raise ValueError(f'--checkpoint={checkpoint}: no such directory (an lm checkpoint: a '
                     'workdir, one of its steps, or an lm.convert / lm.vocab / lm.prune output)')
  if scope not in SCOPES:
    raise ValueError(f'--scope={scope!r}: expected one of {SCOPES}')
  if method == 'nm':
    if not 0 < n < m:
      raise ValueError(f'--n={n} --m={m}: N:M keeps n of every m weights, so 0 < n < m')
    if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
      raise ValueError(f'--sparsity={sparsity} with --method=nm --n={n} --m={m}: N:M prunes '
                       f'1 - n/m = {1 - n / m:g}; leave --sparsity out or make it agree')
    return 1 - n / m
  if sparsity is None:
    raise ValueError(f'--method={method} needs --sparsity (in [0, 1))')
  if not 0 <= sparsity < 1:
    raise ValueError(f'--sparsity={sparsity}: must be in [0, 1) (the share of weights set to 0)')
  if method == 'wanda':
    if not calibration:
      raise ValueError('--method=wanda needs --calibration (text to measure the inputs on, '
                       "spelled like config.data.source, e.g. 'text:/data/*.txt')")
    for flag, value, least in (('calibration_tokens', calibration_tokens, 1),
                               ('calibration_seq_len', calibration_seq_len, 0),
                               ('calibration_batch_size', calibration_batch_size, 1)):
      if value < least:
        raise ValueError(f'--{flag}={value}: must be >= {least}')
  return sparsity


def prune_checkpoint(checkpoint: str, out: str, method: str, sparsity: float | None = None, *,
                     scope: str = 'layer', n: int = 2, m: int = 4, calibration: str | None = None,
                     calibration_tokens: int = 131_072, calibration_seq_len: int = 0,
                     calibration_batch_size: int = 8, text_field: str = 'text',
                     include_embed: bool = False) -> dict:
  """Writes the pruned checkpoint `out` (see the module docstring) of `checkpoint` (anything
  lm.generate.load_checkpoint reads; LoRA adapters are merged first); returns its summary.

  Raises ValueError naming the flag for bad arguments, FileExistsError when `out` holds anything,
  CheckpointError for a checkpoint that does not restore. `out` appears whole or not at all.
  """
  # pylint: disable=g-import-not-at-top
  from lm import config as config_lib
  from lm import checkpoint as checkpoint_lib
  from lm import files as files_lib
  from lm import generate as generate_lib
  from lm import vocab as vocab_lib
  sparsity = check_arguments(
      method, sparsity, scope=scope, n=n, m=m, calibration=calibration,
      calibration_tokens=calibration_tokens, calibration_seq_len=calibration_seq_len,
      calibration_batch_size=calibration_batch_size, checkpoint=checkpoint)
  out = files_lib.new_directory(out)
  graphdef, params, tokenizer, _ = generate_lib.load_checkpoint(
      checkpoint, dtype='float32', mesh_config=config_lib.base_config().mesh)
  config = config_lib.checkpoint_config(checkpoint)  # The run's own mesh, not the one used here.
  hf_config = config_lib.find_hf_config(checkpoint, config)
  lora_merged = config.lora.rank > 0

  used_tokens = 0
  if method == 'magnitude':
    masks = magnitude_masks(params, sparsity, scope, include_embed)
  elif method == 'nm':
    masks = nm_masks(params, n, m, include_embed)
  else:
    seq_len = min(calibration_seq_len or config.data.seq_len, config.model.max_seq_len)
    batches, used_tokens = calibration_batches(
        calibration, tokenizer, tokens=calibration_tokens, seq_len=seq_len,
        batch_size=calibration_batch_size, text_field=text_field)
    norms = collect_input_norms(graphdef, params, batches, include_embed)
    masks = wanda_masks(params, norms, sparsity)
  pruned = jax.jit(apply_masks)(params, masks)
  report = sparsity_report(pruned, masks)

  if lora_merged:  # The adapters are in the weights now; a run from here trains those.
    config.lora.rank = 0
    if 'lora' in [g.strip() for g in config.train.trainable.split(',')]:
      config.train.trainable = 'all'
  config.init_from = out
  config.data.tokenizer = os.path.join(out, 'tokenizer.model')
  summary = dict(
      checkpoint=os.path.abspath(checkpoint), out=out, method=method, sparsity=sparsity,
      **({'scope': scope} if method == 'magnitude' else {}),
      **({'n': n, 'm': m} if method == 'nm' else {}),
      **({'calibration': calibration, 'calibration_tokens': used_tokens}
         if method == 'wanda' else {}),
      include_embed=include_embed, lora_merged=lora_merged,
      achieved_sparsity=round(report['sparsity'], 6), pruned_params=report['pruned_params'],
      prunable_params=report['prunable_params'], total_params=report['total_params'])

  with files_lib.atomic_directory(out) as directory:
    vocab_lib.write_params_workdir(directory, pruned, tokenizer=tokenizer.path, config=config,
                                   hf_config=hf_config)
    save_masks(os.path.join(directory, MASKS_FILE), masks)
    with open(os.path.join(directory, REPORT_FILE), 'w') as f:
      json.dump(dict(summary, report=report), f, indent=2)
  return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m lm.prune', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='a workdir, one of its steps, or an lm.convert / lm.vocab output')
  parser.add_argument('--method', required=True, choices=METHODS)
  parser.add_argument('--sparsity', type=float,
                      help='share of the prunable weights set to 0, in [0, 1) (nm: 1 - n/m)')
  parser.add_argument('--out', required=True, help='a new (or empty) directory')
  parser.add_argument('--scope', choices=SCOPES, default='layer',
                      help='magnitude: a threshold per matrix, or one over all of them')
  parser.add_argument('--n', type=int, default=2, help='nm: weights kept per group')
  parser.add_argument('--m', type=int, default=4, help='nm: consecutive input weights per group')
  parser.add_argument('--calibration',
                      help="wanda: text to measure inputs on, as config.data.source spells it")
  parser.add_argument('--calibration_tokens', type=int, default=131_072,
                      help='wanda: tokens of --calibration to read')
  parser.add_argument('--calibration_seq_len', type=int, default=0,
                      help="wanda: tokens per row (0: the run's data.seq_len)")
  parser.add_argument('--calibration_batch_size', type=int, default=8,
                      help='wanda: rows per forward pass')
  parser.add_argument('--text_field', default='text', help='jsonl sources: the field to read')
  parser.add_argument('--include_embed', action='store_true',
                      help='prune the embedding tables and the unembedding too')
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  from lm import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  try:
    summary = prune_checkpoint(
        args.checkpoint, args.out, args.method, args.sparsity, scope=args.scope, n=args.n,
        m=args.m, calibration=args.calibration, calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len,
        calibration_batch_size=args.calibration_batch_size, text_field=args.text_field,
        include_embed=args.include_embed)
  except (OSError, ValueError, checkpoint_lib.CheckpointError) as e:  # The user's to fix.
    sys.exit(f'python -m lm.prune: error: {e}')
  width = max(map(len, summary), default=0)
  for key, value in summary.items():
    print(f'{key:<{width}}  {value}')


if __name__ == '__main__':
  main()
