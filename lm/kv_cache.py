"""The key/value cache that decoding reads and writes: preallocated, one buffer for all layers.

A cache is a dict of arrays (a pytree, so it jits, donates and shards like params):

  k, v          [L, B, S, K, Q]  keys (after rotary) and values of every layer, for the K kv heads
                only (a GQA/MQA cache is H/K times smaller than one per query head).
  segment_ids   [B, S]  the document id of the token in each slot; 0 marks padding and empty
                slots, which no real token (segment >= 1) attends to; -1 (attention.
                SHARED_PREFIX) a prefix that every real token of the row attends to.
  index         []  the slot the next tokens are written to, shared by every row.

An encoder_decoder model's cache also holds the cross-attention's keys and values of the encoded
input, computed once by the prefill (lm/model.py CrossAttention) and read by every later step:

  cross_k, cross_v    [L, B, S_in, K, Q]
  cross_segment_ids   [B, S_in]  the input's segment ids (0: padding, which nothing attends to)

Batches of prompts of different lengths are left-padded (padding in segment 0), so every row
writes at the same slot and one dynamic_update_slice per layer updates the cache in place;
positions (rotary, gpt2 tables) count from each row's first real token, so a row decodes exactly
as it would alone. The model writes a step's keys and values into the cache (lm/model.py);
`prepare` and `advance` bracket that step.

A paged cache (continuous batching, lm/engine.py) stores keys and values in a pool of fixed-size
blocks shared by all sequences, so memory follows the tokens each sequence actually holds:

  k, v          [L, N, C, K, Q]  N blocks of C slots; block 0 is scratch, never handed out, and
                takes the writes of padding and of idle rows.
  block_table   [B, M]  the blocks of row b's sequence, in order (slot s is in block s // C);
                unused entries are 0.
  index         [B]  each row's own length: where its next tokens go.
  segment_ids   [B, M * C]  1 for the slots a row has written (set by `prepare`), else 0.

`write` scatters the new keys and values into their blocks and gathers each row's blocks back
into a [B, M * C] view for attention, so the model runs on it unchanged.
"""

import jax
import jax.numpy as jnp

from lm import sharding

# Logical axes (lm/sharding.py RULES): the same names as the activations the cache is written
# from, so filling it never reshards: rows over data x fsdp, kv heads over tensor.
LOGICAL_AXES = {
    'k': ('layers', 'act_batch', 'act_seq', 'act_kv_heads', 'head_dim'),
    'v': ('layers', 'act_batch', 'act_seq', 'act_kv_heads', 'head_dim'),
    'segment_ids': ('act_batch', 'act_seq'),
    'index': (),
    'cross_k': ('layers', 'act_batch', 'act_seq', 'act_kv_heads', 'head_dim'),
    'cross_v': ('layers', 'act_batch', 'act_seq', 'act_kv_heads', 'head_dim'),
    'cross_segment_ids': ('act_batch', 'act_seq'),
}


