"""Self-attention kernels with packed-document (segment id) masking: causal (a decoder) or
bidirectional within each document (an encoder, causal=False).

q_BTHQ, k_BSKQ, v_BSKQ -> out_BTHQ, with H = K * G query heads sharing each key/value head.
'xla' calls jax.nn.dot_product_attention; 'einsum' is a plain einsum + fp32 softmax that groups
query heads without repeating k/v (the reference the others are tested against); 'blocked'
computes only the causal lower triangle, in blocks of query rows (fastest on CPU; causal only).
'auto' is 'blocked' on CPU and jax.nn.dot_product_attention's default elsewhere (XLA's, in jax
0.10 and 0.11: its own "defaults to XLA for now"); 'cudnn' forces that call to cuDNN's fused
flash attention (NVIDIA GPUs, bf16/fp16), which fails to trace where cuDNN cannot run it.
Bidirectional, 'auto' is 'einsum' on CPU.
"""

import jax
import jax.numpy as jnp

# A segment id for tokens that every later real token of their row attends to, whatever its own
# segment: a prefix shared by several continuations, each in a segment of its own (lm/eval
# scores a question's answers after one copy of the question this way).
SHARED_PREFIX = -1


def segment_causal_mask(segment_ids_BT):
  """[B, 1, T, T] boolean: query t sees key s iff s <= t and both are in the same document (or
  s is in a SHARED_PREFIX and t is a real token)."""
  T = segment_ids_BT.shape[-1]
  causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
  return (visible(segment_ids_BT, segment_ids_BT) & causal_TT[None])[:, None]


def segment_mask(segment_ids_BT):
  """[B, 1, T, T] boolean: query t sees every key s of its own document, before or after it (or
  in a SHARED_PREFIX); padding (segment 0) sees only padding. The encoder's mask."""
  return visible(segment_ids_BT, segment_ids_BT)[:, None]


def visible(query_segment_ids_BT, key_segment_ids_BS):
  """[B, T, S] boolean: which keys' segments each query's segment may attend to: its own, and
  SHARED_PREFIX for any real token (segment >= 1). Padding (segment 0) sees only padding."""
  q_BT1, k_B1S = query_segment_ids_BT[:, :, None], key_segment_ids_BS[:, None, :]
  return (q_BT1 == k_B1S) | ((k_B1S == SHARED_PREFIX) & (q_BT1 > 0))


def causal_attention(q_BTHQ, k_BSKQ, v_BSKQ, segment_ids_BT, implementation='auto',
                     causal: bool = True):
  """Attention within each document: to the keys at or before each query (causal), or to all of
  its document's keys (causal=False, an encoder; 'blocked' raises ValueError, as its saving is
  the skipped upper triangle, and 'auto' takes 'einsum' on CPU instead)."""
  on_cpu = implementation == 'auto' and jax.default_backend() == 'cpu'
  if not causal:
    if implementation == 'blocked':
      raise ValueError("attention implementation 'blocked' computes only the causal lower "
                       "triangle; a bidirectional encoder needs 'xla', 'einsum' or 'auto'")
    if on_cpu:
      implementation = 'einsum'
  elif implementation == 'blocked' or on_cpu:
    return blocked_attention(q_BTHQ, k_BSKQ, v_BSKQ, segment_ids_BT)
  mask_B1TS = segment_causal_mask(segment_ids_BT) if causal else segment_mask(segment_ids_BT)
  if implementation in ('auto', 'xla', 'cudnn'):
    return jax.nn.dot_product_attention(
        q_BTHQ, k_BSKQ, v_BSKQ, mask=mask_B1TS,
        implementation=None if implementation == 'auto' else implementation)
  if implementation == 'einsum':
    return einsum_attention(q_BTHQ, k_BSKQ, v_BSKQ, mask_B1TS)
  raise ValueError(f'unknown attention implementation {implementation!r}')


