"""Transformers in Flax NNX: Llama-style and GPT-2-style blocks, MHA/GQA/MQA; decoder-only (the
default), encoder-only and encoder-decoder (config.model.kind).

Shape suffixes name each axis: B batch, T query time, S key time, D d_model, H query heads,
K key/value heads, G query heads per kv head (H = K * G), Q head dim, F d_ff, V vocab, L layers.

Every parameter carries `logical_axes` metadata ('vocab', 'embed', 'heads', 'kv_heads',
'head_dim', 'mlp', 'expert', 'layers'); lm/sharding.py maps these names onto mesh axes, so this
file never mentions devices. Parameters are stored in `param_dtype` (fp32); matmuls run in `dtype` (e.g.
bf16); norms, softmax, logits and the loss are computed in fp32.

The blocks' parameters are always stacked along a leading 'layers' axis, so `scan_layers` only
changes how the forward pass iterates (lax.scan or an unrolled loop), never the checkpoint layout.
A Mixture-of-Experts model (config.model.moe, lm/moe.py) keeps its MoE blocks in a second stack,
`moe_blocks`, beside the dense ones: the layers are groups of moe_every_n_layers blocks whose last
is MoE, and the loop (or scan) runs over those groups.

An encoder-decoder (T5's family) adds an encoder stack, `encoder_blocks` (and `encoder_moe_blocks`),
whose blocks attend both ways, and a final `encoder_norm`; each decoder block then has a
cross-attention between its self-attention and its MLP, reading the encoded input. The decoder
keeps the names of a decoder-only model's parameters.
"""

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from lm import attention as attention_lib
from lm import kv_cache
from lm import lora as lora_lib
from lm import moe as moe_lib
from lm import peft as peft_lib
from lm import pytree
from lm import sharding


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyperparameters (config.model, with 'auto' dtype already resolved)."""
  # 'decoder': causal attention, next-token logits. 'encoder': the same blocks attending to their
  # whole document both ways (a masked language model, lm/mlm.py); no KV cache.
  # 'encoder_decoder': an encoder of encoder_layers blocks and a decoder of num_layers blocks
  # with cross-attention (span corruption, lm/span_corruption.py).
  kind: str = 'decoder'
  encoder_layers: int = 0  # 0: num_layers.
  # encoder_decoder: the encoder reads the decoder's embedding table (T5), or one of its own.
  shared_embeddings: bool = True
  decoder_start_id: int = 1  # The decoder's first input token (BOS in lm's tokenizers).
  block: str = 'llama'
  vocab_size: int = 8192
  d_model: int = 512
  num_layers: int = 8
  num_heads: int = 8
  num_kv_heads: int = 8
  d_ff: int = 1408
  max_seq_len: int = 1024
  tie_embeddings: bool = False
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: bool = False
  scan_layers: bool = False
  attention: str = 'auto'
  # LoRA (config.lora, lm/lora.py): adapters on the projections named in lora_targets.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  # Adapters and prompt tuning (config.peft, lm/peft.py): a bottleneck of adapter_dim after every
  # sub-layer; prompt_tokens soft-prompt embeddings before the first block, starting from the
  # embeddings of prompt_ids (empty: drawn like the embeddings).
  adapter_dim: int = 0
  prompt_tokens: int = 0
  prompt_ids: tuple[int, ...] = ()
  # A scalar reward head on the last token's final hidden state (mode='reward', lm/post/reward.py).
  reward_head: bool = False
  # A scalar value head on every token's final hidden state, sharing the trunk (mode='ppo').
  value_head: bool = False
  # Mixture of Experts (config.model.moe, lm/moe.py): 0 experts is a dense model.
  moe_num_experts: int = 0
  moe_top_k: int = 2
  moe_capacity_factor: float = 1.25
  moe_every_n_layers: int = 1
  moe_load_balance_loss: float = 0.01
  moe_router_z_loss: float = 0.001

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, dtype: str | None = None):
    """From a run config: config.model's fields, and config.lora's when it has that section."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.model.items() if k in fields}
    moe = config.model.get('moe')
    if moe is not None and moe.num_experts > 0:
      values.update(moe_num_experts=moe.num_experts, moe_top_k=moe.top_k,
                    moe_capacity_factor=moe.capacity_factor,
                    moe_every_n_layers=moe.every_n_layers,
                    moe_load_balance_loss=moe.load_balance_loss,
                    moe_router_z_loss=moe.router_z_loss)
    if dtype is not None:
      values['dtype'] = dtype
    if values.get('dtype') == 'auto':
      raise ValueError('resolve model.dtype="auto" (lm.flops.resolve_dtype) before building')
    lora = config.get('lora')
    if lora is not None and lora.rank > 0:
      values.update(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    lora_targets=lora_lib.lora_targets(lora.targets, config.model.block))
    peft = config.get('peft')
    if peft is not None and peft.kind == 'adapter':
      values.update(adapter_dim=peft.adapter_dim)
    if peft is not None and peft.kind == 'prompt':
      values.update(prompt_tokens=peft.prompt_tokens)
      if peft.prompt_init == 'vocab':
        values.update(prompt_ids=peft_lib.prompt_ids(
            config.model.vocab_size, peft.prompt_tokens, peft.prompt_seed))
    return cls(**values)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def layer_groups(self) -> tuple[int, int, int]:
    """(groups, dense blocks per group, MoE blocks per group): the layers repeat a group of
    moe_every_n_layers blocks whose last one is MoE (a dense model: L groups of one dense block)."""
    return self.groups_of(self.num_layers)

  @property
  def num_encoder_layers(self) -> int:
    """The encoder's blocks (an encoder_decoder model; 0 for the other kinds)."""
    return (self.encoder_layers or self.num_layers) if self.kind == 'encoder_decoder' else 0

  def groups_of(self, num_layers: int) -> tuple[int, int, int]:
    """layer_groups of a stack of num_layers blocks (the decoder's, or the encoder's)."""
    if not self.moe_num_experts:
      return num_layers, 1, 0
    n = self.moe_every_n_layers
    return num_layers // n, n - 1, 1

  def is_moe_layer(self, layer: int) -> bool:
    return bool(self.moe_num_experts) and layer % self.moe_every_n_layers == \
        self.moe_every_n_layers - 1


