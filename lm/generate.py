"""Text generation with a KV cache: sampling (greedy, temperature, top-k, top-p) and beam search.

`sample` and `beam_search` take prompts (strings with a tokenizer, or token ids) and return one
`Completion` per result. Prompts of different lengths are left-padded into one batch
(lm/kv_cache.py explains why): the prompt runs through the model once (prefill), then one token
per step is decoded inside a jitted while_loop that stops when every row has emitted a stop
token. Each row draws its random numbers from its own seed, so a row's output never depends on
which other prompts share its batch. `load` restores a trained model from a workdir.

Params may be quantized (lm/quantize.py; `load(..., keep_quantized=True)` keeps a quantized
checkpoint so): the model then dequantizes each weight where it reads it, inside the jitted loop.
"""

import bisect
import dataclasses
import functools
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lm import kv_cache
from lm import lora
from lm import model as model_lib
from lm import quantize
from lm import tokenizer as tokenizer_lib


class GenerationError(ValueError):
  """Arguments generation cannot run with (a prompt too long for the model, an empty prompt, a
  bad sampling setting); the message names the argument."""


@dataclasses.dataclass
class Completion:
  """One generated sequence, ending where decoding stopped.

  `tokens` end with the token that ended decoding, kept: a stop token, or the first token at
  which the text decoded so far holds a stop string (where a reader of the stream would stop).
  `text` is those tokens decoded, less a final stop token, cut just before the first stop
  string in it. So text is a prefix of decode(tokens) and logprobs cover exactly the tokens
  chosen; text == decode(tokens) cannot hold in general, as one piece may hold text on both
  sides of a stop string ('a\\n' with the stop string '\\n').
  """
  tokens: list[int]  # Generated tokens (prompt excluded).
  logprobs: list[float]  # The model's log-probability of each token (unscaled, unfiltered).
  text: str | None  # None without a tokenizer.
  finish_reason: str  # 'stop_token', 'stop_string' or 'length'.
  score: float | None = None  # Beam search: sum(logprobs) / len(tokens) ** length_alpha.


# ---------------------------------------------------------------------------------------------
# Choosing the next token.

def filter_logits(logits_BV, temperature, top_k, top_p):
  """Logits divided by temperature, -inf outside the top k and outside the nucleus.

  The nucleus is the smallest set of most likely tokens whose probability (after top-k) reaches
  top_p; top_k=0 and top_p=1 disable those filters. Equal logits rank by token id, the lower
  first (as argmax picks), so top-k keeps exactly k tokens even among ties, and the nucleus
  exactly its set. The arguments may be traced scalars, so one compilation serves every setting.
  """
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  B, V = logits_BV.shape
  order_BV = jnp.argsort(-logits_BV, axis=-1)  # Stable: ties stay in token-id order.
  sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  in_top_k_V = jnp.arange(V) < k
  probs_BV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BV, -jnp.inf), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_sorted_BV = in_top_k_V[None, :] & ((mass_before_BV < top_p) | (top_p >= 1))
  keep_BV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], order_BV].set(keep_sorted_BV)
  return jnp.where(keep_BV, logits_BV, -jnp.inf)


def choose_tokens(logits_BV, keys_B, temperature, top_k, top_p, *, greedy: bool = False):
  """Next token per row: the argmax if greedy, else a draw with the row's own key."""
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered_BV = filter_logits(logits_BV, temperature, top_k, top_p)
  return jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Batching prompts.

def left_pad(prompts: list[list[int]], multiple: int = 16, pad_id: int = 0):
  """Prompts right-aligned in one [B, P] batch: (tokens, segment_ids, positions), numpy int32.

  Padding is segment 0, which real tokens (segment 1) never attend to; positions count from each
  prompt's first token, so every row sees exactly what it would alone. P is the longest prompt
  rounded up to a multiple of `multiple`, so prompts of similar lengths share one compilation.
  """
  P = -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens_BP = np.full((len(prompts), P), pad_id, np.int32)
  segment_ids_BP = np.zeros((len(prompts), P), np.int32)
  positions_BP = np.zeros((len(prompts), P), np.int32)
  for row, prompt in enumerate(prompts):
    start = P - len(prompt)
    tokens_BP[row, start:] = prompt
    segment_ids_BP[row, start:] = 1
    positions_BP[row, start:] = np.arange(len(prompt))
  return tokens_BP, segment_ids_BP, positions_BP


