"""LoRA (Hu et al., 2021): low-rank adapters on the frozen projections of a trained model.

A targeted projection W (e.g. attention's w_q [D, H, Q]) gets two parameters beside it, w_q_lora_a
[D, r] and w_q_lora_b [r, H, Q] (`add_adapters`), and computes x W + (alpha / r) (x A) B
(lm/model.py's `project` adds `update` to x W). B starts at zero, so a model with fresh adapters
gives exactly the base model's outputs; A starts uniform in +-1/sqrt(fan_in), PEFT's default.
Adapters carry the logical axis 'lora_rank', which config.train.trainable's 'lora' group selects; a
run that trains only them (and perhaps the embeddings) keeps the base weights bit-for-bit, stores
them once (lm/train.py) and checkpoints only what it trains. `merge` folds the adapters into W for
export (lm/convert.py) and generation.

An adapter on a [fan_in, fan_out] projection trains r * (fan_in + fan_out) parameters instead of
fan_in * fan_out: rank 8 on a 512 x 64 projection trains 4,608 instead of 32,768.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

# config.lora.targets names -> (module, parameter) in a block, and the groups naming several.
TARGETS = {
    'q': ('attention', 'w_q'), 'k': ('attention', 'w_k'), 'v': ('attention', 'w_v'),
    'o': ('attention', 'w_o'), 'gate': ('mlp', 'w_gate'), 'up': ('mlp', 'w_up'),
    'down': ('mlp', 'w_down'),
}
GROUPS = {'attention': ('q', 'k', 'v', 'o'), 'mlp': ('gate', 'up', 'down'),
          'all': ('q', 'k', 'v', 'o', 'gate', 'up', 'down')}
# Input axes of each projection: everything before them in the weight's shape is contracted.
INPUT_AXES = {'w_q': 1, 'w_k': 1, 'w_v': 1, 'w_o': 2, 'w_gate': 1, 'w_up': 1, 'w_down': 1}


def lora_targets(text: str, block: str) -> tuple[str, ...]:
  """The weight names (w_q, ...) config.lora.targets names, in TARGETS order; ValueError naming
  anything unknown (or 'gate' for gpt2 blocks, which have no gate)."""
  names, named = set(), set()
  for item in (t.strip() for t in text.split(',')):
    if item in GROUPS:
      names.update(GROUPS[item])
    elif item in TARGETS:
      names.add(item)
      named.add(item)
    else:
      raise ValueError(f'config.lora.targets={text!r}: {item!r} is not one of '
                       f'{tuple(TARGETS)} or the groups {tuple(GROUPS)}')
  if block != 'llama':
    if 'gate' in named:
      raise ValueError(f'config.lora.targets={text!r}: {block} blocks have no gate projection')
    names.discard('gate')
  return tuple(TARGETS[n][1] for n in TARGETS if n in names)


def adapter_shapes(weight_shape: tuple[int, ...], weight_name: str, rank: int):
  """(A shape, B shape) for a weight: A [inputs..., r], B [r, outputs...]."""
  n_in = INPUT_AXES[weight_name]
  return tuple(weight_shape[:n_in]) + (rank,), (rank,) + tuple(weight_shape[n_in:])


def init_a(key, shape, dtype, fan_in: int):
  """PEFT's A init: kaiming_uniform(a=sqrt(5)) on [r, fan_in] is U(-1/sqrt(fan_in), +...)."""
  bound = 1 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def add_adapters(module: nnx.Module, names: tuple[str, ...], rngs: nnx.Rngs) -> None:
  """A and B beside each of the module's weights (among `names`) named in cfg.lora_targets.

  They draw from the 'lora' random stream, so the base weights are the same with or without them.
  """
  cfg = module.cfg
  for name in (n for n in names if n in cfg.lora_targets):
    weight = getattr(module, name)
    axes, fan_in = weight.get_metadata()['logical_axes'], INPUT_AXES[name]
    a_shape, b_shape = adapter_shapes(weight.shape, name, cfg.lora_rank)
    dtype = jnp.dtype(cfg.param_dtype)
    a = init_a(rngs.lora(), a_shape, dtype, math.prod(weight.shape[:fan_in]))
    setattr(module, name + '_lora_a', nnx.Param(a, logical_axes=axes[:fan_in] + ('lora_rank',)))
    setattr(module, name + '_lora_b', nnx.Param(
        jnp.zeros(b_shape, dtype), logical_axes=('lora_rank',) + axes[fan_in:]))