# The stacks of blocks (every leaf with a leading 'layers' axis): the decoder's (or an encoder-only
# model's) dense and MoE blocks, and an encoder_decoder model's encoder blocks.
STACKS = ('blocks', 'moe_blocks', 'encoder_blocks', 'encoder_moe_blocks')
MOE_STACKS = ('moe_blocks', 'encoder_moe_blocks')


def _param(rngs, shape, axes, cfg: ModelConfig, std=None, init=None) -> nnx.Param:
  """A parameter with logical axis names; normal(std) init unless `init` is given."""
  dtype = jnp.dtype(cfg.param_dtype)
  if init is None:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  else:
    value = init(shape, dtype)
  return nnx.Param(value, logical_axes=axes)


def project(module: nnx.Module, name: str, x, dropout_rng=None):
  """x times the module's weight `name` (dense over its input axes), plus its LoRA update
  (lm/lora.py) when the weight has an adapter; dropout_rng (training only) is LoRA's dropout."""
  out = dense(x, getattr(module, name)[...].astype(module.cfg.dtype), lora_lib.INPUT_AXES[name])
  if name in module.cfg.lora_targets:
    out = out + lora_lib.update(module, name, x, dropout_rng)
  return out


def dense(x, w, axes: int = 1, preferred_element_type=None):
  """Contracts x's last `axes` axes with w's first `axes` axes, e.g. 'btd,dhq->bthq'.

  Computed as one 2-D matmul over flattened rows: XLA:CPU turns a 3-D einsum's weight gradient
  (contracting b and t) into a transposing copy and a slow dot, while a 2-D matmul's backward is
  two plain matmuls; elsewhere the reshapes are free (bench/train_throughput.py times the step).
  """
  rows, out_shape = x.shape[:-axes], w.shape[axes:]
  x_NI = x.reshape(math.prod(rows), -1)
  w_IO = w.reshape(x_NI.shape[1], -1)
  out_NO = jnp.dot(x_NI, w_IO, preferred_element_type=preferred_element_type)
  return out_NO.reshape(*rows, *out_shape)


