"""Model FLOPs per token, device peak FLOP/s, and the CPU compute dtype: the pieces of MFU.

MFU = (model FLOPs per token x tokens per second) / (peak FLOP/s of the devices). Model FLOPs
follow the PaLM paper (appendix B): 6N + 12·L·H·Q·T per token (4N + 2N_trained + 12·L·H·Q·T
when some weights are frozen: flops_per_token), where N counts every parameter
that takes part in a matmul (all but the input embedding and position tables; the output
projection counts whether or not it is tied to the input embedding) and 12·L·H·Q·T is the
attention score and value matmuls, forward and backward, over a context of T tokens.

On GPUs and TPUs the peak comes from the vendor's dense bf16 figure. On CPUs there is no
reliable figure (machines of one kind differ: AMX vs AVX2), so the peak is measured with a short
jitted matmul loop, the best figure seen is kept on disk, and 'auto' picks whichever of fp32 and
bf16 is faster there.
"""

import functools
import json
import math
import os
import platform
import time

from flax import traverse_util
import jax
import jax.numpy as jnp

from lm import files as files_lib

# Dense bf16 peak FLOP/s per device, matched against jax.Device.device_kind (lowercase prefix).
_ACCELERATOR_PEAK_BF16 = {
    'nvidia h200': 989e12,
    'nvidia h100 pcie': 756e12,
    'nvidia h100': 989e12,
    'nvidia a100': 312e12,
    'nvidia l4': 121e12,
    'nvidia a10g': 125e12,
    'tpu v6 lite': 918e12,
    'tpu v5 lite': 197e12,
    'tpu v5p': 459e12,
    'tpu v5': 459e12,
    'tpu v4': 275e12,
}

_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'lm', 'cpu_matmul_peak.json')