def _prefill(graphdef, params, tokens_BP, segment_ids_BP, positions_BP, max_new_tokens: int):
  """Runs the prompts into a fresh cache with room for max_new_tokens more; returns (last
  logits_BV, cache, position of each row's next token).

  An encoder_decoder model's prompts are its inputs: the encoder runs once, the first decoder
  step (decoder_start_id) writes every layer's cross-attention keys and values of them into the
  cache, and decoding goes on from position 1. A decoder's soft prompt (config.peft.kind=
  'prompt', lm/peft.py) is written before the prompts, in slots of its own."""
  model = nnx.merge(graphdef, params)
  cfg, B = model.cfg, tokens_BP.shape[0]
  if cfg.kind == 'encoder_decoder':
    cache = kv_cache.init(cfg, B, 1 + max_new_tokens, input_segment_ids_BS=segment_ids_BP)
    encoded_BPD, _ = model.encode(tokens_BP, segment_ids_BP, positions_BP)
    start_B1 = jnp.full((B, 1), cfg.decoder_start_id, jnp.int32)
    logits_B1V, cache = model(start_B1, jnp.ones_like(start_B1), jnp.zeros_like(start_B1), cache,
                              memory=(encoded_BPD, segment_ids_BP))
    return logits_B1V[:, -1], cache, jnp.ones((B,), jnp.int32)
  cache = kv_cache.init(cfg, B, cfg.prompt_tokens + tokens_BP.shape[1] + max_new_tokens)
  if cfg.prompt_tokens:  # The soft prompt (lm/peft.py) fills the first slots of every row.
    cache = model.prefill_prompt(cache)
  logits_BPV, cache = model_lib.apply(
      graphdef, params, tokens_BP, segment_ids_BP, positions_BP, cache)
  return logits_BPV[:, -1], cache, jnp.max(positions_BP, axis=1) + 1


def _decode_step(graphdef, params, tokens_B, positions_B, cache):
  """One token per row through the model: (logits_BV, cache)."""
  tokens_B1, positions_B1 = tokens_B[:, None], positions_B[:, None]
  logits_B1V, cache = model_lib.apply(
      graphdef, params, tokens_B1, jnp.ones_like(tokens_B1), positions_B1, cache)
  return logits_B1V[:, 0], cache


def _pieces_only(logits_BV, num_pieces):
  """-inf beyond the tokenizer's pieces: the rows that pad the vocabulary are not tokens."""
  return jnp.where(jnp.arange(logits_BV.shape[-1]) < num_pieces, logits_BV, -jnp.inf)


def _num_pieces(tokenizer, cfg) -> np.int32:
  return np.int32(min(getattr(tokenizer, 'vocab_size', cfg.vocab_size), cfg.vocab_size))


def _token_logprobs(logits_BV, tokens_B):
  return jnp.take_along_axis(jax.nn.log_softmax(logits_BV), tokens_B[:, None], -1)[:, 0]


# ---------------------------------------------------------------------------------------------
# Sampling.