class Norm(nnx.Module):
  """RMSNorm (llama) or LayerNorm (gpt2), computed in fp32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.scale = _param(rngs, (cfg.d_model,), ('embed',), cfg, init=jnp.ones)
    if cfg.block == 'gpt2':
      self.bias = _param(rngs, (cfg.d_model,), ('embed',), cfg, init=jnp.zeros)

  def __call__(self, x_BTD):
    x = x_BTD.astype(jnp.float32)
    if self.cfg.block == 'gpt2':
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.cfg.norm_eps)
    x = x * self.scale[...][None, None, :]
    if self.cfg.block == 'gpt2':
      x = x + self.bias[...][None, None, :]
    return x.astype(self.cfg.dtype)


def rotary(x_BTNQ, positions_BT, theta: float):
  """Rotary position embedding, in the rotate-half layout used by Llama checkpoints.

  With x = [x1, x2] (halves of the head dim): [x1 cos - x2 sin, x2 cos + x1 sin]. Written as
  x * [cos, cos] + swap(x) * [-sin, sin] on a [..., 2, half] view, which XLA fuses into one
  elementwise pass, forward and backward (split + concatenate is slower on CPU).
  """
  half = x_BTNQ.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq[None, None, :]
  sin_BTF, cos_BTF = jnp.sin(angle_BTF), jnp.cos(angle_BTF)
  cos_BT12F = jnp.stack([cos_BTF, cos_BTF], axis=-2)[:, :, None]
  sin_BT12F = jnp.stack([-sin_BTF, sin_BTF], axis=-2)[:, :, None]
  x_BTN2F = x_BTNQ.astype(jnp.float32).reshape(*x_BTNQ.shape[:-1], 2, half)
  out_BTN2F = x_BTN2F * cos_BT12F + x_BTN2F[..., ::-1, :] * sin_BT12F
  return out_BTN2F.reshape(x_BTNQ.shape).astype(x_BTNQ.dtype)


def _attention_weights(module, cfg, rngs):
  """Gives an attention module its query/key/value/output projections (and GPT-2's biases)."""
  D, H, K, Q = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
  module.w_q = _param(rngs, (D, H, Q), ('embed', 'heads', 'head_dim'), cfg, std)
  module.w_k = _param(rngs, (D, K, Q), ('embed', 'kv_heads', 'head_dim'), cfg, std)
  module.w_v = _param(rngs, (D, K, Q), ('embed', 'kv_heads', 'head_dim'), cfg, std)
  module.w_o = _param(rngs, (H, Q, D), ('heads', 'head_dim', 'embed'), cfg, out_std)
  if cfg.block == 'gpt2':
    module.b_q = _param(rngs, (H, Q), ('heads', 'head_dim'), cfg, init=jnp.zeros)
    module.b_k = _param(rngs, (K, Q), ('kv_heads', 'head_dim'), cfg, init=jnp.zeros)
    module.b_v = _param(rngs, (K, Q), ('kv_heads', 'head_dim'), cfg, init=jnp.zeros)
    module.b_o = _param(rngs, (D,), ('embed',), cfg, init=jnp.zeros)
  lora_lib.add_adapters(module, ('w_q', 'w_k', 'w_v', 'w_o'), rngs)


class Attention(nnx.Module):
  """Self-attention with K <= H key/value heads (MHA: K = H, GQA: 1 < K < H, MQA: K = 1): causal
  in a decoder, both ways within each document in an encoder (causal=False)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, causal: bool = True):
    self.cfg = cfg
    self.causal = causal
    _attention_weights(self, cfg, rngs)

  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache=None, dropout_rng=None):
    """Returns (out_BTD, cache). With a KV cache (decoding, lm/kv_cache.py; cache['layer'] says
    which layer this is), the T new tokens sit at slots cache['index'] + t and attend to every
    earlier slot of their segment; their keys and values are written into the returned cache."""
    cfg, dt = self.cfg, self.cfg.dtype
    q_BTHQ = project(self, 'w_q', x_BTD, dropout_rng)  # 'btd,dhq->bthq'
    k_BTKQ = project(self, 'w_k', x_BTD, dropout_rng)  # 'btd,dkq->btkq'
    v_BTKQ = project(self, 'w_v', x_BTD, dropout_rng)
    q_BTHQ = sharding.constrain(q_BTHQ, ('act_batch', 'act_seq', 'act_heads', None))
    k_BTKQ = sharding.constrain(k_BTKQ, ('act_batch', 'act_seq', 'act_kv_heads', None))
    v_BTKQ = sharding.constrain(v_BTKQ, ('act_batch', 'act_seq', 'act_kv_heads', None))
    if cfg.block == 'gpt2':
      q_BTHQ += self.b_q[...].astype(dt)[None, None]
      k_BTKQ += self.b_k[...].astype(dt)[None, None]
      v_BTKQ += self.b_v[...].astype(dt)[None, None]
    else:
      q_BTHQ = rotary(q_BTHQ, positions_BT, cfg.rope_theta)
      k_BTKQ = rotary(k_BTKQ, positions_BT, cfg.rope_theta)
    if cache is None:
      out_BTHQ = attention_lib.causal_attention(
          q_BTHQ, k_BTKQ, v_BTKQ, segment_ids_BT, implementation=cfg.attention,
          causal=self.causal)
    elif not self.causal:
      raise ValueError("config.model.kind='encoder' attends both ways and has no KV cache: "
                       'decoding (lm.generate, lm.engine) needs a decoder')
    else:
      cache, k_BSKQ, v_BSKQ = kv_cache.write(cache, k_BTKQ, v_BTKQ)
      out_BTHQ = attention_lib.cached_attention(
          q_BTHQ, k_BSKQ, v_BSKQ, segment_ids_BT, cache['segment_ids'], cache['index'])
    out_BTD = project(self, 'w_o', out_BTHQ, dropout_rng)  # 'bthq,hqd->btd'
    if cfg.block == 'gpt2':
      out_BTD += self.b_o[...].astype(dt)[None, None, :]
    return out_BTD, cache


class CrossAttention(nnx.Module):
  """An encoder_decoder decoder's attention to the encoded input: queries from the decoder, keys
  and values from the encoder's output, without positions (rotary would relate positions of two
  different sequences); each decoder segment sees its own segment of the input."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    _attention_weights(self, cfg, rngs)

  def keys_values(self, encoded_BSD, dropout_rng=None):
    """(k_BSKQ, v_BSKQ) of the encoded input."""
    k_BSKQ = project(self, 'w_k', encoded_BSD, dropout_rng)
    v_BSKQ = project(self, 'w_v', encoded_BSD, dropout_rng)
    if self.cfg.block == 'gpt2':
      k_BSKQ += self.b_k[...].astype(self.cfg.dtype)[None, None]
      v_BSKQ += self.b_v[...].astype(self.cfg.dtype)[None, None]
    return (sharding.constrain(k_BSKQ, ('act_batch', 'act_seq', 'act_kv_heads', None)),
            sharding.constrain(v_BSKQ, ('act_batch', 'act_seq', 'act_kv_heads', None)))

  def __call__(self, x_BTD, segment_ids_BT, memory, cache=None, layer=None, dropout_rng=None):
    """(out_BTD, cache). memory (encoded_BSD, encoded_segment_ids_BS): keys and values computed
    from it (training; and the prefill of decoding, which also writes them into the cache's
    cross_k / cross_v at `layer`). memory None: read from the cache (decoding's later steps)."""
    cfg, dt = self.cfg, self.cfg.dtype
    q_BTHQ = project(self, 'w_q', x_BTD, dropout_rng)
    if cfg.block == 'gpt2':
      q_BTHQ += self.b_q[...].astype(dt)[None, None]
    q_BTHQ = sharding.constrain(q_BTHQ, ('act_batch', 'act_seq', 'act_heads', None))
    if memory is not None:
      encoded_BSD, encoded_segment_ids_BS = memory
      k_BSKQ, v_BSKQ = self.keys_values(encoded_BSD, dropout_rng)
      if cache is not None:
        cache = kv_cache.write_cross(cache, layer, k_BSKQ, v_BSKQ)
    else:
      k_BSKQ, v_BSKQ = cache['cross_k'][layer], cache['cross_v'][layer]
      encoded_segment_ids_BS = cache['cross_segment_ids']
    mask_B1TS = attention_lib.visible(segment_ids_BT, encoded_segment_ids_BS)[:, None]
    out_BTHQ = attention_lib.einsum_attention(q_BTHQ, k_BSKQ.astype(dt), v_BSKQ.astype(dt),
                                              mask_B1TS)
    out_BTD = project(self, 'w_o', out_BTHQ, dropout_rng)
    if cfg.block == 'gpt2':
      out_BTD += self.b_o[...].astype(dt)[None, None, :]
    return out_BTD, cache