def moe_shape(cfg) -> tuple[int, int, int]:
  """(experts, top_k, MoE layers) of a ModelConfig or config.model; (0, 0, 0) when dense."""
  if hasattr(cfg, 'moe_num_experts'):
    experts, top_k, every = cfg.moe_num_experts, cfg.moe_top_k, cfg.moe_every_n_layers
  else:
    moe = cfg.get('moe')
    if moe is None:
      return 0, 0, 0
    experts, top_k, every = moe.num_experts, moe.top_k, moe.every_n_layers
  return (experts, top_k, cfg.num_layers // every) if experts else (0, 0, 0)


def matmul_params(cfg, active: bool = False) -> int:
  """Parameters that take part in a matmul: N in 6N (excludes embedding/position lookups).

  `cfg` is a lm.model.ModelConfig or the config.model ConfigDict (same field names). An MoE layer
  holds num_experts MLPs and a router [D, E]; active=True counts the top_k experts a token runs
  (N_active, what a token costs) instead of all of them.
  """
  D, F, L = cfg.d_model, cfg.d_ff, cfg.num_layers
  attention = D * _head_dim(cfg) * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = (3 if cfg.block == 'llama' else 2) * D * F
  experts, top_k, moe_layers = moe_shape(cfg)
  moe = (top_k if active else experts) * mlp + D * experts
  total = L * attention + (L - moe_layers) * mlp + moe_layers * moe + D * cfg.vocab_size
  if getattr(cfg, 'kind', 'decoder') == 'encoder_decoder':  # The encoder, and cross-attention.
    encoder = getattr(cfg, 'encoder_layers', 0) or L
    every = cfg.moe_every_n_layers if hasattr(cfg, 'moe_every_n_layers') else (
        cfg.moe.every_n_layers if experts else 1)
    encoder_moe = encoder // every if experts else 0
    total += (L + encoder) * attention + (encoder - encoder_moe) * mlp + encoder_moe * moe
  return total


def flops_per_token(cfg, seq_len: int, matmul: int | None = None,
                    trained_matmul: int | None = None) -> float:
  """Training FLOPs (forward + backward) per token, PaLM appendix B.

  Every weight costs 2 FLOPs per token forward, 2 for the gradient of its input and 2 for its
  own gradient; a frozen weight (LoRA's base, an embeddings-only run) skips the last, so with
  N matmul parameters of which N_trained train it is 4N + 2N_trained (6N when all train).
  `matmul` and `trained_matmul` are matmul_param_counts' (default: matmul_params(cfg,
  active=True), all trained): with MoE, N is the active count (6 N_active); moving tokens to
  their experts is not model FLOPs and is not counted.
  """
  matmul = matmul_params(cfg, active=True) if matmul is None else matmul
  trained_matmul = matmul if trained_matmul is None else trained_matmul
  attention = 12 * cfg.num_layers * cfg.num_heads * _head_dim(cfg) * seq_len
  return 4 * matmul + 2 * trained_matmul + attention


def is_matmul_weight(path: tuple, tie_embeddings: bool) -> bool:
  """Whether the parameter at `path` multiplies activations (counts in N): the w_* projections
  (LoRA's adapters w_*_lora_a/b too) and the output projection; not norms, biases or lookups."""
  name = path[-1]
  return name.startswith('w_') or name == 'unembed' or (name == 'embed' and tie_embeddings)


def matmul_param_counts(params: dict, trained=None, tie_embeddings: bool = False,
                        active_expert_share: float = 1.0) -> tuple:
  """(N, N_trained): matmul parameters of a parameter tree (arrays or shapes), all and those
  among the `trained` paths (lm.train.trained_paths; None: all). The MoE blocks' expert weights
  count times active_expert_share (top_k / num_experts: the active N)."""
  sizes = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    if is_matmul_weight(path, tie_embeddings):
      share = active_expert_share if path[0] in _MOE_STACKS and path[-2] == 'mlp' and \
          path[-1] != 'w_router' else 1.0
      sizes[path] = math.prod(leaf.shape) * share
  total = round(sum(sizes.values()))
  if trained is None:
    return total, total
  trained = set(trained)
  return total, round(sum(size for path, size in sizes.items() if path in trained))


_MOE_STACKS = ('moe_blocks', 'encoder_moe_blocks')  # lm.model.MOE_STACKS (not imported here).


def encoder_decoder_flops_per_token(cfg, params: dict, trained=None, *, raw_len: int,
                                    inputs_len: int, targets_len: int,
                                    active_expert_share: float = 1.0) -> float:
  """Training FLOPs per raw token of an encoder_decoder model on span corruption: each row of
  raw_len tokens becomes inputs_len encoder tokens and targets_len decoder tokens. The encoder's
  weights and the cross-attention's key and value projections run on every input token, the
  rest of the decoder on every target token (4N + 2N_trained each, as flops_per_token), plus
  12·L·H·Q per query-key pair of the encoder's, the decoder's and the cross attention."""
  trained = None if trained is None else set(trained)
  tie = cfg.tie_embeddings
  parts = {'encoder': {}, 'cross_kv': {}, 'decoder': {}}
  for path, leaf in traverse_util.flatten_dict(params).items():
    if path[0].startswith('encoder_'):
      part = 'encoder'
    elif 'cross_attention' in path and path[-1].startswith(('w_k', 'w_v')):
      part = 'cross_kv'
    else:
      part = 'decoder'
    parts[part][path] = leaf

  def weight_flops(part):
    n, n_trained = matmul_param_counts(
        traverse_util.unflatten_dict(parts[part]) if parts[part] else {},
        None if trained is None else [p for p in trained if p in parts[part]], tie,
        active_expert_share)
    return 4 * n + 2 * n_trained

  I, O = inputs_len, targets_len
  HQ = cfg.num_heads * _head_dim(cfg)
  encoder_layers = getattr(cfg, 'encoder_layers', 0) or cfg.num_layers
  attention = 12 * HQ * (encoder_layers * I * I + cfg.num_layers * (O * O + O * I))
  total = (I * (weight_flops('encoder') + weight_flops('cross_kv'))
           + O * weight_flops('decoder') + attention)
  return total / raw_len


def describe_flops(matmul: int, trained_matmul: int) -> str:
  """How flops_per_token counted, for a log line."""
  if trained_matmul == matmul:
    return f'6N + attention, N={matmul:,}'
  return (f'4N + 2N_trained + attention, N={matmul:,}, N_trained={trained_matmul:,}: frozen '
          'weights get no weight gradient')


def _head_dim(cfg) -> int:
  return cfg.d_model // cfg.num_heads  # config.model has no head_dim property.


def _cpu_key() -> str:
  return f'{platform.processor() or platform.machine()}|{os.cpu_count()}|{_cpu_model()}'


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def measure_matmul_flops(dtype: str, n: int = 1024, repeats: int = 16, trials: int = 7) -> float:
  """Best FLOP/s over `trials` runs of a jitted chain of `repeats` n x n matmuls in `dtype`.

  fp32 accumulation, XLA's default threads. Each run takes ~0.2-0.4 s on a 2-core AVX2 CPU, long
  enough to reach steady state; the best run is taken because other processes sharing the cores
  only ever slow a run down (on shared 2-core machines single runs ranged from 78 to 160 GFLOP/s).
  """
  a = jnp.ones((n, n), dtype) * 0.01
  b = jnp.ones((n, n), dtype) * 0.01

  @jax.jit
  def chain(a, b):
    def body(_, x):
      return jnp.dot(x, b, preferred_element_type=jnp.float32).astype(dtype)
    return jax.lax.fori_loop(0, repeats, body, a)

  chain(a, b).block_until_ready()
  best = float('inf')
  for _ in range(trials):
    start = time.perf_counter()
    chain(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 * repeats / best


@functools.cache
def cpu_peak_flops() -> dict:
  """{'float32': flop/s, 'bfloat16': flop/s} of this CPU: the higher of a short fresh
  measurement (~1 s, once per process) and the best one cached on disk for this CPU.

  A measurement can only come out low (other processes sharing the cores slow it down), never
  high, so the best seen is the closest to the peak; keeping only the first would let one taken
  on a busy machine inflate every later MFU.
  """
  key = _cpu_key()
  try:
    with open(_CACHE) as f:
      cached = json.load(f)
  except (OSError, ValueError):
    cached = {}
  fresh = {dtype: measure_matmul_flops(dtype, repeats=8, trials=3)
           for dtype in ('float32', 'bfloat16')}
  best = cached.get(key, {}) if isinstance(cached.get(key), dict) else {}
  peaks = {dtype: max(fresh[dtype], float(best.get(dtype, 0.0))) for dtype in fresh}
  if peaks != best:
    cached[key] = peaks
    try:
      files_lib.write_atomically(_CACHE, lambda f: json.dump(cached, f, indent=1))
    except OSError:
      pass  # A read-only home only costs the higher cached figure next time.
  return peaks


def peak_flops_per_device(dtype: str, device=None) -> float | None:
  """Peak FLOP/s of one device for `dtype`; None for an accelerator missing from the table."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    # One process drives all CPU "devices" with the same cores, so the peak is shared.
    return cpu_peak_flops()[dtype] / jax.local_device_count()
  kind = device.device_kind.lower()
  for prefix, peak in _ACCELERATOR_PEAK_BF16.items():
    if kind.startswith(prefix):
      return peak
  return None


def resolve_dtype(dtype: str) -> str:
  """'auto' -> bfloat16 on accelerators; on CPU whichever of fp32/bf16 matmuls faster here."""
  if dtype != 'auto':
    return dtype
  if jax.devices()[0].platform != 'cpu':
    return 'bfloat16'
  peaks = cpu_peak_flops()
  return 'bfloat16' if peaks['bfloat16'] > 1.1 * peaks['float32'] else 'float32'
