"""Mixture of Experts feed-forward (config.model.moe): a router picks top_k of E expert MLPs per token.

Shapes as in lm/model.py, plus E experts, K = top_k choices per token, N tokens (B * T), A = N * K
token-expert assignments, G groups (rows) of S tokens, C capacity slots per expert and group.

Routing (Switch, GShard, Mixtral): router logits x W_r in fp32, softmax over experts, the top_k
experts per token. With top_k > 1 the chosen probabilities are renormalised to sum to one
(Mixtral); with top_k = 1 the raw probability weights the expert's output (Switch), so the
router still gets a gradient through it.

Two ways to run the experts, both computing the same function while no token is dropped:
  capacity  (capacity_factor > 0; GShard, Switch): each row is a group whose tokens fill
            C = ceil(capacity_factor * top_k * S / E) slots per expert, first choices before
            second choices and earlier tokens first; assignments beyond an expert's C slots are
            dropped (that expert adds nothing to the token; the residual carries it). Tokens are
            moved with one-hot dispatch/combine einsums into an [G, E, C, D] buffer whose expert
            axis is split over config.mesh.expert, so under jit XLA moves the tokens with an
            all-to-all: expert parallelism.
  dropless  (capacity_factor = 0; MegaBlocks, MaxText's megablox path): the A assignments are
            sorted by expert and every one is computed, with jax.lax.ragged_dot (grouped matmuls
            on GPU/TPU; on CPU XLA computes it as E masked matmuls, so it is slow there). The
            experts' weights are gathered where the tokens are: no expert parallelism.

Auxiliary losses (returned per layer, weighted and added to the objective in lm/train.py):
  load balance (Switch eq. 4): E * sum_e f_e * P_e, with f_e the share of assignments routed to
            expert e and P_e its mean router probability; 1 at uniform routing, E when one expert
            takes everything;
  router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(router logits)^2, keeping the
            router's logits small.
Padding tokens (segment id 0) are left out of both and take no capacity.
"""

import math

import jax
import jax.numpy as jnp

from lm import sharding


def capacity_moe(x_GSD, weights_GSK, experts_GSK, token_mask_GS, experts_fn, *,
                 num_experts: int, capacity_factor: float, dtype):
  """Each row a group with C slots per expert: dispatch into an [E, G, C, D] buffer (split over
  the 'act_expert' mesh axes), experts_fn on it, combine; returns (out_GSD, kept_GSK)."""
  G, S, D = x_GSD.shape
  E, K = num_experts, experts_GSK.shape[-1]
  C = capacity(capacity_factor, K, S, E)
  # Priority: every token's first choice, then every second choice, ... (GShard's order).
  chosen_GKSE = jax.nn.one_hot(experts_GSK.swapaxes(1, 2), E, dtype=jnp.int32)
  chosen_GKSE = chosen_GKSE * token_mask_GS[:, None, :, None].astype(jnp.int32)
  slot_GKSE = jnp.cumsum(chosen_GKSE.reshape(G, K * S, E), axis=1).reshape(G, K, S, E) - 1
  slot_GKS = jnp.sum(slot_GKSE * chosen_GKSE, axis=-1)
  kept_GKS = (slot_GKS < C) & (chosen_GKSE.sum(-1) > 0)
  # dispatch[g, s, e, c] = 1 where token s of group g fills slot c of expert e.
  slot_GKSC = jax.nn.one_hot(jnp.where(kept_GKS, slot_GKS, C), C, dtype=jnp.float32)
  chosen_GKSE = chosen_GKSE.astype(jnp.float32)
  dispatch_GSEC = jnp.einsum('gkse,gksc->gsec', chosen_GKSE, slot_GKSC)
  combine_GSEC = jnp.einsum('gkse,gksc,gsk->gsec', chosen_GKSE, slot_GKSC, weights_GSK)
  x_EGCD = jnp.einsum('gsec,gsd->egcd', dispatch_GSEC.astype(dtype), x_GSD)
  x_EGCD = sharding.constrain(x_EGCD, ('act_expert', 'act_expert_batch', None, 'act_embed'))
  y_EGCD = experts_fn(x_EGCD)
  y_EGCD = sharding.constrain(y_EGCD, ('act_expert', 'act_expert_batch', None, 'act_embed'))
  out_GSD = jnp.einsum('gsec,egcd->gsd', combine_GSEC.astype(dtype), y_EGCD)
  return out_GSD, kept_GKS.swapaxes(1, 2)


def dropless_moe(x_BTD, weights_BTK, experts_BTK, experts_fn, *, num_experts: int):
  """Every assignment computed: sorted by expert, experts_fn(rows_AD, expert_of_row_A,
  group_sizes_E) as grouped matmuls, unsorted, weighted; returns out_BTD."""
  B, T, D = x_BTD.shape
  K = experts_BTK.shape[-1]
  x_ND = x_BTD.reshape(B * T, D)
  expert_A = experts_BTK.reshape(-1)
  order_A = jnp.argsort(expert_A, stable=True)
  token_A = order_A // K  # Assignment a = n * K + k belongs to token n.
  group_sizes_E = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
  y_sorted_AD = experts_fn(jnp.take(x_ND, token_A, axis=0), expert_A[order_A], group_sizes_E)
  y_AD = jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD, unique_indices=True)
  y_NKD = y_AD.reshape(B * T, K, D)
  out_ND = jnp.einsum('nkd,nk->nd', y_NKD, weights_BTK.reshape(B * T, K).astype(y_NKD.dtype))
  return out_ND.reshape(B, T, D)


def capacity(capacity_factor: float, top_k: int, group_tokens: int, num_experts: int) -> int:
  """Slots per expert in a group: ceil(capacity_factor * top_k * S / E), at least 1."""
  return max(1, math.ceil(capacity_factor * top_k * group_tokens / num_experts))


def route(x_BTD, w_router_DE, top_k: int, token_mask_BT):
  """(weights_BTK fp32, experts_BTK int32, aux) from the router; see the module docstring."""
  E = w_router_DE.shape[-1]
  logits_BTE = jnp.einsum('btd,de->bte', x_BTD.astype(jnp.float32),
                          w_router_DE.astype(jnp.float32))
  probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
  top_BTK, experts_BTK = jax.lax.top_k(probs_BTE, top_k)
  weights_BTK = top_BTK / top_BTK.sum(-1, keepdims=True) if top_k > 1 else top_BTK

  mask_BT = token_mask_BT.astype(jnp.float32)
  tokens = jnp.maximum(mask_BT.sum(), 1.0)
  assigned_BTE = jax.nn.one_hot(experts_BTK, E, dtype=jnp.float32).sum(-2)
  share_E = jnp.einsum('bte,bt->e', assigned_BTE, mask_BT) / (tokens * top_k)
  mean_prob_E = jnp.einsum('bte,bt->e', probs_BTE, mask_BT) / tokens
  log_z_BT = jax.nn.logsumexp(logits_BTE, axis=-1)
  aux = {
      'load_balance': E * jnp.sum(jax.lax.stop_gradient(share_E) * mean_prob_E),
      'router_z': jnp.sum(log_z_BT ** 2 * mask_BT) / tokens,
      'expert_share': share_E,
  }
  return weights_BTK, experts_BTK.astype(jnp.int32), aux