def update(module: nnx.Module, name: str, x, dropout_rng=None):
  """(alpha / r) (x A) B, what the adapter of the module's weight `name` adds to x W; dropout_rng
  (training only) drops the adapter's input. Two 2-D matmuls over x's flattened rows, as
  lm.model.dense computes x W."""
  cfg, dt = module.cfg, module.cfg.dtype
  if dropout_rng is not None and cfg.lora_dropout > 0:
    keep = 1.0 - cfg.lora_dropout
    key = jax.random.fold_in(dropout_rng, list(INPUT_AXES).index(name))
    x = jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, 0).astype(x.dtype)
  a = getattr(module, name + '_lora_a')[...].astype(dt)
  b = getattr(module, name + '_lora_b')[...].astype(dt)
  rows = x.shape[:x.ndim - INPUT_AXES[name]]
  x_NI = x.reshape(math.prod(rows), -1)
  low_rank_NR = jnp.dot(x_NI, a.reshape(x_NI.shape[1], cfg.lora_rank))
  update_NO = jnp.dot(low_rank_NR, b.reshape(cfg.lora_rank, -1))
  return (cfg.lora_alpha / cfg.lora_rank) * update_NO.reshape(*rows, *b.shape[1:])


def is_adapter(name: str) -> bool:
  return name.endswith('_lora_a') or name.endswith('_lora_b')


def adapters_off(params: dict) -> dict:
  """params with every adapter's B zeroed: the base model's outputs, with no copy of its weights
  (a LoRA run's reference model, PPO's and GRPO's KL target)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if path[-1].key.endswith('_lora_b') else x, params)


def merge(params: dict, cfg) -> dict:
  """params with every adapter folded into its weight, W + (alpha / r) A B (computed in fp32,
  stored in W's dtype), and the adapter leaves removed: the plain model's layout. Params without
  adapters come back unchanged. `cfg` is the lm.model.ModelConfig they were trained with."""
  if not cfg.lora_rank:
    return params
  scale = cfg.lora_alpha / cfg.lora_rank
  merged = dict(params)
  # Dense and MoE blocks, the decoder's (or an encoder-only model's) and an encoder's: the stacks
  # of lm.model.STACKS (which imports this module).
  for stack in ('blocks', 'moe_blocks', 'encoder_blocks', 'encoder_moe_blocks'):
    if stack not in params:
      continue
    blocks = {module: dict(leaves) for module, leaves in params[stack].items()}
    for module, leaves in blocks.items():
      for name in [n for n in leaves if n.endswith('_lora_a')]:
        weight_name = name.removesuffix('_lora_a')
        a, b = np.asarray(leaves.pop(name)), np.asarray(leaves.pop(weight_name + '_lora_b'))
        w = leaves[weight_name]
        leaves[weight_name] = (np.asarray(w, np.float32) + scale * delta(a, b)).astype(w.dtype)
    merged[stack] = blocks
  return merged


def delta(a_LIR, b_LRO) -> np.ndarray:
  """A B per layer, in fp32, shaped like the weight: [L, inputs..., outputs...]."""
  a, b = np.asarray(a_LIR, np.float32), np.asarray(b_LRO, np.float32)
  layers, rank = a.shape[0], a.shape[-1]
  out = np.matmul(a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
  return out.reshape(a.shape[:-1] + b.shape[2:])


def trainable_count(weight_shape: tuple[int, ...], weight_name: str, rank: int) -> int:
  """Parameters an adapter of rank r on this weight trains: r * (fan_in + fan_out)."""
  a, b = adapter_shapes(weight_shape, weight_name, rank)
  return math.prod(a) + math.prod(b)