@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'greedy'))
def _sample(graphdef, params, tokens_BP, segment_ids_BP, positions_BP, seeds_B, stop_tokens_N,
            stop_pieces_M, temperature, top_k, top_p, num_pieces, *, max_new_tokens, greedy):
  """Generated tokens_BN and logprobs_BN (N = max_new_tokens) and each row's count until and
  including its first stop token, or stop piece after its first token (N if none). Only ids
  below num_pieces are ever chosen."""
  B = tokens_BP.shape[0]
  logits_BV, cache, next_position_B = _prefill(
      graphdef, params, tokens_BP, segment_ids_BP, positions_BP, max_new_tokens)
  keys_B = jax.vmap(jax.random.key)(seeds_B)

  def body(state):
    step, logits_BV, cache, out_BN, logprobs_BN, done_B, lengths_B = state
    logits_BV = _pieces_only(logits_BV, num_pieces)
    step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, step)
    token_B = choose_tokens(logits_BV, step_keys_B, temperature, top_k, top_p, greedy=greedy)
    token_B = jnp.where(done_B, 0, token_B)
    out_BN = out_BN.at[:, step].set(token_B)
    logprobs_BN = logprobs_BN.at[:, step].set(_token_logprobs(logits_BV, token_B))
    lengths_B = lengths_B + ~done_B
    done_B = (done_B | jnp.isin(token_B, stop_tokens_N)
              | ((step > 0) & jnp.isin(token_B, stop_pieces_M)))
    logits_BV, cache = _decode_step(graphdef, params, token_B, next_position_B + step, cache)
    return step + 1, logits_BV, cache, out_BN, logprobs_BN, done_B, lengths_B

  def cond(state):
    step, done_B = state[0], state[5]
    return (step < max_new_tokens) & ~jnp.all(done_B)

  zeros_BN = jnp.zeros((B, max_new_tokens), jnp.int32)
  init = (0, logits_BV, cache, zeros_BN, zeros_BN.astype(jnp.float32),
          jnp.zeros(B, bool), jnp.zeros(B, jnp.int32))
  _, _, _, out_BN, logprobs_BN, _, lengths_B = jax.lax.while_loop(cond, body, init)
  return out_BN, logprobs_BN, lengths_B


def sample(graphdef, params, prompts, *, tokenizer=None, max_new_tokens: int = 64,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           stop_tokens=None, stop_strings=(), seed=0, add_bos: bool = True,
           prompt_len: int | None = None) -> list[Completion]:
  """One completion per prompt, all decoded together in one batch.

  prompts: strings (encoded with `tokenizer`, after BOS unless add_bos=False) or token-id lists;
  an encoder_decoder model's are its inputs (strings also get EOS at the end, as in training)
  and the completions its decoder's outputs.
  temperature=0 is greedy and deterministic; top_k / top_p restrict sampling to the k most
  likely tokens / the nucleus of probability mass top_p (both together: top-k first).
  stop_tokens default to the tokenizer's EOS. seed: an int (row i uses seed + i) or one seed per
  prompt; a prompt's completion depends only on its own seed. prompt_len: left-pad the prompts
  to exactly this many tokens (e.g. a length bucket, so batches share one compilation).
  """
  _check_sampling(temperature, top_k, top_p)
  token_prompts = _encode(prompts, tokenizer, add_bos, _is_seq2seq(graphdef, params))
  cfg = _check_lengths(graphdef, params, token_prompts, max_new_tokens)
  seeds = _seeds(seed, len(token_prompts))
  stop_tokens = _stop_tokens(stop_tokens, tokenizer, stop_strings)
  longest = max(map(len, token_prompts))
  if prompt_len is not None and prompt_len < longest:
    raise GenerationError(f'prompt_len={prompt_len} is shorter than the longest prompt ({longest})')
  tokens_BP, segment_ids_BP, positions_BP = left_pad(token_prompts, multiple=prompt_len or 16)
  out_BN, logprobs_BN, lengths_B = _sample(
      graphdef, params, tokens_BP, segment_ids_BP, positions_BP, np.asarray(seeds, np.uint32),
      _stop_array(stop_tokens), _stop_array(_pieces_holding(tokenizer, stop_strings, stop_tokens)),
      np.float32(temperature), np.int32(min(top_k, cfg.vocab_size)),
      np.float32(top_p), _num_pieces(tokenizer, cfg), max_new_tokens=max_new_tokens,
      greedy=temperature == 0)
  out_BN, logprobs_BN, lengths_B = jax.device_get((out_BN, logprobs_BN, lengths_B))
  return [_completion(out_BN[b, :lengths_B[b]], logprobs_BN[b, :lengths_B[b]], stop_tokens,
                      stop_strings, tokenizer) for b in range(len(token_prompts))]


