"""A decoder-only transformer in Flax NNX: Llama-style and GPT-2-style blocks, MHA/GQA/MQA.

Shape suffixes name each axis: B batch, T query time, S key time, D d_model, H query heads,
K key/value heads, G query heads per kv head (H = K * G), Q head dim, F d_ff, V vocab, L layers.

Every parameter carries `logical_axes` metadata ('vocab', 'embed', 'heads', 'kv_heads',
'head_dim', 'mlp', 'layers'); lm/sharding.py maps these names onto mesh axes, so this file never
mentions devices. Parameters are stored in `param_dtype` (fp32); matmuls run in `dtype` (e.g.
bf16); norms, softmax, logits and the loss are computed in fp32.

The blocks' parameters are always stacked along a leading 'layers' axis, so `scan_layers` only
changes how the forward pass iterates (lax.scan or an unrolled loop), never the checkpoint layout.
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
from lm import pytree
from lm import sharding


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyperparameters (config.model, with 'auto' dtype already resolved)."""
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
  # A scalar reward head on the last token's final hidden state (mode='reward', lm/post/reward.py).
  reward_head: bool = False
  # A scalar value head on every token's final hidden state, sharing the trunk (mode='ppo').
  value_head: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, dtype: str | None = None):
    """From a run config: config.model's fields, and config.lora's when it has that section."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.model.items() if k in fields}
    if dtype is not None:
      values['dtype'] = dtype
    if values.get('dtype') == 'auto':
      raise ValueError('resolve model.dtype="auto" (lm.flops.resolve_dtype) before building')
    lora = config.get('lora')
    if lora is not None and lora.rank > 0:
      values.update(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    lora_targets=lora_lib.lora_targets(lora.targets, config.model.block))
    return cls(**values)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


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


class Attention(nnx.Module):
  """Causal self-attention with K <= H key/value heads (MHA: K = H, GQA: 1 < K < H, MQA: K = 1)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K, Q = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.w_q = _param(rngs, (D, H, Q), ('embed', 'heads', 'head_dim'), cfg, std)
    self.w_k = _param(rngs, (D, K, Q), ('embed', 'kv_heads', 'head_dim'), cfg, std)
    self.w_v = _param(rngs, (D, K, Q), ('embed', 'kv_heads', 'head_dim'), cfg, std)
    self.w_o = _param(rngs, (H, Q, D), ('heads', 'head_dim', 'embed'), cfg, out_std)
    if cfg.block == 'gpt2':
      self.b_q = _param(rngs, (H, Q), ('heads', 'head_dim'), cfg, init=jnp.zeros)
      self.b_k = _param(rngs, (K, Q), ('kv_heads', 'head_dim'), cfg, init=jnp.zeros)
      self.b_v = _param(rngs, (K, Q), ('kv_heads', 'head_dim'), cfg, init=jnp.zeros)
      self.b_o = _param(rngs, (D,), ('embed',), cfg, init=jnp.zeros)
    lora_lib.add_adapters(self, ('w_q', 'w_k', 'w_v', 'w_o'), rngs)

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
          q_BTHQ, k_BTKQ, v_BTKQ, segment_ids_BT, implementation=cfg.attention)
    else:
      cache, k_BSKQ, v_BSKQ = kv_cache.write(cache, k_BTKQ, v_BTKQ)
      out_BTHQ = attention_lib.cached_attention(
          q_BTHQ, k_BSKQ, v_BSKQ, segment_ids_BT, cache['segment_ids'], cache['index'])
    out_BTD = project(self, 'w_o', out_BTHQ, dropout_rng)  # 'bthq,hqd->btd'
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