class MLP(nnx.Module):
  """SwiGLU (llama) or GELU (gpt2) feed-forward."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, F = cfg.d_model, cfg.d_ff
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.w_up = _param(rngs, (D, F), ('embed', 'mlp'), cfg, std)
    self.w_down = _param(rngs, (F, D), ('mlp', 'embed'), cfg, out_std)
    if cfg.block == 'llama':
      self.w_gate = _param(rngs, (D, F), ('embed', 'mlp'), cfg, std)
    else:
      self.b_up = _param(rngs, (F,), ('mlp',), cfg, init=jnp.zeros)
      self.b_down = _param(rngs, (D,), ('embed',), cfg, init=jnp.zeros)
    lora_lib.add_adapters(self, ('w_gate', 'w_up', 'w_down'), rngs)

  def __call__(self, x_BTD, dropout_rng=None):
    dt = self.cfg.dtype
    up_BTF = project(self, 'w_up', x_BTD, dropout_rng)
    if self.cfg.block == 'llama':
      gate_BTF = project(self, 'w_gate', x_BTD, dropout_rng)
      hidden_BTF = jax.nn.silu(gate_BTF) * up_BTF
    else:
      hidden_BTF = jax.nn.gelu(up_BTF + self.b_up[...].astype(dt)[None, None, :], approximate=True)
    hidden_BTF = sharding.constrain(hidden_BTF, ('act_batch', 'act_seq', 'act_mlp'))
    out_BTD = project(self, 'w_down', hidden_BTF, dropout_rng)
    if self.cfg.block == 'gpt2':
      out_BTD += self.b_down[...].astype(dt)[None, None, :]
    return out_BTD


class MoE(nnx.Module):
  """E expert MLPs of the block's kind (SwiGLU for llama, GELU with biases for gpt2) and a router
  choosing top_k of them per token; routing, dispatch and the auxiliary losses are lm/moe.py's."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, F, E = cfg.d_model, cfg.d_ff, cfg.moe_num_experts
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.w_router = _param(rngs, (D, E), ('embed', None), cfg, std)
    self.w_up = _param(rngs, (E, D, F), ('expert', 'embed', 'mlp'), cfg, std)
    self.w_down = _param(rngs, (E, F, D), ('expert', 'mlp', 'embed'), cfg, out_std)
    if cfg.block == 'llama':
      self.w_gate = _param(rngs, (E, D, F), ('expert', 'embed', 'mlp'), cfg, std)
    else:
      self.b_up = _param(rngs, (E, F), ('expert', 'mlp'), cfg, init=jnp.zeros)
      self.b_down = _param(rngs, (E, D), ('expert', 'embed'), cfg, init=jnp.zeros)

  def __call__(self, x_BTD, token_mask_BT):
    """(out_BTD, aux): aux holds this layer's 'load_balance', 'router_z' and 'dropped' (share of
    assignments over capacity) scalars, 'loss' (the first two, weighted by config.model.moe's
    load_balance_loss and router_z_loss) and 'expert_share' [E] (share of assignments)."""
    cfg = self.cfg
    weights_BTK, experts_BTK, aux = moe_lib.route(
        x_BTD, self.w_router[...], cfg.moe_top_k, token_mask_BT)
    if cfg.moe_capacity_factor > 0:
      out_BTD, kept_BTK = moe_lib.capacity_moe(
          x_BTD, weights_BTK, experts_BTK, token_mask_BT, self._experts,
          num_experts=cfg.moe_num_experts, capacity_factor=cfg.moe_capacity_factor,
          dtype=cfg.dtype)
      assigned = jnp.maximum(token_mask_BT.sum() * cfg.moe_top_k, 1)
      aux['dropped'] = 1.0 - (kept_BTK * token_mask_BT[..., None]).sum() / assigned
    else:
      out_BTD = moe_lib.dropless_moe(x_BTD, weights_BTK, experts_BTK, self._experts,
                                     num_experts=cfg.moe_num_experts)
      aux['dropped'] = jnp.zeros((), jnp.float32)
    aux['loss'] = (cfg.moe_load_balance_loss * aux['load_balance']
                   + cfg.moe_router_z_loss * aux['router_z'])
    return out_BTD.astype(cfg.dtype), aux

  def _experts(self, x, expert_of_row=None, group_sizes_E=None):
    """The expert MLPs on tokens placed by expert: an [E, G, C, D] buffer (capacity), or [A, D]
    rows sorted by expert with their experts and group sizes (dropless, grouped matmuls)."""
    cfg = self.cfg
    weight = lambda name: getattr(self, name)[...].astype(cfg.dtype)
    if group_sizes_E is None:
      matmul = lambda x, w: jnp.einsum('egcd,edf->egcf', x, w)
      bias = lambda name: weight(name)[:, None, None, :]
    else:
      matmul = lambda x, w: jax.lax.ragged_dot(x, w, group_sizes_E)
      bias = lambda name: jnp.take(weight(name), expert_of_row, axis=0)
    up = matmul(x, weight('w_up'))
    if cfg.block == 'llama':
      hidden = jax.nn.silu(matmul(x, weight('w_gate'))) * up
    else:
      hidden = jax.nn.gelu(up + bias('b_up'), approximate=True)
    out = matmul(hidden, weight('w_down'))
    return out + bias('b_down') if cfg.block == 'gpt2' else out