def greedy(graphdef, params, prompt: list[int], num_tokens: int) -> list[int]:
  """The prompt followed by num_tokens greedily chosen tokens (no stop tokens)."""
  if not prompt:
    raise GenerationError('greedy decoding needs a non-empty prompt (e.g. [tokenizer.bos_id])')
  [completion] = sample(graphdef, params, [prompt], max_new_tokens=num_tokens, temperature=0.0,
                        stop_tokens=[])
  return list(prompt) + completion.tokens


# ---------------------------------------------------------------------------------------------
# Beam search.

@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'num_beams'))
def _beam_search(graphdef, params, tokens_BP, segment_ids_BP, positions_BP, stop_tokens_N,
                 length_alpha, num_pieces, *, max_new_tokens, num_beams):
  """W = num_beams beams per prompt, best first: tokens_BWN, logprobs_BWN, lengths_BW and
  normalised scores_BW.

  Every step extends each live beam by every token and keeps the W best of the W x V candidates
  by score / length^alpha; a finished beam (it emitted a stop token) competes with its final
  normalised score by continuing with a 0-cost padding token that does not count in its length.
  """
  B = tokens_BP.shape[0]
  W, N = num_beams, max_new_tokens
  logits_BV, cache, next_position_B = _prefill(
      graphdef, params, tokens_BP, segment_ids_BP, positions_BP, N)
  rows_R = jnp.repeat(jnp.arange(B), W)  # Beam rows R = B * W, prompt-major.
  cache = kv_cache.gather_rows(cache, rows_R)
  logits_RV = logits_BV[rows_R]
  next_position_R = next_position_B[rows_R]

  def normalised(score, length):
    return score / jnp.maximum(length, 1).astype(jnp.float32) ** length_alpha

  def body(state):
    step, logits_RV, cache, out_BWN, logprobs_BWN, score_BW, length_BW, done_BW = state
    V = logits_RV.shape[-1]
    logprobs_BWV = jax.nn.log_softmax(_pieces_only(logits_RV, num_pieces)).reshape(B, W, V)
    pad_only_V = jnp.where(jnp.arange(V) == 0, 0.0, -jnp.inf)
    logprobs_BWV = jnp.where(done_BW[..., None], pad_only_V, logprobs_BWV)
    candidate_BWV = score_BW[..., None] + logprobs_BWV
    candidate_length_BW1 = (length_BW + ~done_BW)[..., None]
    ranked_BWV = normalised(candidate_BWV, candidate_length_BW1)
    _, best_BW = jax.lax.top_k(ranked_BWV.reshape(B, W * V), W)
    beam_BW, token_BW = best_BW // V, (best_BW % V).astype(jnp.int32)

    def take(x_BW):
      return jnp.take_along_axis(x_BW, beam_BW.reshape(B, W, *[1] * (x_BW.ndim - 2)), axis=1)
    was_done_BW = take(done_BW)
    out_BWN = take(out_BWN).at[:, :, step].set(token_BW)
    token_logprob_BW = jnp.take_along_axis(
        take(logprobs_BWV), token_BW[..., None], -1)[..., 0]
    logprobs_BWN = take(logprobs_BWN).at[:, :, step].set(token_logprob_BW)
    score_BW = take(score_BW) + token_logprob_BW
    length_BW = take(length_BW) + ~was_done_BW
    done_BW = was_done_BW | jnp.isin(token_BW, stop_tokens_N)
    source_rows_R = (jnp.arange(B)[:, None] * W + beam_BW).reshape(-1)
    cache = kv_cache.gather_rows(cache, source_rows_R)
    logits_RV, cache = _decode_step(graphdef, params, token_BW.reshape(-1),
                                    next_position_R + step, cache)
    return step + 1, logits_RV, cache, out_BWN, logprobs_BWN, score_BW, length_BW, done_BW

  def cond(state):
    return (state[0] < N) & ~jnp.all(state[-1])

  first_beam_only_BW = jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf)[None, :] * jnp.ones((B, 1))
  init = (0, logits_RV, cache, jnp.zeros((B, W, N), jnp.int32), jnp.zeros((B, W, N)),
          first_beam_only_BW, jnp.zeros((B, W), jnp.int32), jnp.zeros((B, W), bool))
  state = jax.lax.while_loop(cond, body, init)
  out_BWN, logprobs_BWN, score_BW, length_BW = state[3], state[4], state[5], state[6]
  scores_BW = normalised(score_BW, length_BW)
  order_BW = jnp.argsort(-scores_BW, axis=1)

  def take(x):
    return jnp.take_along_axis(x, order_BW.reshape(B, W, *[1] * (x.ndim - 2)), axis=1)
  return take(out_BWN), take(logprobs_BWN), take(length_BW), take(scores_BW)


