"""Causal self-attention kernels with packed-document (segment id) masking.

q_BTHQ, k_BSKQ, v_BSKQ -> out_BTHQ, with H = K * G query heads sharing each key/value head.
'auto' and 'xla' call jax.nn.dot_product_attention (cuDNN flash attention on GPUs under 'auto');
'einsum' is a plain einsum + fp32 softmax that groups query heads without repeating k/v.
"""

import jax
import jax.numpy as jnp


def segment_causal_mask(segment_ids_BT):
  """[B, 1, T, T] boolean: query t sees key s iff s <= t and both are in the same document."""
  T = segment_ids_BT.shape[-1]
  causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
  same_doc_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (same_doc_BTT & causal_TT)[:, None]


def causal_attention(q_BTHQ, k_BSKQ, v_BSKQ, segment_ids_BT, implementation='auto'):
  mask_B1TS = segment_causal_mask(segment_ids_BT)
  if implementation in ('auto', 'xla'):
    return jax.nn.dot_product_attention(
        q_BTHQ, k_BSKQ, v_BSKQ, mask=mask_B1TS,
        implementation=None if implementation == 'auto' else 'xla')
  if implementation == 'einsum':
    return einsum_attention(q_BTHQ, k_BSKQ, v_BSKQ, mask_B1TS)
  raise ValueError(f'unknown attention implementation {implementation!r}')


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
