"""Scoring with an lm checkpoint: batched log-likelihoods, rolling windows, batched generation.

The one engine under the harness adapter (lm/eval/harness.py) and lm's own evaluations
(perplexity, needle in a haystack). Requests are sorted by length, longest first, and cut into
batches; each batch is right-padded to a length bucket (64, 128, 256, ... up to max_length) and to
a fixed number of rows, so jit compiles one program per bucket rather than one per request, and
a request's score never depends on which others share its batch (padding is its own segment,
which real tokens never attend to). Batches are sharded over the mesh like training batches.
"""

import dataclasses
import functools
import logging
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as harness_utils
import tqdm

from lm import attention as attention_lib
from lm import generate as generate_lib
from lm import model as model_lib
from lm import sharding

# Rows per batch when batch_size='auto' is a token budget over the bucket length: the logits of
# a batch (rows x bucket x vocab fp32) then stay near AUTO_TOKENS * vocab * 4 bytes.
AUTO_TOKENS = 8192
AUTO_MAX_ROWS = 64
AUTO_GENERATE_ROWS = 32
SMALLEST_BUCKET = 64
BUCKETS_PER_OCTAVE = 4


def bucket_length(length: int, max_length: int, smallest: int = SMALLEST_BUCKET) -> int:
  """The shortest bucket that holds `length` tokens: `smallest`, then BUCKETS_PER_OCTAVE evenly
  spaced lengths per doubling (64, 80, 96, 112, 128, 160, 192, ...), capped at max_length. A
  batch pads at most 25% beyond its longest row, and jit compiles a few programs per doubling."""
  if length <= smallest:
    return min(smallest, max_length)
  octave = 1 << (length - 1).bit_length() - 1  # The largest power of two below length.
  step = max(octave // BUCKETS_PER_OCTAVE, 8)
  return min(-(-length // step) * step, max_length)


@dataclasses.dataclass
class Truncation:
  """What had to be cut to fit max_length, counted over a Scorer's life."""
  loglikelihood_requests: int = 0  # Context tokens dropped from the left.
  loglikelihood_tokens: int = 0
  continuations_cut: int = 0  # Continuations longer than max_length (their head is not scored).
  generation_prompts: int = 0  # Prompts left-truncated to leave room for the generated tokens.
  generation_tokens: int = 0


class Scorer:
  """A loaded checkpoint that scores token sequences and generates from prompts.

  batch_size: rows per batch, or 'auto' (rows = AUTO_TOKENS // bucket length, at most
  AUTO_MAX_ROWS, for scoring; AUTO_GENERATE_ROWS for generation); always rounded up to a multiple
  of the mesh's data-parallel ways. max_length: the longest sequence the model sees (default and
  upper bound: the model's max_seq_len).
  """

  def __init__(self, graphdef, params, tokenizer, *, mesh, rules, batch_size='auto',
               max_length: int | None = None, progress: bool = True):
    self.graphdef, self.params, self.tokenizer = graphdef, params, tokenizer
    self.cfg = _config_of(graphdef, params)
    self.mesh, self.rules = mesh, rules
    # A soft prompt (config.peft.kind='prompt', lm/peft.py) takes positions of the model's own.
    room = self.cfg.max_seq_len - self.cfg.prompt_tokens
    if max_length is not None and not 2 <= int(max_length) <= room:
      raise ValueError(f'max_length={max_length} must be between 2 and the model\'s max_seq_len='
                       f'{self.cfg.max_seq_len}' + (f' less its {self.cfg.prompt_tokens} '
                       'soft-prompt positions' if self.cfg.prompt_tokens else ''))
    self.max_length = int(max_length or room)
    self.batch_size = _parse_batch_size(batch_size)
    self.progress = progress
    self.truncation = Truncation()
    self._data_ways = math.prod(
        mesh.shape[a] for a in rules['act_batch'] if mesh.shape[a] > 1)

  @classmethod
  def load(cls, checkpoint: str, *, dtype: str = 'auto', batch_size='auto',
           max_length: int | None = None, mesh_config=None, progress: bool = True) -> 'Scorer':
    """A Scorer for any lm checkpoint (generate.load_checkpoint says which directories); a
    quantized one (lm.quantize) stays quantized, its weights dequantized where the model reads
    them."""
    graphdef, params, tokenizer, config = generate_lib.load_checkpoint(
        checkpoint, dtype=dtype, mesh_config=mesh_config, keep_quantized=True)
    if tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(f'{checkpoint}: the tokenizer {tokenizer.path} has {tokenizer.vocab_size} '
                       f'pieces, more than the model\'s vocab_size={config.model.vocab_size}')
    mesh = sharding.make_mesh(config.mesh)
    return cls(graphdef, params, tokenizer, mesh=mesh,
               rules=sharding.parse_rules(config.mesh.rules), batch_size=batch_size,
               max_length=max_length, progress=progress)

  # -------------------------------------------------------------------------------------------
  # Log-likelihoods.

  def loglikelihood(self, requests: list[tuple[list[int], list[int]]],
                    description: str = 'loglikelihood') -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding yields the continuation) per
    (context tokens, continuation tokens) request, in request order.

    As lm-eval's HF backend: a sequence longer than max_length + 1 loses context from the left
    (counted in self.truncation), and the model sees context + continuation minus its last token.
    Continuations of one context (a multiple-choice question's answers) share one pass over the
    context: it runs once into a KV cache, which each continuation then reads.
    """
    rows, groups = [], {}
    for i, (context, continuation) in enumerate(requests):
      if not context or not continuation:
        raise ValueError('a log-likelihood request needs a non-empty context (BOS at least) and '
                         'continuation')
      whole = list(context) + list(continuation)
      if len(whole) > self.max_length + 1:
        self.truncation.loglikelihood_requests += 1
        self.truncation.loglikelihood_tokens += len(whole) - self.max_length - 1
        if len(continuation) > self.max_length:
          self.truncation.continuations_cut += 1
        whole = whole[-(self.max_length + 1):]
      else:
        groups.setdefault(tuple(context), []).append(i)
      rows.append((whole, min(len(continuation), len(whole) - 1)))
    shared = [(list(context), [(i, list(requests[i][1])) for i in members])
              for context, members in groups.items() if len(members) > 1]
    in_shared = {i for _, members in shared for i, _ in members}
    alone = [i for i in range(len(rows)) if i not in in_shared]
    results = [None] * len(rows)
    with tqdm.tqdm(total=len(rows), desc=description, disable=not self.progress,
                   leave=False) as bar:
      for i, result in zip(alone, self._score_rows([rows[i] for i in alone], bar)):
        results[i] = result
      for i, result in self._score_shared_contexts(shared, bar):
        results[i] = result
    return results

  def rolling_loglikelihood(self, documents: list[list[int]], context_len: int = 1,
                            description: str = 'rolling loglikelihood') -> list[float]:
    """log P(document) per token list, in windows of max_length as lm-eval defines them
    (utils.get_rolling_token_windows, BOS before the first token; context_len tokens of
    overlap between windows, 1 by default as the harness uses)."""
    windows, owners = [], []
    for i, tokens in enumerate(documents):
      for context, continuation in map(harness_utils.make_disjoint_window,
                                       harness_utils.get_rolling_token_windows(
                                           list(tokens), self.tokenizer.bos_id,
                                           self.max_length, context_len)):
        windows.append((context, continuation))
        owners.append(i)
    totals = [0.0] * len(documents)
    for owner, (logprob, _) in zip(owners, self.loglikelihood(windows, description)):
      totals[owner] += logprob
    return totals

  def _score_rows(self, rows: list[tuple[list[int], int]], bar) -> list[tuple[float, bool]]:
    """rows: (tokens, n): the log-probability of the last n tokens given those before them."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    results = [None] * len(rows)
    start = 0
    while start < len(order):
      T = bucket_length(len(rows[order[start]][0]) - 1, self.max_length)
      B = self._rows_per_batch(T)
      chunk = order[start:start + B]
      inputs_BT = np.zeros((B, T), np.int32)
      targets_BT = np.zeros((B, T), np.int32)
      segment_ids_BT = np.zeros((B, T), np.int32)
      scored_BT = np.zeros((B, T), bool)
      for b, i in enumerate(chunk):
        tokens, n = rows[i]
        L = len(tokens) - 1
        inputs_BT[b, :L], targets_BT[b, :L] = tokens[:-1], tokens[1:]
        segment_ids_BT[b, :L] = 1
        scored_BT[b, L - n:L] = True
      logprob_B, greedy_B = jax.device_get(self._run(
          _score, inputs_BT, targets_BT, segment_ids_BT, scored_BT))
      for b, i in enumerate(chunk):
        results[i] = (float(logprob_B[b]), bool(greedy_B[b]))
      bar.update(len(chunk))
      start += len(chunk)
    return results

  def _score_shared_contexts(self, groups, bar):
    """Yields (request index, result) for groups of (context, [(index, continuation), ...]).

    A group is one row: its context once (segment SHARED_PREFIX), then each continuation but
    its last token (the inputs that predict the rest), each in a segment of its own, at
    positions that continue the context: every continuation sees the context and itself only,
    as if alone after it, and the row costs the context once instead of once per choice. The
    first token of every continuation is predicted by the context's last logits. Rows are
    padded to a length bucket; a group too long for one row is scored request by request.
    """
    packed = [(context, members, len(context) + sum(len(c) - 1 for _, c in members))
              for context, members in groups]
    too_long = [(i, (context + c, len(c))) for context, members, n in packed
                if n > self.max_length for i, c in members]
    for (i, _), result in zip(too_long, self._score_rows([row for _, row in too_long], bar)):
      yield i, result
    packed = sorted((g for g in packed if g[2] <= self.max_length), key=lambda g: -g[2])
    start = 0
    while start < len(packed):
      T = bucket_length(packed[start][2], self.max_length)
      B = self._rows_per_batch(T)
      chunk = packed[start:start + B]
      K = 1 << (max(len(members) for _, members, _ in chunk) - 1).bit_length()
      window = max(n - len(context) + 1 for context, _, n in chunk)
      arrays = _PackedBatch(B, T, bucket_length(window, T, smallest=16), B * K)
      owners = []
      for b, (context, members, _) in enumerate(chunk):
        owners += arrays.add_row(b, context, members, first_slot=b * K)
      logprob_R, greedy_R = jax.device_get(self._run(_score_packed, *arrays.astuple()))
      for r, i in owners:
        yield i, (float(logprob_R[r]), bool(greedy_R[r]))
      bar.update(len(owners))
      start += len(chunk)

  def _rows_per_batch(self, T: int, generation: bool = False) -> int:
    if self.batch_size == 'auto':
      rows = AUTO_GENERATE_ROWS if generation else max(1, min(AUTO_MAX_ROWS, AUTO_TOKENS // T))
    else:
      rows = self.batch_size
    return -(-rows // self._data_ways) * self._data_ways

  def _run(self, score_fn, *arrays):
    """score_fn on numpy batch arrays placed like training batches (rows over the mesh)."""
    where = sharding.batch_sharding(self.mesh, self.rules)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    arrays = [jax.device_put(a, where if a.ndim == 2 else replicated) for a in arrays]
    layout = (self.mesh, tuple(sorted(self.rules.items())))
    return score_fn(self.graphdef, self.params, *arrays, layout=layout)

  # -------------------------------------------------------------------------------------------
  # Generation.

  def generate(self, prompts: list[list[int]], *, max_new_tokens: int, until=(),
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               description: str = 'generate') -> list[str]:
    """The text generated after each prompt (token ids, BOS included), cut before the first
    stop string in `until`; decoding also stops at EOS. Prompts longer than
    max_length - max_new_tokens lose tokens from the left (counted in self.truncation), as
    lm-eval's HF backend does; max_new_tokens must leave room for at least one prompt token."""
    if not 1 <= max_new_tokens < self.max_length:
      raise ValueError(f'max_new_tokens={max_new_tokens} must be between 1 and max_length - 1 = '
                       f'{self.max_length - 1} (the prompt needs at least one token)')
    room = self.max_length - max_new_tokens
    fitted = []
    for prompt in prompts:
      if len(prompt) > room:
        self.truncation.generation_prompts += 1
        self.truncation.generation_tokens += len(prompt) - room
        prompt = prompt[-room:]
      fitted.append(list(prompt))
    order = sorted(range(len(fitted)), key=lambda i: (-len(fitted[i]), i))
    stop_strings = [s for s in until if s]
    texts = [None] * len(fitted)
    with tqdm.tqdm(total=len(fitted), desc=description, disable=not self.progress,
                   leave=False) as bar:
      start = 0
      while start < len(order):
        P = min(bucket_length(len(fitted[order[start]]), self.max_length, smallest=16), room)
        B = self._rows_per_batch(P, generation=True)
        chunk = order[start:start + B]
        batch = [fitted[i] for i in chunk]
        batch += [batch[-1]] * (B - len(batch))  # Fixed rows: one compilation per bucket.
        seeds = [seed + i for i in chunk] + [seed] * (B - len(chunk))
        with sharding.active(self.mesh, self.rules):
          completions = generate_lib.sample(
              self.graphdef, self.params, batch, tokenizer=self.tokenizer,
              max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              stop_strings=stop_strings, seed=seeds, prompt_len=P)
        for i, completion in zip(chunk, completions):
          texts[i] = completion.text
        bar.update(len(chunk))
        start += len(chunk)
    return texts

  def log_truncation(self) -> None:
    t = self.truncation
    if t.loglikelihood_requests:
      logging.warning('%d log-likelihood requests were longer than max_length + 1 = %d tokens: '
                      '%d context tokens were dropped from their left (%d continuations were '
                      'longer than max_length themselves)', t.loglikelihood_requests,
                      self.max_length + 1, t.loglikelihood_tokens, t.continuations_cut)
    if t.generation_prompts:
      logging.warning('%d generation prompts did not leave room for the generated tokens within '
                      'max_length = %d: %d tokens were dropped from their left',
                      t.generation_prompts, self.max_length, t.generation_tokens)


def _config_of(graphdef, params) -> model_lib.ModelConfig:
  return nnx.merge(graphdef, params).cfg


def _parse_batch_size(batch_size):
  if batch_size in (None, 'auto') or str(batch_size).startswith('auto'):
    return 'auto'
  try:
    rows = int(batch_size)
  except (TypeError, ValueError):
    rows = 0
  if rows < 1:
    raise ValueError(f'batch_size={batch_size!r}: expected a positive integer or "auto"')
  return rows


@functools.partial(jax.jit, static_argnames=('graphdef', 'layout'))
def _score(graphdef, params, inputs_BT, targets_BT, segment_ids_BT, scored_BT, *, layout):
  """Per row: the summed log-probability of the scored targets, and whether each is the argmax.

  layout = (mesh, rules as sorted items): static, so each mesh traces its own sharding
  constraints (a trace made under one mesh is never reused under another).
  """
  mesh, rules = layout
  with sharding.active(mesh, dict(rules)):
    logits_BTV = model_lib.apply(graphdef, params, inputs_BT, segment_ids_BT)
  logprob_BT = jnp.where(scored_BT, _target_logprobs(logits_BTV, targets_BT), 0.0)
  is_argmax_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  return logprob_BT.sum(-1), jnp.all(is_argmax_BT | ~scored_BT, axis=-1)


class _PackedBatch:
  """The arrays of a batch of packed rows (Scorer._score_shared_contexts): B rows of T tokens,
  R result slots (slot r for one continuation), and per row a window of C positions from the
  context's last token on, the only positions whose logits are needed."""

  def __init__(self, B: int, T: int, C: int, R: int):
    self.tokens_BT = np.zeros((B, T), np.int32)
    self.segment_ids_BT = np.zeros((B, T), np.int32)
    self.positions_BT = np.zeros((B, T), np.int32)
    self.window_start_B = np.zeros(B, np.int32)
    self.targets_BC = np.zeros((B, C), np.int32)  # Window position c predicts targets_BC[b, c].
    self.owner_BC = np.full((B, C), R, np.int32)  # R: no continuation's token.
    self.first_row_R = np.zeros(R, np.int32)  # Window position 0 predicts first_target_R.
    self.first_target_R = np.zeros(R, np.int32)

  def add_row(self, b: int, context, members, first_slot: int) -> list[tuple[int, int]]:
    """Row b: the context, then each continuation's inputs; returns (slot, request index)."""
    m = len(context)
    self.tokens_BT[b, :m] = context
    self.segment_ids_BT[b, :m] = attention_lib.SHARED_PREFIX
    self.positions_BT[b, :m] = np.arange(m)
    self.window_start_B[b] = m - 1
    at, owners = m, []
    for j, (i, continuation) in enumerate(members):
      r, n = first_slot + j, len(continuation) - 1
      self.first_row_R[r], self.first_target_R[r] = b, continuation[0]
      self.tokens_BT[b, at:at + n] = continuation[:-1]
      self.segment_ids_BT[b, at:at + n] = j + 1
      self.positions_BT[b, at:at + n] = m + np.arange(n)
      window = at - (m - 1)  # The input at row position `at` is window position `window`.
      self.targets_BC[b, window:window + n] = continuation[1:]
      self.owner_BC[b, window:window + n] = r
      at += n
      owners.append((r, i))
    return owners

  def astuple(self):
    return (self.tokens_BT, self.segment_ids_BT, self.positions_BT, self.window_start_B,
            self.targets_BC, self.owner_BC, self.first_row_R, self.first_target_R)


@functools.partial(jax.jit, static_argnames=('graphdef', 'layout'))
def _score_packed(graphdef, params, tokens_BT, segment_ids_BT, positions_BT, window_start_B,
                  targets_BC, owner_BC, first_row_R, first_target_R, *, layout):
  """Per result slot r: the continuation's summed log-probability and whether each of its tokens
  is the argmax. Attention honours SHARED_PREFIX segments (lm/attention.py); logits are computed
  on each row's window only (a context's other positions predict nothing scored), and a
  token's log-probability goes to slot owner_BC."""
  mesh, rules = layout
  R = first_row_R.shape[0]
  with sharding.active(mesh, dict(rules)):
    model = nnx.merge(graphdef, params)
    hidden_BTD = model(tokens_BT, segment_ids_BT, positions_BT, hidden_only=True)
    C = targets_BC.shape[1]
    window_BC = jnp.minimum(window_start_B[:, None] + jnp.arange(C)[None, :],
                            tokens_BT.shape[1] - 1)
    logits_BCV = model.logits(jnp.take_along_axis(hidden_BTD, window_BC[..., None], axis=1))
  tail_logprob_R = jax.ops.segment_sum(
      _target_logprobs(logits_BCV, targets_BC).ravel(), owner_BC.ravel(), R + 1)[:R]
  is_argmax_BC = (jnp.argmax(logits_BCV, axis=-1) == targets_BC).astype(jnp.int32)
  tail_greedy_R = jax.ops.segment_min(is_argmax_BC.ravel(), owner_BC.ravel(), R + 1)[:R] > 0
  first_logits_RV = logits_BCV[first_row_R, 0]
  first_logprob_R = _target_logprobs(first_logits_RV, first_target_R)
  first_greedy_R = jnp.argmax(first_logits_RV, axis=-1) == first_target_R
  return first_logprob_R + tail_logprob_R, first_greedy_R & tail_greedy_R


def _target_logprobs(logits_XV, targets_X):
  """log softmax(logits)[target] over the last axis, without materialising the log-softmax."""
  target_logit_X = jnp.take_along_axis(logits_XV, targets_X[..., None], -1)[..., 0]
  return target_logit_X - jax.nn.logsumexp(logits_XV, axis=-1)