def beam_search(graphdef, params, prompts, *, tokenizer=None, max_new_tokens: int = 64,
                num_beams: int = 4, num_return: int = 1, length_alpha: float = 1.0,
                stop_tokens=None, stop_strings=(), add_bos: bool = True
                ) -> list[list[Completion]]:
  """The num_return best of num_beams beams per prompt, best first, ranked by
  sum(logprobs) / length^length_alpha (alpha=0: raw log-probability, favouring short outputs).

  Prompts, stop tokens and stop strings as in `sample` (stop strings cut the text after the
  search; they do not steer it).
  """
  if not 1 <= num_return <= num_beams:
    raise GenerationError(f'num_return={num_return} must be between 1 and num_beams={num_beams}')
  if length_alpha < 0:
    raise GenerationError(f'length_alpha={length_alpha} must be >= 0')
  token_prompts = _encode(prompts, tokenizer, add_bos, _is_seq2seq(graphdef, params))
  cfg = _check_lengths(graphdef, params, token_prompts, max_new_tokens)
  if num_beams > cfg.vocab_size:
    raise GenerationError(f'num_beams={num_beams} exceeds the vocabulary size {cfg.vocab_size}')
  stop_tokens = _stop_tokens(stop_tokens, tokenizer, stop_strings)
  tokens_BP, segment_ids_BP, positions_BP = left_pad(token_prompts)
  results = _beam_search(
      graphdef, params, tokens_BP, segment_ids_BP, positions_BP,
      _stop_array(stop_tokens), np.float32(length_alpha), _num_pieces(tokenizer, cfg),
      max_new_tokens=max_new_tokens, num_beams=num_beams)
  out_BWN, logprobs_BWN, lengths_BW, scores_BW = jax.device_get(results)
  return [[dataclasses.replace(
      _completion(out_BWN[b, w, :lengths_BW[b, w]], logprobs_BWN[b, w, :lengths_BW[b, w]],
                  stop_tokens, stop_strings, tokenizer), score=float(scores_BW[b, w]))
           for w in range(num_return)] for b in range(len(token_prompts))]


# ---------------------------------------------------------------------------------------------
# Inputs and outputs.

def _check_sampling(temperature, top_k, top_p) -> None:
  if not temperature >= 0:
    raise GenerationError(f'temperature={temperature} must be >= 0 (0: greedy)')
  if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
    raise GenerationError(f'top_k={top_k!r} must be an integer >= 0 (0: no top-k filter)')
  if not 0 < top_p <= 1:
    raise GenerationError(f'top_p={top_p} must be in (0, 1] (1: no nucleus filter)')


def _is_seq2seq(graphdef, params) -> bool:
  return nnx.merge(graphdef, params).cfg.kind == 'encoder_decoder'


