"""Continuous batching: a fixed number of decode slots over a paged KV cache.

`Engine.run` serves a list of `Request`s (each with its own prompt, max_new_tokens, stop tokens,
sampling settings and seed) through `slots` rows that decode together one token per step. A
waiting request is admitted as soon as a slot frees, instead of waiting for the whole batch to
finish, so short requests never idle behind long ones.

Keys and values live in a pool of `block_size`-slot blocks (lm/kv_cache.py, paged cache); each
sequence has a block table. A request is admitted only when the pool can promise it the blocks
its prompt plus max_new_tokens could need (so no sequence ever runs out mid-decode), but blocks
are taken one at a time as the sequence grows and all return to the pool when it finishes, early
stops included. Scheduling is first come, first served.

Two jitted step functions with static shapes: `_prefill` runs one admitted prompt (padded to a
multiple of block_size, one compilation per multiple) and `_decode` runs `steps_per_call` tokens
for every slot ([slots] tokens, [slots, max blocks per sequence] block table) in one call, so
the host's round trip is paid once per call rather than once per token; idle slots write to the
scratch block 0. Tokens are chosen as lm/generate.py chooses them (per-request key folded with
the step number), so each completion equals `generate.sample` on that request alone.
"""

import collections
import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lm import generate
from lm import kv_cache
from lm import model as model_lib
from lm import quantize


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: list[int]  # Token ids, non-empty.
  max_new_tokens: int = 64
  stop_tokens: tuple[int, ...] = ()
  temperature: float = 0.0  # 0: greedy.
  top_k: int = 0  # 0: no top-k filter.
  top_p: float = 1.0  # 1: no nucleus filter.
  seed: int = 0  # Same seed, same completion as generate.sample(..., seed=[seed]).


@dataclasses.dataclass
class _Sequence:
  """A request being decoded in a slot: its blocks and what it has generated so far."""
  index: int  # Position in the list of requests, for the results.
  request: Request
  reserved: int  # Blocks promised at admission (worst case), including those in `blocks`.
  blocks: list[int] = dataclasses.field(default_factory=list)
  length: int = 0  # Tokens in the cache.
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)

  def finish_reason(self) -> str | None:
    if self.tokens and self.tokens[-1] in self.request.stop_tokens:
      return 'stop_token'
    return 'length' if len(self.tokens) >= self.request.max_new_tokens else None


class BlockPool:
  """Host-side accounting of the pool: free blocks, and blocks promised but not yet taken."""

  def __init__(self, num_blocks: int):
    self.free = list(range(num_blocks - 1, 0, -1))  # Block 0 is scratch, never handed out.
    self.promised = 0
    self.peak_used = 0
    self.allocations = 0
    self.capacity = num_blocks - 1

  def can_promise(self, count: int) -> bool:
    return len(self.free) - self.promised >= count

  def promise(self, count: int) -> None:
    self.promised += count

  def take(self) -> int:
    """A promised block."""
    self.promised -= 1
    self.allocations += 1
    block = self.free.pop()
    self.peak_used = max(self.peak_used, self.capacity - len(self.free))
    return block

  def release(self, sequence: _Sequence) -> None:
    """Returns a finished sequence's blocks and the promise it did not use."""
    self.free.extend(sequence.blocks)
    self.promised -= sequence.reserved - len(sequence.blocks)


def _sampling_arrays(requests, vocab_size: int) -> dict:
  """Per-row sampling settings as arrays (traced, so one compilation serves all settings)."""
  return {'seed': np.asarray([r.seed for r in requests], np.uint32),
          'temperature': np.asarray([r.temperature for r in requests], np.float32),
          'top_k': np.asarray([min(r.top_k, vocab_size) for r in requests], np.int32),
          'top_p': np.asarray([r.top_p for r in requests], np.float32)}


def _choose(logits_BV, sampling, steps_B):
  """Each row's next token (argmax where temperature is 0) and its log-probability, drawn with
  the row's seed folded with its step, exactly as generate.sample draws it. When every row is
  greedy the sampling filters (a sort of the vocabulary per row) are skipped."""
  keys_B = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.key)(sampling['seed']), steps_B)
  temperature_B = sampling['temperature']
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  def one_row(logits_V, key, temperature, top_k, top_p):
    sampled = generate.choose_tokens(
        logits_V[None], key[None], jnp.where(temperature > 0, temperature, 1.0), top_k, top_p)
    return sampled[0]

  def sample():
    sampled_B = jax.vmap(one_row)(logits_BV, keys_B, temperature_B, sampling['top_k'],
                                  sampling['top_p'])
    return jnp.where(temperature_B > 0, sampled_B, greedy_B)

  tokens_B = jax.lax.cond(jnp.any(temperature_B > 0), sample, lambda: greedy_B)
  return tokens_B, generate._token_logprobs(logits_BV, tokens_B)  # pylint: disable=protected-access