class Block(nnx.Module):
  """Pre-norm residual block: x + attention(norm(x)), [x + cross_attention(norm(x)) in an
  encoder_decoder's decoder], then x + mlp(norm(x)) (MoE: mlp = experts)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False, causal: bool = True,
               cross: bool = False):
    self.attention_norm = Norm(cfg, rngs=rngs)
    self.attention = Attention(cfg, rngs=rngs, causal=causal)
    if cross:
      self.cross_attention_norm = Norm(cfg, rngs=rngs)
      self.cross_attention = CrossAttention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg, rngs=rngs)
    self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, rngs=rngs)
    if cfg.adapter_dim:  # Houlsby adapters on every sub-layer's output (lm/peft.py).
      self.attention_adapter = peft_lib.Adapter(cfg, rngs=rngs)
      if cross:
        self.cross_attention_adapter = peft_lib.Adapter(cfg, rngs=rngs)
      self.mlp_adapter = peft_lib.Adapter(cfg, rngs=rngs)

  def _adapt(self, name: str, out_BTD):
    """A sub-layer's output through its adapter, when the block has adapters."""
    return getattr(self, name)(out_BTD) if hasattr(self, name) else out_BTD

  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache=None, dropout_rng=None,
               memory=None):
    """(x_BTD, cache, aux): aux is the MoE layer's (lm/moe.py), {} for a dense block. memory:
    the encoded input, for the cross-attention (CrossAttention.__call__)."""
    attention_rng, mlp_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    layer = None if cache is None else cache['layer']
    attention_BTD, cache = self.attention(
        self.attention_norm(x_BTD), segment_ids_BT, positions_BT, cache, attention_rng)
    attention_BTD = self._adapt('attention_adapter', attention_BTD)
    x_BTD = sharding.constrain(x_BTD + attention_BTD, ('act_batch', 'act_seq', 'act_embed'))
    if hasattr(self, 'cross_attention'):
      cross_rng = None
      if mlp_rng is not None:
        mlp_rng, cross_rng = jax.random.split(mlp_rng)
      cross_BTD, cache = self.cross_attention(
          self.cross_attention_norm(x_BTD), segment_ids_BT, memory, cache, layer, cross_rng)
      cross_BTD = self._adapt('cross_attention_adapter', cross_BTD)
      x_BTD = sharding.constrain(x_BTD + cross_BTD, ('act_batch', 'act_seq', 'act_embed'))
    if isinstance(self.mlp, MoE):
      # SHARED_PREFIX tokens (-1: a soft prompt, a scored context) are real tokens too.
      mlp_BTD, aux = self.mlp(self.mlp_norm(x_BTD), segment_ids_BT != 0)
    else:
      mlp_BTD, aux = self.mlp(self.mlp_norm(x_BTD), mlp_rng), {}
    x_BTD = x_BTD + self._adapt('mlp_adapter', mlp_BTD)
    return sharding.constrain(x_BTD, ('act_batch', 'act_seq', 'act_embed')), cache, aux