def _encode(prompts, tokenizer, add_bos: bool, add_eos: bool = False) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or not prompts:
    raise GenerationError(f'prompts must be a non-empty list (of strings or token-id lists), got '
                     f'{prompts!r}')
  encoded = []
  for i, prompt in enumerate(prompts):
    if isinstance(prompt, str):
      if tokenizer is None:
        raise GenerationError(f'prompt {i} is a string: pass tokenizer= to encode it')
      prompt = (([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(prompt)
                + ([tokenizer.eos_id] if add_eos else []))
    prompt = [int(t) for t in prompt]
    if not prompt:
      raise GenerationError(f'prompt {i} is empty; start it with BOS (add_bos=True) at least')
    encoded.append(prompt)
  return encoded


def _check_lengths(graphdef, params, prompts, max_new_tokens: int) -> model_lib.ModelConfig:
  """The model config, after checking every prompt's tokens are in the vocabulary and fit."""
  cfg = nnx.merge(graphdef, params).cfg
  if max_new_tokens < 1:
    raise GenerationError(f'max_new_tokens={max_new_tokens} must be at least 1')
  if cfg.kind == 'encoder':
    raise GenerationError("config.model.kind='encoder' attends both ways and has no KV cache: "
                          'generation needs a decoder or an encoder_decoder model')
  seq2seq = cfg.kind == 'encoder_decoder'
  if seq2seq and 1 + max_new_tokens > cfg.max_seq_len:
    raise GenerationError(f'max_new_tokens={max_new_tokens} and the decoder start token exceed '
                          f"the model's max_seq_len={cfg.max_seq_len}")
  for i, prompt in enumerate(prompts):
    if seq2seq and len(prompt) > cfg.max_seq_len:
      raise GenerationError(f"input {i} has {len(prompt)} tokens, more than the model's "
                            f'max_seq_len={cfg.max_seq_len}')
    if not seq2seq and cfg.prompt_tokens + len(prompt) + max_new_tokens > cfg.max_seq_len:
      soft = f' and the {cfg.prompt_tokens} soft-prompt positions' if cfg.prompt_tokens else ''
      raise GenerationError(
          f'prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens}{soft} that '
          f'exceeds the model\'s max_seq_len={cfg.max_seq_len}')
    if not all(0 <= t < cfg.vocab_size for t in prompt):
      raise GenerationError(f'prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size})')
  return cfg


def _seeds(seed, count: int) -> list[int]:
  if isinstance(seed, (int, np.integer)):
    return [int(seed) + i for i in range(count)]
  seeds = [int(s) for s in seed]
  if len(seeds) != count:
    raise GenerationError(f'{len(seeds)} seeds for {count} prompts; give one per prompt or an int')
  return seeds


def _stop_array(stop_tokens: list[int]) -> np.ndarray:
  """Stop tokens padded with -1 (never a token) to a multiple of 8 entries: one compilation."""
  size = max(8, -(-len(stop_tokens) // 8) * 8)
  return np.asarray(stop_tokens + [-1] * (size - len(stop_tokens)), np.int32)


def _pieces_holding(tokenizer, stop_strings, stop_tokens) -> list[int]:
  """Pieces (besides stop_tokens) whose text contains a stop string: a row that emits one after
  its first token has reached the string, so decoding stops there instead of running on to
  max_new_tokens (Completion says what is kept). Not at the first token: decoding drops a
  leading space there (SentencePiece's dummy prefix), which may be what held the string.
  Strings spanning several pieces are still found when decoding ends."""
  if not stop_strings or not hasattr(tokenizer, 'piece_texts'):
    return []
  return [i for i, text in enumerate(tokenizer.piece_texts())
          if text and i not in stop_tokens and any(s in text for s in stop_strings)]


def _stop_tokens(stop_tokens, tokenizer, stop_strings) -> list[int]:
  if stop_strings and tokenizer is None:
    raise GenerationError('stop_strings need tokenizer= to decode the generated tokens')
  if stop_tokens is None:
    return [tokenizer.eos_id] if tokenizer is not None else []
  return [int(t) for t in stop_tokens]


def _completion(tokens, logprobs, stop_tokens, stop_strings, tokenizer) -> Completion:
  """Host-side finish: the reason decoding stopped and the text, both cut as Completion says."""
  tokens, logprobs = [int(t) for t in tokens], [float(x) for x in logprobs]
  reason = 'stop_token' if tokens and tokens[-1] in stop_tokens else 'length'
  if tokenizer is None:
    return Completion(tokens, logprobs, None, reason)
  body = tokens[:-1] if reason == 'stop_token' else tokens
  text = tokenizer.decode(body)
  if _first_stop(text, stop_strings) < 0:
    return Completion(tokens, logprobs, text, reason)
  # The fewest tokens whose text holds a stop string (a longer prefix only adds text).
  n = 1 + bisect.bisect_left(
      range(1, len(body) + 1), True,
      key=lambda n: _first_stop(tokenizer.decode(body[:n]), stop_strings) >= 0)
  text = tokenizer.decode(body[:n])
  return Completion(tokens[:n], logprobs[:n], text[:_first_stop(text, stop_strings)],
                    'stop_string')


def _first_stop(text: str, stop_strings) -> int:
  """Where the earliest stop string in text begins; -1 if it holds none."""
  return min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)


def load(config, workdir: str, keep_quantized: bool = False):
  """(graphdef, params, tokenizer) from the newest checkpoint in workdir/checkpoints, with the
  parameters placed on config.mesh (generate inside `sharding.active` to keep them there).
  Quantized weights (lm.quantize) are dequantized to float, or with keep_quantized stay
  quantized (QuantizedArrays, which sample and beam_search take like float weights).

  The model and tokenizer fields come from the run's saved workdir/config.json when there is
  one (else from `config`); the tokenizer is data.tokenizer, or the one training put in
  workdir/tokenizer.
  """
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
    raise FileNotFoundError(
        f'no checkpoint in {directory}: train first (python -m lm.main --config ... '
        f'--workdir {workdir}) or pass the --workdir of a trained run')
  config = _with_run_model(config, workdir)
  tokenizer_path = config.data.tokenizer or os.path.join(workdir, 'tokenizer', 'spm.model')
  tokenizer = tokenizer_lib.Tokenizer(tokenizer_path)
  graphdef, params = _restore(config, directory, config.model.dtype, keep_quantized)
  return graphdef, params, tokenizer


def load_checkpoint(checkpoint: str, *, dtype: str = 'auto', mesh_config=None, rules: str = '',
                    keep_quantized: bool = False):
  """(graphdef, params, tokenizer, config) of any lm checkpoint: a training workdir or one of its
  steps, or an lm.convert / lm.vocab / lm.prune / lm.quantize output directory; LoRA adapters
  merged; quantized weights kept as `load` keeps them.

  The model comes from the config.json in the checkpoint or up to two directories above (the
  run's root); the tokenizer is its data.tokenizer, else ROOT/tokenizer/spm.model (what training
  trains), else ROOT/tokenizer.model (an imported or moved directory). The parameters are placed
  on mesh_config (default: the run's config.mesh) and run in `dtype` ('auto': lm.flops'
  choice for this machine).
  """
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f'checkpoint {checkpoint} does not exist (an lm checkpoint directory)')
  config = config_lib.checkpoint_config(checkpoint)
  with config.unlocked():
    if mesh_config is not None:
      config.mesh = mesh_config
    if rules:
      config.mesh.rules = rules
  tokenizer = tokenizer_lib.Tokenizer(find_tokenizer(checkpoint, config))
  graphdef, params = _restore(config, checkpoint, dtype, keep_quantized)
  return graphdef, params, tokenizer, config


def find_tokenizer(checkpoint: str, config) -> str:
  """The SentencePiece model file of a checkpoint (load_checkpoint says where it looks)."""
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  root = config_lib.run_directory(checkpoint)
  candidates = [config.data.tokenizer] if config.data.tokenizer else []
  candidates += [os.path.join(root, 'tokenizer', 'spm.model'), os.path.join(root, 'tokenizer.model')]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f'{checkpoint} has no tokenizer: none of {candidates} exists (config.data.tokenizer names '
      'the SentencePiece model a run was trained with; copy it there or next to config.json as '
      'tokenizer.model)')


def _restore(config, checkpoint: str, dtype: str, keep_quantized: bool = False):
  """(graphdef, params) of `checkpoint` for config.model, sharded over config.mesh, LoRA merged;
  quantized weights as QuantizedArrays with keep_quantized, else dequantized."""
  from lm import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from lm import flops, sharding  # pylint: disable=g-import-not-at-top
  cfg = model_lib.ModelConfig.from_config(config, flops.resolve_dtype(dtype))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.parse_rules(config.mesh.rules)
  abstract = jax.eval_shape(functools.partial(model_lib.init_params, cfg, 0))
  shardings = sharding.tree_shardings(model_lib.logical_axes(cfg), abstract, mesh, rules)
  target = jax.tree.map(lambda a, where: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where),
                        abstract, shardings)
  params = quantize.dequantize_on_read(
      checkpoint_lib.restore_params(checkpoint, target, keep_quantized=keep_quantized))
  if cfg.lora_rank:  # Fold the adapters in: generation then costs what the base model's does.
    params = lora.merge(params, cfg)
    cfg = dataclasses.replace(cfg, lora_rank=0, lora_targets=())
    params = jax.device_put(params, sharding.tree_shardings(
        model_lib.logical_axes(cfg), params, mesh, rules))
  return model_lib.graphdef(cfg), params