@functools.partial(jax.jit, static_argnames='graphdef', donate_argnames='pool')
def _prefill(graphdef, params, pool, tokens_1P, length, block_table_1M, sampling):
  """One prompt (right-padded to P; `length` real tokens) into its blocks, after the model's
  soft prompt when it has one (lm/peft.py): (first token_1, logprob_1, pool)."""
  P = tokens_1P.shape[1]
  cache = kv_cache.paged(pool, block_table_1M, jnp.zeros(1, jnp.int32))
  params = quantize.dequantize_on_read(params)
  model = nnx.merge(graphdef, params)
  if model.cfg.prompt_tokens:
    cache = model.prefill_prompt(cache)
  logits_1PV, cache = model_lib.apply(
      graphdef, params, tokens_1P, jnp.ones_like(tokens_1P), jnp.arange(P)[None], cache)
  logits_1V = jax.lax.dynamic_index_in_dim(logits_1PV, length - 1, axis=1, keepdims=False)
  token_1, logprob_1 = _choose(logits_1V, sampling, jnp.zeros(1, jnp.int32))
  return token_1, logprob_1, {'k': cache['k'], 'v': cache['v']}


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_steps'), donate_argnames='pool')
def _decode(graphdef, params, pool, tokens_B, lengths_B, block_table_BM, steps_B, sampling,
            num_steps):
  """num_steps tokens for every slot, each fed back as the next input, starting from each slot's
  last token in slot lengths_B (its position: lengths_B less the soft prompt's slots, which the
  model adds back): (tokens_BN, logprobs_BN, pool). One call per num_steps tokens keeps the
  host's per-step round trip out of the decode loop; the host then cuts each row at its stop
  token or max_new_tokens (tokens past that are never used)."""
  params = quantize.dequantize_on_read(params)
  soft_slots = nnx.merge(graphdef, params).cfg.prompt_tokens

  def step(carry, _):
    pool, tokens_B, lengths_B, steps_B = carry
    tokens_B1 = tokens_B[:, None]
    cache = kv_cache.paged(pool, block_table_BM, lengths_B)
    logits_B1V, cache = model_lib.apply(
        graphdef, params, tokens_B1, jnp.ones_like(tokens_B1), lengths_B[:, None] - soft_slots,
        cache)
    tokens_B, logprobs_B = _choose(logits_B1V[:, 0], sampling, steps_B)
    pool = {'k': cache['k'], 'v': cache['v']}
    return (pool, tokens_B, lengths_B + 1, steps_B + 1), (tokens_B, logprobs_B)

  (pool, *_), (tokens_NB, logprobs_NB) = jax.lax.scan(
      step, (pool, tokens_B, lengths_B, steps_B), None, length=num_steps)
  return tokens_NB.T, logprobs_NB.T, pool