class Block(nnx.Module):
  """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attention_norm = Norm(cfg, rngs=rngs)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache=None, dropout_rng=None):
    attention_rng, mlp_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    attention_BTD, cache = self.attention(
        self.attention_norm(x_BTD), segment_ids_BT, positions_BT, cache, attention_rng)
    x_BTD = sharding.constrain(x_BTD + attention_BTD, ('act_batch', 'act_seq', 'act_embed'))
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD), mlp_rng)
    return sharding.constrain(x_BTD, ('act_batch', 'act_seq', 'act_embed')), cache


class Transformer(nnx.Module):
  """Token ids [B, T] -> next-token logits [B, T, V] in fp32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    V, D = cfg.vocab_size, cfg.d_model
    self.embed = _param(rngs, (V, D), ('vocab', 'embed'), cfg, cfg.init_std)
    if cfg.block == 'gpt2':
      self.pos_embed = _param(rngs, (cfg.max_seq_len, D), (None, 'embed'), cfg, cfg.init_std)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)  # Every leaf has a leading [L] axis.
    self.final_norm = Norm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, (D, V), ('embed', 'vocab'), cfg, cfg.init_std)
    if cfg.reward_head:
      self.reward_head = _param(rngs, (D,), ('embed',), cfg, cfg.init_std)
    if cfg.value_head:  # Zeros: values start at 0 and the policy's outputs are unchanged.
      self.value_head = _param(rngs, (D,), ('embed',), cfg, init=jnp.zeros)

  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, cache=None,
               dropout_rng=None, hidden_only: bool = False):
    """segment_ids (1, 2, ... per packed document) keep documents from attending to each other;
    positions restart at 0 in each document. Both default to one document per row. dropout_rng
    (a key; training only) turns on LoRA dropout.

    With a KV cache (lm/kv_cache.py) the tokens continue what the cache holds, and the result
    is (logits_BTV, the cache with them appended). hidden_only (no cache): the final-norm
    hidden states x_BTD instead, for callers that need `logits` at a few positions only."""
    cfg = self.cfg
    B, T = tokens_BT.shape
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0)
    if cfg.block == 'gpt2':
      x_BTD = x_BTD + jnp.take(self.pos_embed[...], positions_BT, axis=0)
    x_BTD = sharding.constrain(x_BTD.astype(cfg.dtype), ('act_batch', 'act_seq', 'act_embed'))

    block_graph, block_params = nnx.split(self.blocks)
    if cache is not None:
      cache = kv_cache.prepare(cache, segment_ids_BT)

    def run_block(x_and_cache, params_and_layer):
      (x_BTD, cache), (params, layer) = x_and_cache, params_and_layer
      if cache is not None:
        cache = kv_cache.at_layer(cache, layer)
      layer_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, layer)
      block = nnx.merge(block_graph, params)
      return block(x_BTD, segment_ids_BT, positions_BT, cache, layer_rng), None

    if cfg.remat:
      run_block = jax.checkpoint(run_block, prevent_cse=not cfg.scan_layers)
    needs_layer = cache is not None or dropout_rng is not None
    if cfg.scan_layers:
      layers = jnp.arange(cfg.num_layers) if needs_layer else None
      (x_BTD, cache), _ = jax.lax.scan(run_block, (x_BTD, cache), (block_params, layers))
    else:
      for layer in range(cfg.num_layers):
        layer_params = jax.tree.map(lambda p: p[layer], block_params)
        (x_BTD, cache), _ = run_block(
            (x_BTD, cache), (layer_params, layer if needs_layer else None))

    x_BTD = self.final_norm(x_BTD)
    if hidden_only:
      return x_BTD
    logits_BTV = self.logits(x_BTD)
    return logits_BTV if cache is None else (logits_BTV, kv_cache.advance(cache, T))

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
  """'params' for the model's weights, 'lora' for LoRA adapters (a stream of its own)."""
  return nnx.Rngs(params=seed, lora=jax.random.fold_in(jax.random.key(seed), 1))


def graphdef(cfg: ModelConfig):
  """The model's static structure, which `apply` combines with a params dict."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=_rngs(0)))
  return nnx.graphdef(abstract)


def apply(graphdef, params, tokens_BT, segment_ids_BT=None, positions_BT=None, cache=None,
          dropout_rng=None):
  """Pure forward pass: logits_BTV (fp32) from a params dict; (logits_BTV, cache) with a cache."""
  return nnx.merge(graphdef, params)(tokens_BT, segment_ids_BT, positions_BT, cache, dropout_rng)


def apply_reward(graphdef, params, tokens_BT, segment_ids_BT, positions_BT, last_B,
                 dropout_rng=None):
  """Pure scalar rewards [B] (a model with reward_head) read at token index last_B of each row."""
  model = nnx.merge(graphdef, params)
  x_BTD = model(tokens_BT, segment_ids_BT, positions_BT, dropout_rng=dropout_rng, hidden_only=True)
  return model.reward(x_BTD, last_B)


def apply_with_values(graphdef, params, tokens_BT, segment_ids_BT, positions_BT,
                      dropout_rng=None):
  """Pure (logits_BTV, values_BT), both fp32, from one pass through the trunk (a model with
  value_head): the value at t estimates the return of the sequence from token t on."""
  model = nnx.merge(graphdef, params)
  x_BTD = model(tokens_BT, segment_ids_BT, positions_BT, dropout_rng=dropout_rng, hidden_only=True)
  values_BT = jnp.einsum('btd,d->bt', x_BTD.astype(jnp.float32),
                         model.value_head[...].astype(jnp.float32))
  return model.logits(x_BTD), values_BT


def logical_axes(cfg: ModelConfig):
  """The params pytree's logical axis names, with 'layers' prepended for the stacked blocks."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=_rngs(0)))
  _, state = nnx.split(abstract)

  def axes(path, variable):
    names = tuple(variable.get_metadata()['logical_axes'])
    return ('layers',) + names if path[0] == 'blocks' else names

  flat = {path: axes(path, v) for path, v in nnx.to_flat_state(state)}
  return pytree.unflatten(flat)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