def cached_attention(q_BTHQ, k_BSKQ, v_BSKQ, segment_ids_BT, kv_segment_ids_BS, index):
  """T new queries, at slots index .. index + T - 1 of a KV cache of S slots, attend to every
  slot up to their own that holds their segment or SHARED_PREFIX (lm/kv_cache.py; padding is
  segment 0, which nothing attends to).

  index is one slot shared by every row (a dense cache) or one per row, [B] (a paged cache,
  whose rows are sequences of different lengths)."""
  T, S = q_BTHQ.shape[1], k_BSKQ.shape[1]
  query_slot_BT = jnp.reshape(index, (-1, 1)) + jnp.arange(T)[None, :]
  causal_BTS = query_slot_BT[:, :, None] >= jnp.arange(S)[None, None, :]
  return einsum_attention(q_BTHQ, k_BSKQ, v_BSKQ,
                          (visible(segment_ids_BT, kv_segment_ids_BS) & causal_BTS)[:, None])


def einsum_attention(q_BTHQ, k_BSKQ, v_BSKQ, mask_B1TS):
  B, T, H, Q = q_BTHQ.shape
  K = k_BSKQ.shape[2]
  q_BTKGQ = q_BTHQ.reshape(B, T, K, H // K, Q)
  logits_BKGTS = jnp.einsum('btkgq,bskq->bkgts', q_BTKGQ, k_BSKQ,
                            preferred_element_type=jnp.float32) * Q ** -0.5
  logits_BKGTS = jnp.where(mask_B1TS[:, :, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKQ.dtype)
  out_BTKGQ = jnp.einsum('bkgts,bskq->btkgq', probs_BKGTS, v_BSKQ)
  return out_BTKGQ.reshape(B, T, H, Q)


def blocked_attention(q_BTHQ, k_BSKQ, v_BSKQ, segment_ids_BT, block_size: int = 64):
  """Causal attention computed block row by block row, skipping the blocks above the diagonal.

  Query block i (rows i*b .. i*b + b) attends to keys 0 .. i*b + b only, with an exact softmax
  over that whole prefix, so no online-softmax rescaling is needed and every slice is static.
  That skips (n - 1) / 2n of the score and value matmuls and of the softmax for n blocks
  (37.5% at T = 4b). Heads are moved next to batch ([B, K, G, T, Q]) so each matmul is a batch
  of [G*b, Q] x [Q, S] products, the layout XLA:CPU runs fastest. T need not divide by b.
  """
  B, T, H, Q = q_BTHQ.shape
  K = k_BSKQ.shape[2]
  q_BKGTQ = (q_BTHQ * Q ** -0.5).reshape(B, T, K, H // K, Q).transpose(0, 2, 3, 1, 4)
  k_BKSQ = k_BSKQ.transpose(0, 2, 1, 3)
  v_BKSQ = v_BSKQ.transpose(0, 2, 1, 3)
  out_blocks = []
  for start in range(0, T, block_size):
    stop = min(start + block_size, T)  # This block's queries see keys [0, stop).
    logits_BKGtS = jnp.einsum('bkgtq,bksq->bkgts', q_BKGTQ[:, :, :, start:stop],
                              k_BKSQ[:, :, :stop], preferred_element_type=jnp.float32)
    same_doc_BtS = visible(segment_ids_BT[:, start:stop], segment_ids_BT[:, :stop])
    causal_tS = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
    mask_B11tS = (same_doc_BtS & causal_tS[None])[:, None, None]
    logits_BKGtS = jnp.where(mask_B11tS, logits_BKGtS, jnp.finfo(jnp.float32).min)
    probs_BKGtS = jax.nn.softmax(logits_BKGtS, axis=-1).astype(v_BSKQ.dtype)
    out_blocks.append(jnp.einsum('bkgts,bksq->bkgtq', probs_BKGtS, v_BKSQ[:, :, :stop]))
  out_BKGTQ = jnp.concatenate(out_blocks, axis=3)
  return out_BKGTQ.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Q)