def _with_run_model(config, workdir: str):
  """config with model and data.tokenizer as the run in workdir saved them (config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return config
  with open(path) as f:
    saved = json.load(f)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.update(saved.get('model', {}))
    config.lora.update(saved.get('lora', {}))
    config.data.tokenizer = saved.get('data', {}).get('tokenizer', config.data.tokenizer)
  return config


def read_prompts(sample_config) -> list[str]:
  """config.sample.prompt, then one prompt per line of config.sample.prompts_file."""
  prompts = [sample_config.prompt] if sample_config.prompt else []
  if sample_config.prompts_file:
    with open(sample_config.prompts_file) as f:
      prompts += [_unescape(line.rstrip('\n')) for line in f if line.strip()]
  return prompts


def _unescape(text: str) -> str:
  return text.encode('utf-8').decode('unicode_escape').encode('latin-1').decode('utf-8')


def sample_from_config(config, workdir: str) -> list[tuple[str, list[Completion]]]:
  """(prompt, completions) for each of config.sample's prompts, by workdir's newest checkpoint:
  what `python -m lm.main --config.mode=sample` prints."""
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm import sharding  # pylint: disable=g-import-not-at-top
  s = config.sample
  graphdef, params, tokenizer = load(config, workdir, keep_quantized=True)
  prompts = read_prompts(s)
  stop_strings = [_unescape(x) for x in s.stop_strings.split('|') if x]
  common = dict(tokenizer=tokenizer, max_new_tokens=s.max_new_tokens, stop_strings=stop_strings)
  mesh = sharding.make_mesh(config.mesh)
  try:
    with sharding.active(mesh, sharding.parse_rules(config.mesh.rules)):
      results = _run(graphdef, params, prompts, s, common)
  except GenerationError as e:
    raise config_lib.ConfigError(f'config.sample: {e}') from e
  return list(zip(prompts, results))


def _run(graphdef, params, prompts, s, common) -> list[list[Completion]]:
  """config.sample's beam search or sampling, num_samples completions per prompt."""
  if s.beam_size:
    return beam_search(graphdef, params, prompts, num_beams=s.beam_size,
                       num_return=s.num_samples, length_alpha=s.length_alpha, **common)
  repeated = [p for p in prompts for _ in range(s.num_samples)]
  flat = sample(graphdef, params, repeated, temperature=s.temperature, top_k=s.top_k,
                top_p=s.top_p, seed=s.seed, **common)
  return [flat[i:i + s.num_samples] for i in range(0, len(flat), s.num_samples)]