class Transformer(nnx.Module):
  """Token ids [B, T] -> next-token logits [B, T, V] in fp32 (an encoder_decoder's decoder: given
  the encoded input, `encode`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    V, D = cfg.vocab_size, cfg.d_model
    self.embed = _param(rngs, (V, D), ('vocab', 'embed'), cfg, cfg.init_std)
    if cfg.block == 'gpt2':
      self.pos_embed = _param(rngs, (cfg.max_seq_len, D), (None, 'embed'), cfg, cfg.init_std)

    def make_blocks(count, moe, causal, cross):
      @nnx.split_rngs(splits=count)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(cfg, rngs=rngs, moe=moe, causal=causal, cross=cross)
      return make(rngs)

    # Every leaf has a leading layers axis: [L] for a dense model; with MoE every
    # moe_every_n_layers-th block is in moe_blocks and the others in blocks, in layer order.
    seq2seq = cfg.kind == 'encoder_decoder'
    if seq2seq:
      if not cfg.shared_embeddings:
        self.encoder_embed = _param(rngs, (V, D), ('vocab', 'embed'), cfg, cfg.init_std)
      groups, dense, moe = cfg.groups_of(cfg.num_encoder_layers)
      if dense:
        self.encoder_blocks = make_blocks(groups * dense, False, causal=False, cross=False)
      if moe:
        self.encoder_moe_blocks = make_blocks(groups * moe, True, causal=False, cross=False)
      self.encoder_norm = Norm(cfg, rngs=rngs)
    groups, dense, moe = cfg.layer_groups
    causal = cfg.kind != 'encoder'
    if dense:
      self.blocks = make_blocks(groups * dense, False, causal=causal, cross=seq2seq)
    if moe:
      self.moe_blocks = make_blocks(groups * moe, True, causal=causal, cross=seq2seq)
    self.final_norm = Norm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, (D, V), ('embed', 'vocab'), cfg, cfg.init_std)
    if cfg.reward_head:
      self.reward_head = _param(rngs, (D,), ('embed',), cfg, cfg.init_std)
    if cfg.value_head:  # Zeros: values start at 0 and the policy's outputs are unchanged.
      self.value_head = _param(rngs, (D,), ('embed',), cfg, init=jnp.zeros)
    if cfg.prompt_tokens:
      self.soft_prompt = peft_lib.init_soft_prompt(cfg, rngs)

  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, cache=None,
               dropout_rng=None, hidden_only: bool = False, memory=None):
    """segment_ids (1, 2, ... per packed document) keep documents from attending to each other;
    positions restart at 0 in each document. Both default to one document per row. dropout_rng
    (a key; training only) turns on LoRA dropout.

    With a KV cache (lm/kv_cache.py) the tokens continue what the cache holds, and the result
    is (logits_BTV, the cache with them appended). hidden_only (no cache): the final-norm
    hidden states x_BTD instead, for callers that need `logits` at a few positions only.
    memory: an encoder_decoder's encoded input (CrossAttention.__call__)."""
    x_BTD, cache, _ = self.hidden(tokens_BT, segment_ids_BT, positions_BT, cache, dropout_rng,
                                  memory)
    if hidden_only:
      return x_BTD
    logits_BTV = self.logits(x_BTD)
    return logits_BTV if cache is None else (logits_BTV, kv_cache.advance(cache, tokens_BT.shape[1]))

  def hidden(self, tokens_BT, segment_ids_BT=None, positions_BT=None, cache=None,
             dropout_rng=None, memory=None):
    """(final-norm hidden states x_BTD, cache, MoE aux): embeddings, the blocks, the final norm.

    With a soft prompt (lm/peft.py) real tokens sit at their positions + N; without a cache the
    prompt is prepended to every row (SHARED_PREFIX) and x_BTD covers the real tokens only."""
    segment_ids_BT, positions_BT = _default_segments(tokens_BT, segment_ids_BT, positions_BT)
    N = self.cfg.prompt_tokens
    if N:
      positions_BT = positions_BT + N
    x_BTD = self._embed(self.embed, tokens_BT, positions_BT)
    if N and cache is None:
      B = tokens_BT.shape[0]
      x_BTD = jnp.concatenate([self._soft_prompt(B), x_BTD], axis=1)
      segment_ids_BT = jnp.concatenate(
          [jnp.full((B, N), attention_lib.SHARED_PREFIX, segment_ids_BT.dtype), segment_ids_BT], 1)
      positions_BT = jnp.concatenate(
          [jnp.broadcast_to(jnp.arange(N, dtype=positions_BT.dtype), (B, N)), positions_BT], 1)
    x_BTD, cache, aux = self.trunk(x_BTD, segment_ids_BT, positions_BT, cache, dropout_rng,
                                   memory=memory)
    if N and cache is None:
      x_BTD = x_BTD[:, N:]
    return self.final_norm(x_BTD), cache, aux

  def _soft_prompt(self, batch_size: int):
    """The soft prompt as embedded inputs [B, N, D] (with gpt2's position table at 0 .. N-1)."""
    prompt_ND = peft_lib.prompt_embeddings(self)
    if self.cfg.block == 'gpt2':
      prompt_ND = prompt_ND + self.pos_embed[...][:self.cfg.prompt_tokens]
    x_BND = jnp.broadcast_to(prompt_ND.astype(self.cfg.dtype), (batch_size, *prompt_ND.shape))
    return sharding.constrain(x_BND, ('act_batch', 'act_seq', 'act_embed'))

  def prefill_prompt(self, cache):
    """The cache with the soft prompt written at its next N slots (segment 1, positions 0 ..
    N-1) for every row: decoding's first step when the model has one (lm/peft.py)."""
    N = self.cfg.prompt_tokens
    B = cache['block_table'].shape[0] if 'block_table' in cache else cache['segment_ids'].shape[0]
    segment_ids_BN = jnp.ones((B, N), jnp.int32)
    positions_BN = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
    _, cache, _ = self.trunk(self._soft_prompt(B), segment_ids_BN, positions_BN, cache)
    return kv_cache.advance(cache, N)

  def encode(self, tokens_BS, segment_ids_BS=None, positions_BS=None, dropout_rng=None):
    """An encoder_decoder's encoder: (encoded_BSD after encoder_norm, MoE aux), for `memory`."""
    segment_ids_BS, positions_BS = _default_segments(tokens_BS, segment_ids_BS, positions_BS)
    table = self.encoder_embed if hasattr(self, 'encoder_embed') else self.embed
    x_BSD = self._embed(table, tokens_BS, positions_BS)
    if dropout_rng is not None:
      dropout_rng = jax.random.fold_in(dropout_rng, _ENCODER_STREAM)
    x_BSD, _, aux = self.trunk(x_BSD, segment_ids_BS, positions_BS, dropout_rng=dropout_rng,
                               encoder=True)
    return self.encoder_norm(x_BSD), aux

  def _embed(self, table, tokens_BT, positions_BT):
    x_BTD = jnp.take(table[...], tokens_BT, axis=0)
    if self.cfg.block == 'gpt2':
      x_BTD = x_BTD + jnp.take(self.pos_embed[...], positions_BT, axis=0)
    return sharding.constrain(x_BTD.astype(self.cfg.dtype), ('act_batch', 'act_seq', 'act_embed'))

  def trunk(self, x_BTD, segment_ids_BT, positions_BT, cache=None, dropout_rng=None,
            memory=None, encoder: bool = False):
    """The blocks on embedded inputs (the encoder's with encoder=True): (x_BTD, cache, aux) with
    aux the MoE layers' statistics stacked along a leading [MoE layers] axis ({} for a dense
    model). memory: the encoded input that a decoder's cross-attention reads."""
    cfg = self.cfg
    groups, dense, moe = cfg.groups_of(cfg.num_encoder_layers) if encoder else cfg.layer_groups
    period = dense + moe
    # (graph, params, blocks per group) for the dense and the MoE blocks: params [groups, ...]
    # with one block per group, [groups, per group, ...] with several. (A dense model's stack is
    # never reshaped: inside a scan the reshape and index made XLA keep extra copies of it.)
    stacks = []
    prefix = 'encoder_' if encoder else ''
    for name, per_group in ((prefix + 'blocks', dense), (prefix + 'moe_blocks', moe)):
      if per_group:
        graph, params = nnx.split(getattr(self, name))
        if per_group > 1:
          params = jax.tree.map(lambda p: p.reshape(groups, per_group, *p.shape[1:]), params)
        stacks.append((graph, params, per_group))
    if cache is not None:
      cache = kv_cache.prepare(cache, segment_ids_BT)

    def block_fn(graph):
      def run_block(x_and_cache, params, layer):
        x_BTD, cache = x_and_cache
        if cache is not None:
          cache = kv_cache.at_layer(cache, layer)
        layer_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, layer)
        x_BTD, cache, aux = nnx.merge(graph, params)(
            x_BTD, segment_ids_BT, positions_BT, cache, layer_rng, memory)
        return (x_BTD, cache), aux
      return jax.checkpoint(run_block, prevent_cse=not cfg.scan_layers) if cfg.remat else run_block

    run_blocks = [block_fn(graph) for graph, _, _ in stacks]

    def run_group(x_and_cache, params_and_group):
      """One group's blocks in layer order: its dense blocks, then its MoE block."""
      group_params, group = params_and_group
      aux = None
      for j in range(period):
        stack, index = (0, j) if j < dense else (len(stacks) - 1, j - dense)
        params = group_params[stack]
        if stacks[stack][2] > 1:
          params = jax.tree.map(lambda p: p[index], params)
        x_and_cache, block_aux = run_blocks[stack](x_and_cache, params, group * period + j)
        aux = block_aux or aux
      return x_and_cache, aux

    all_params = tuple(params for _, params, _ in stacks)
    if cfg.scan_layers:
      (x_BTD, cache), aux = jax.lax.scan(
          run_group, (x_BTD, cache), (all_params, jnp.arange(groups)))
    else:
      x_and_cache, auxes = (x_BTD, cache), []
      for group in range(groups):
        group_params = jax.tree.map(lambda p: p[group], all_params)
        x_and_cache, aux = run_group(x_and_cache, (group_params, group))
        auxes.append(aux)
      (x_BTD, cache) = x_and_cache
      aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if moe else None
    return x_BTD, cache, aux or {}

  def logits(self, x_BTD):
    """Next-token logits (fp32) from final-norm hidden states."""
    cfg = self.cfg
    unembed_DV = self.embed[...].T if cfg.tie_embeddings else self.unembed[...]
    logits_BTV = dense(x_BTD, unembed_DV.astype(cfg.dtype), preferred_element_type=jnp.float32)
    return sharding.constrain(logits_BTV, ('act_batch', 'act_seq', 'act_vocab'))


  def reward(self, x_BTD, last_B):
    """[B] fp32 scalar rewards: the reward head on each row's hidden state at index last_B."""
    x_BD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]
    return jnp.einsum('bd,d->b', x_BD.astype(jnp.float32),
                      self.reward_head[...].astype(jnp.float32))