def init(cfg, batch_size: int, length: int, dtype=None, input_segment_ids_BS=None) -> dict:
  """An empty cache of `length` slots per row, in `dtype` (default the model's compute dtype);
  an encoder_decoder's also has room for the cross-attention's keys and values of an input with
  input_segment_ids_BS."""
  shape = (cfg.num_layers, batch_size, length, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.dtype
  cache = {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
           'segment_ids': jnp.zeros((batch_size, length), jnp.int32),
           'index': jnp.zeros((), jnp.int32)}
  if input_segment_ids_BS is not None:
    cross_shape = (cfg.num_layers, batch_size, input_segment_ids_BS.shape[1], cfg.num_kv_heads,
                   cfg.head_dim)
    cache.update(cross_k=jnp.zeros(cross_shape, dtype), cross_v=jnp.zeros(cross_shape, dtype),
                 cross_segment_ids=jnp.asarray(input_segment_ids_BS, jnp.int32))
  return {name: sharding.constrain(x, LOGICAL_AXES[name]) for name, x in cache.items()}


def prepare(cache: dict, segment_ids_BT) -> dict:
  """Records the segment ids of the T tokens about to be written at cache['index']."""
  if 'block_table' in cache:
    return _prepare_paged(cache, segment_ids_BT.shape[1])
  segment_ids_BS = jax.lax.dynamic_update_slice(
      cache['segment_ids'], segment_ids_BT.astype(jnp.int32), (0, cache['index']))
  return {**cache, 'segment_ids': segment_ids_BS}


def at_layer(cache: dict, layer) -> dict:
  """The cache as one layer's attention sees it: the whole cache, plus which layer it is."""
  return {**cache, 'layer': layer}


def write(layer_view: dict, k_BTKQ, v_BTKQ):
  """Writes one layer's new keys and values at slot 'index' (in place under jit).

  Returns (cache, k_BSKQ, v_BSKQ): the updated cache (no longer tied to the layer) and that
  layer's keys and values.
  """
  cache = dict(layer_view)
  layer = cache.pop('layer')
  if 'block_table' in cache:
    return _write_paged(cache, layer, k_BTKQ, v_BTKQ)
  start = (layer, 0, cache['index'], 0, 0)
  cache['k'] = jax.lax.dynamic_update_slice(
      cache['k'], k_BTKQ[None].astype(cache['k'].dtype), start)
  cache['v'] = jax.lax.dynamic_update_slice(
      cache['v'], v_BTKQ[None].astype(cache['v'].dtype), start)
  return cache, cache['k'][layer], cache['v'][layer]


def write_cross(cache: dict, layer, k_BSKQ, v_BSKQ) -> dict:
  """The cache with one layer's cross-attention keys and values of the encoded input."""
  start = (layer, 0, 0, 0, 0)
  return {**cache,
          'cross_k': jax.lax.dynamic_update_slice(
              cache['cross_k'], k_BSKQ[None].astype(cache['cross_k'].dtype), start),
          'cross_v': jax.lax.dynamic_update_slice(
              cache['cross_v'], v_BSKQ[None].astype(cache['cross_v'].dtype), start)}


def advance(cache: dict, num_tokens: int) -> dict:
  return {**cache, 'index': cache['index'] + num_tokens}


def gather_rows(cache: dict, rows_B) -> dict:
  """The cache with its batch rows reordered/duplicated as rows_B says (beam search)."""
  out = {'k': cache['k'][:, rows_B], 'v': cache['v'][:, rows_B],
         'segment_ids': cache['segment_ids'][rows_B], 'index': cache['index']}
  if 'cross_k' in cache:
    out.update(cross_k=cache['cross_k'][:, rows_B], cross_v=cache['cross_v'][:, rows_B],
               cross_segment_ids=cache['cross_segment_ids'][rows_B])
  return out


# ---------------------------------------------------------------------------------------------
# Paged cache.

def init_pool(cfg, num_blocks: int, block_size: int, dtype=None) -> dict:
  """An empty pool of num_blocks blocks of block_size slots (block 0 is scratch)."""
  shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.dtype
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def paged(pool: dict, block_table_BM, lengths_B) -> dict:
  """A cache over the pool for B sequences holding lengths_B tokens in their blocks."""
  return {**pool, 'block_table': jnp.asarray(block_table_BM, jnp.int32),
          'index': jnp.asarray(lengths_B, jnp.int32)}


def _prepare_paged(cache: dict, num_new: int) -> dict:
  B, M = cache['block_table'].shape
  slots_S = jnp.arange(M * cache['k'].shape[2])
  written_BS = slots_S[None, :] < (cache['index'] + num_new)[:, None]
  return {**cache, 'segment_ids': written_BS.astype(jnp.int32)}


def _write_paged(cache: dict, layer, k_BTKQ, v_BTKQ):
  """Scatters the T new keys and values of each row into its blocks, then gathers every row's
  blocks into (cache, k_BSKQ, v_BSKQ) with S = M * C. Slots past the block table go to block 0."""
  block_table_BM = cache['block_table']
  B, M = block_table_BM.shape
  C = cache['k'].shape[2]
  slot_BT = cache['index'][:, None] + jnp.arange(k_BTKQ.shape[1])[None, :]
  block_BT = jnp.take_along_axis(block_table_BM, slot_BT // C, axis=1, mode='fill',
                                 fill_value=0)
  for name, new_BTKQ in (('k', k_BTKQ), ('v', v_BTKQ)):
    cache[name] = cache[name].at[layer, block_BT, slot_BT % C].set(
        new_BTKQ.astype(cache[name].dtype))
  def view(pool):
    return pool[layer][block_table_BM].reshape(B, M * C, *pool.shape[3:])
  return cache, view(cache['k']), view(cache['v'])