class Engine:
  """Serves requests through `slots` decode rows and a pool of `num_blocks` KV blocks.

  params may be quantized (lm/quantize.py: int8 or int4, each weight dequantized where it is
  read). num_blocks defaults to enough for every slot to hold a max_seq_len sequence (+1 scratch
  block); fewer blocks cap memory, and requests then wait for blocks as well as for slots.
  """

  def __init__(self, cfg: model_lib.ModelConfig, params, *, slots: int = 8,
               block_size: int = 16, num_blocks: int | None = None, steps_per_call: int = 8):
    if cfg.kind != 'decoder':
      raise ValueError(
          f"lm.engine serves decoders; config.model.kind={cfg.kind!r} "
          + ("has no causal decoder to serve" if cfg.kind == 'encoder' else
             "decodes with lm.generate (sample, beam_search), which runs the encoder once"))
    self.cfg, self.params, self.slots, self.block_size = cfg, params, slots, block_size
    # Decode steps per jitted call: more saves host round trips; fewer admits waiting requests
    # sooner and wastes fewer steps on rows that finish early in a call.
    self.steps_per_call = steps_per_call
    self.graphdef = model_lib.graphdef(cfg)
    self.max_blocks = -(-cfg.max_seq_len // block_size)  # Per sequence: the block table's M.
    self.num_blocks = num_blocks or slots * self.max_blocks + 1
    self.pool = kv_cache.init_pool(cfg, self.num_blocks, block_size)
    self.stats = {}

  def blocks_needed(self, request: Request) -> int:
    """The most blocks a request can fill: the soft prompt (lm/peft.py), its prompt and all but
    its last new token."""
    slots = self.cfg.prompt_tokens + len(request.prompt) + request.max_new_tokens - 1
    return -(-slots // self.block_size)

  def run(self, requests: list[Request]) -> list[generate.Completion]:
    """One completion per request, in order; self.stats says how the pool was used."""
    for i, request in enumerate(requests):
      self._check(i, request)
    blocks = BlockPool(self.num_blocks)
    waiting = collections.deque(enumerate(requests))
    slots, results = [None] * self.slots, [None] * len(requests)
    steps = 0
    while waiting or any(slots):
      self._admit(waiting, slots, blocks, results)
      if any(slots):
        self._decode_step(slots, blocks, results)
        steps += self.steps_per_call
    self.stats = {'decode_steps': steps, 'peak_blocks_used': blocks.peak_used,
                  'block_allocations': blocks.allocations, 'free_blocks': len(blocks.free)}
    return results

  def _check(self, i: int, request: Request) -> None:
    generate._check_sampling(  # pylint: disable=protected-access
        request.temperature, request.top_k, request.top_p)
    prompt, new = request.prompt, request.max_new_tokens
    if not prompt or new < 1:
      raise ValueError(f'request {i}: needs a non-empty prompt and max_new_tokens >= 1, got '
                       f'{len(prompt)} prompt tokens and max_new_tokens={new}')
    soft = self.cfg.prompt_tokens
    if soft + len(prompt) + new > self.cfg.max_seq_len:
      raise ValueError(f'request {i}: {len(prompt)} prompt tokens + max_new_tokens={new} '
                       + (f'+ {soft} soft-prompt positions ' if soft else '')
                       + f'exceed the model\'s max_seq_len={self.cfg.max_seq_len}')
    if not all(0 <= t < self.cfg.vocab_size for t in prompt):
      raise ValueError(f'request {i}: token ids outside [0, vocab_size={self.cfg.vocab_size})')
    if self.blocks_needed(request) > self.num_blocks - 1:
      raise ValueError(
          f'request {i} needs {self.blocks_needed(request)} blocks of {self.block_size} tokens '
          f'({len(prompt)} prompt + {new} new) but the pool has {self.num_blocks - 1} '
          f'(num_blocks={self.num_blocks}, block 0 is scratch): raise num_blocks')

  def _admit(self, waiting, slots, blocks: BlockPool, results) -> None:
    """Prefills waiting requests, first come first served, into free slots while the pool can
    promise them their blocks."""
    for slot in range(self.slots):
      while slots[slot] is None and waiting:
        index, request = waiting[0]
        needed = self.blocks_needed(request)
        if not blocks.can_promise(needed):
          return
        waiting.popleft()
        blocks.promise(needed)
        sequence = _Sequence(index, request, needed)
        self._prefill(sequence, blocks)
        if not self._finished(sequence, blocks, results):
          slots[slot] = sequence

  def _prefill(self, sequence: _Sequence, blocks: BlockPool) -> None:
    prompt, soft = sequence.request.prompt, self.cfg.prompt_tokens
    sequence.blocks = [blocks.take() for _ in range(-(-(soft + len(prompt)) // self.block_size))]
    tokens_1P = np.zeros((1, -(-len(prompt) // self.block_size) * self.block_size), np.int32)
    tokens_1P[0, :len(prompt)] = prompt
    token_1, logprob_1, self.pool = _prefill(
        self.graphdef, self.params, self.pool, tokens_1P, np.int32(len(prompt)),
        self._block_table([sequence]), _sampling_arrays([sequence.request], self.cfg.vocab_size))
    sequence.length = soft + len(prompt)  # Slots in the cache, the soft prompt's included.
    sequence.tokens.append(int(token_1[0]))
    sequence.logprobs.append(float(logprob_1[0]))

  def _decode_step(self, slots, blocks: BlockPool, results) -> None:
    """steps_per_call tokens for every occupied slot; finished sequences leave their slots."""
    num_steps = self.steps_per_call
    for sequence in filter(None, slots):
      # Blocks for the positions this call writes, within what admission promised (positions
      # past that belong to tokens the sequence will not keep).
      wanted = min(-(-(sequence.length + num_steps) // self.block_size), sequence.reserved)
      while len(sequence.blocks) < wanted:
        sequence.blocks.append(blocks.take())
    idle = Request(prompt=[0])
    tokens_BN, logprobs_BN, self.pool = _decode(
        self.graphdef, self.params, self.pool,
        np.asarray([s.tokens[-1] if s else 0 for s in slots], np.int32),
        np.asarray([s.length if s else 0 for s in slots], np.int32),
        self._block_table(slots),
        np.asarray([len(s.tokens) if s else 0 for s in slots], np.int32),
        _sampling_arrays([s.request if s else idle for s in slots], self.cfg.vocab_size),
        num_steps)
    tokens_BN, logprobs_BN = jax.device_get((tokens_BN, logprobs_BN))
    for slot, sequence in enumerate(slots):
      if sequence is None:
        continue
      for token, logprob in zip(tokens_BN[slot], logprobs_BN[slot]):
        sequence.length += 1
        sequence.tokens.append(int(token))
        sequence.logprobs.append(float(logprob))
        if self._finished(sequence, blocks, results):
          slots[slot] = None
          break

  def _block_table(self, sequences) -> np.ndarray:
    """[len(sequences), M] block ids, 0 (scratch) past each sequence's blocks and for idle rows."""
    table_BM = np.zeros((len(sequences), self.max_blocks), np.int32)
    for row, sequence in enumerate(sequences):
      if sequence is not None:
        table_BM[row, :len(sequence.blocks)] = sequence.blocks
    return table_BM

  @staticmethod
  def _finished(sequence: _Sequence, blocks: BlockPool, results) -> bool:
    """Records a finished sequence's completion and frees its blocks."""
    reason = sequence.finish_reason()
    if reason is None:
      return False
    results[sequence.index] = generate.Completion(
        sequence.tokens, sequence.logprobs, None, reason)
    blocks.release(sequence)
    return True