def _default_segments(tokens_BT, segment_ids_BT, positions_BT):
  """One document per row when segment ids and positions are not given."""
  B, T = tokens_BT.shape
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return segment_ids_BT, positions_BT


# Folded into the dropout key for the encoder's layers, so they differ from the decoder's.
_ENCODER_STREAM = 0x656e63


# Scalar heads on the trunk's hidden states: trained whenever the model has them (a fresh head
# must learn, even when config.train.trainable names only LoRA adapters), and started fresh when
# config.init_from's checkpoint lacks them.
SCALAR_HEADS = ('reward_head', 'value_head')


def init(cfg: ModelConfig, seed: int):
  """Builds the model; returns (graphdef, params) with params a plain nested dict of arrays."""
  return graphdef(cfg), init_params(cfg, seed)


def init_params(cfg: ModelConfig, seed: int) -> dict:
  """Freshly initialised parameters (jittable, so they can be created already sharded)."""
  return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=_rngs(seed))))


def _rngs(seed: int) -> nnx.Rngs:
  """'params' for the model's weights, 'lora' for LoRA adapters, 'peft' for config.peft's
  parameters (streams of their own)."""
  key = jax.random.key(seed)
  return nnx.Rngs(params=seed, lora=jax.random.fold_in(key, 1), peft=jax.random.fold_in(key, 2))


def graphdef(cfg: ModelConfig):
  """The model's static structure, which `apply` combines with a params dict."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=_rngs(0)))
  return nnx.graphdef(abstract)


def apply(graphdef, params, tokens_BT, segment_ids_BT=None, positions_BT=None, cache=None,
          dropout_rng=None):
  """Pure forward pass: logits_BTV (fp32) from a params dict; (logits_BTV, cache) with a cache."""
  return nnx.merge(graphdef, params)(tokens_BT, segment_ids_BT, positions_BT, cache, dropout_rng)


def apply_with_aux(graphdef, params, tokens_BT, segment_ids_BT=None, positions_BT=None,
                   dropout_rng=None):
  """Pure (logits_BTV, aux): aux holds the MoE layers' router statistics and auxiliary losses
  (lm/moe.py), each with a leading [MoE layers] axis; {} for a dense model."""
  model = nnx.merge(graphdef, params)
  x_BTD, _, aux = model.hidden(tokens_BT, segment_ids_BT, positions_BT, dropout_rng=dropout_rng)
  return model.logits(x_BTD), aux


def apply_encoder_decoder(graphdef, params, inputs_BS, targets_in_BT, input_segment_ids_BS=None,
                          input_positions_BS=None, segment_ids_BT=None, positions_BT=None,
                          dropout_rng=None):
  """Pure (logits_BTV, aux) of an encoder_decoder model: the encoder reads inputs_BS, the decoder
  targets_in_BT (the targets shifted right after decoder_start_id) with cross-attention to it;
  aux holds both stacks' MoE statistics (encoder's layers first), {} for a dense model."""
  model = nnx.merge(graphdef, params)
  if input_segment_ids_BS is None:
    input_segment_ids_BS = jnp.ones(inputs_BS.shape, jnp.int32)
  encoded_BSD, encoder_aux = model.encode(inputs_BS, input_segment_ids_BS, input_positions_BS,
                                          dropout_rng)
  x_BTD, _, aux = model.hidden(targets_in_BT, segment_ids_BT, positions_BT,
                               dropout_rng=dropout_rng, memory=(encoded_BSD, input_segment_ids_BS))
  if encoder_aux:
    aux = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), encoder_aux, aux)
  return model.logits(x_BTD), aux


def apply_reward(graphdef, params, tokens_BT, segment_ids_BT, positions_BT, last_B,
                 dropout_rng=None):
  """Pure (rewards_B, aux): the scalar rewards (a model with reward_head) read at token index
  last_B of each row, and the MoE layers' router statistics (apply_with_aux's; {} if dense)."""
  model = nnx.merge(graphdef, params)
  x_BTD, _, aux = model.hidden(tokens_BT, segment_ids_BT, positions_BT, dropout_rng=dropout_rng)
  return model.reward(x_BTD, last_B), aux


def apply_with_values(graphdef, params, tokens_BT, segment_ids_BT, positions_BT,
                      dropout_rng=None):
  """Pure (logits_BTV, values_BT, aux), the first two fp32, from one pass through the trunk (a
  model with value_head): the value at t estimates the return of the sequence from token t on;
  aux is the MoE layers' router statistics (apply_with_aux's; {} for a dense model)."""
  model = nnx.merge(graphdef, params)
  x_BTD, _, aux = model.hidden(tokens_BT, segment_ids_BT, positions_BT, dropout_rng=dropout_rng)
  values_BT = jnp.einsum('btd,d->bt', x_BTD.astype(jnp.float32),
                         model.value_head[...].astype(jnp.float32))
  return model.logits(x_BTD), values_BT, aux


def logical_axes(cfg: ModelConfig):
  """The params pytree's logical axis names, with 'layers' prepended for the stacked blocks."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=_rngs(0)))
  _, state = nnx.split(abstract)

  def axes(path, variable):
    names = tuple(variable.get_metadata()['logical_axes'])
    return ('layers',) + names if path[0] in STACKS else names

  flat = {path: axes(path, v) for path, v in nnx.to_flat_state(state)}
  return pytree.unflatten(flat)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
