"""Post-training data: records -> token layout -> packed rows, split and iterated like
pretraining data (lm.data.Data), so lm.train's loop runs fine-tuning unchanged.

The token layout, the same for every mode: [BOS] + encode(segment) ... + [EOS], one segment per
piece of rendered text (lm.post.templates); for one prompt/response pair, [BOS] +
encode(prompt) + encode(response) + [EOS]. The loss covers the response tokens and the EOS; the
BOS and the prompt tokens are never targets.

Truncation, when an example needs more than data.seq_len positions (seq_len + 1 tokens): tokens
are dropped from the left of everything before the last trained segment (the oldest context
first; BOS stays), then, if the last response alone is still too long, from its end (and then
no EOS follows: the model is not taught to stop where the text was cut). An example with no
trained token left is dropped. All three are counted in Data.stats.

Packing (post.pack): examples, in a seeded shuffled order, fill rows of seq_len positions one
after another; each has its own segment id and positions from 0, so none attends to another
(the attention mask is per segment) and the loss is the same as one example per row.
"""

import ast
from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import hashlib
import json
import textwrap

from absl import logging
import grain
import numpy as np

from lm import data as data_lib
from lm import sources as sources_lib
from lm import tokenizer as tokenizer_lib
from lm.post import templates as templates_lib


# The arrays of a row, as lm.data.make_batch lays them out.
ROW_FIELDS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray  # int32[n + 1]: BOS, the segments' tokens, EOS (unless truncated).
  trained: np.ndarray  # bool[n]: whether tokens[j + 1] is a target of the loss.


@dataclasses.dataclass
class Counts:
  records: int = 0
  duplicates: int = 0  # Exact copies of earlier records, dropped before the split.
  truncated_prompts: int = 0  # Context tokens dropped from the left.
  truncated_responses: int = 0  # The last response cut at its end (no EOS).
  dropped_empty: int = 0  # No trained token left after truncation.


def segments_of(record: dict, post, seed: int, index: int, where: str) -> templates_lib.Segments:
  """A record rendered as segments by config.post's chat template, FLAN template or fields."""
  if post.chat_template:
    if post.messages_field not in record:
      raise ValueError(f'{where}: no field config.post.messages_field={post.messages_field!r} '
                       f'(found {sorted(record)})')
    return templates_lib.render_chat(record[post.messages_field],
                                     templates_lib.CHAT_TEMPLATES[post.chat_template], where)
  if post.template:
    pairs = templates_lib.flan_template(post.template)
    return templates_lib.render_pair(record, templates_lib.pick(pairs, seed, index), where)
  fields = (post.prompt_field, post.response_field)
  for name, field in zip(('prompt_field', 'response_field'), fields):
    if not isinstance(record.get(field), str):
      raise ValueError(f'{where}: no string field config.post.{name}={field!r} (found '
                       f'{sorted(record)})')
  return [(record[fields[0]], False), (record[fields[1]], True)]


def encode_example(segments: templates_lib.Segments, tokenizer, max_tokens: int,
                   counts: Counts) -> Example | None:
  """The token layout of `segments`, truncated to max_tokens (see the module docstring); None if
  no trained token survives."""
  pieces = [(tokenizer.encode(text) if text else [], trained) for text, trained in segments]
  last = max(i for i, (_, trained) in enumerate(pieces) if trained)
  context = [(t, trained) for ids, trained in pieces[:last] for t in ids]
  response = pieces[last][0]
  eos = [tokenizer.eos_id]
  room = max_tokens - 1 - len(response) - 1  # BOS, EOS.
  if room < 0:  # The response alone does not fit: cut its end, drop all context and the EOS.
    counts.truncated_responses += 1
    counts.truncated_prompts += bool(context)
    context, response, eos = [], response[:max_tokens - 1], []
  elif len(context) > room:
    counts.truncated_prompts += 1
    context = context[len(context) - room:]
  tokens = [tokenizer.bos_id] + [t for t, _ in context] + response + eos
  trained = [flag for _, flag in context] + [True] * (len(response) + len(eos))
  if not any(trained):
    counts.dropped_empty += 1
    return None
  return Example(np.asarray(tokens, np.int32), np.asarray(trained, bool))


def stdlib_functions() -> Iterator[tuple[str, dict]]:
  """Real prompt/response pairs present on every machine: each documented function of the
  standard library, prompt = its signature and docstring, response = the rest of its body."""
  for path in sources_lib.stdlib_files():
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
      tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
      if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) > 1
              and ast.get_docstring(node) and node.end_lineno):
        continue
      docstring_end = node.body[0].end_lineno
      prompt = textwrap.dedent(''.join(lines[node.lineno - 1:docstring_end]))
      body = ''.join(lines[docstring_end:node.end_lineno])
      indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
      response = ''.join(line[indent:] for line in body.splitlines(keepends=True))
      yield f'{path}:{node.lineno}', {'prompt': prompt, 'response': response}


def stdlib_function_pairs() -> Iterator[tuple[str, dict]]:
  """Preference pairs on every machine: a documented standard-library function's signature and
  docstring, its own body (chosen) and the next such function's body (rejected)."""
  functions = stdlib_functions()
  previous = next(functions, None)
  for location, record in functions:
    if previous[1]['response'] != record['response']:
      yield previous[0], {'prompt': previous[1]['prompt'], 'chosen': previous[1]['response'],
                          'rejected': record['response']}
    previous = (location, record)


STDLIB_SOURCES = {'stdlib:functions': stdlib_functions,
                  'stdlib:function_pairs': stdlib_function_pairs}


def read_records(source: str, where: str) -> Iterator[tuple[str, dict]]:
  """(location, record) of config.post.data: jsonl:GLOB, tfds:NAME[:SPLIT], or one of
  STDLIB_SOURCES (real records present on every machine, for offline runs)."""
  if source in STDLIB_SOURCES:
    return STDLIB_SOURCES[source]()
  return sources_lib.iter_records(source, where)


def read_examples(post, tokenizer, max_tokens: int, seed: int) -> tuple[list[Example], Counts]:
  """config.post.data's records, deduplicated, rendered and encoded, in the source's order."""
  counts, seen, examples = Counts(), set(), []
  where = f'config.post.data={post.data!r}'
  for index, (location, record) in enumerate(read_records(post.data, where)):
    if post.max_examples and counts.records >= post.max_examples:
      break
    counts.records += 1
    key = hashlib.blake2b(json.dumps(record, sort_keys=True, default=str).encode(),
                          digest_size=16).digest()
    if key in seen:
      counts.duplicates += 1
      continue
    seen.add(key)
    try:
      segments = segments_of(record, post, seed, index, location)
    except ValueError as e:
      raise sources_lib.DataError(str(e)) from None
    example = encode_example(segments, tokenizer, max_tokens, counts)
    if example is not None:
      examples.append(example)
  if counts.records == 0:
    raise sources_lib.DataError(f'{where} holds no records')
  if not examples:
    raise sources_lib.DataError(
        f'{where}: none of its {counts.records} records has a response left to train on '
        f'({counts.duplicates} duplicates, {counts.dropped_empty} truncated away entirely)')
  return examples, counts


class PackedRows(Sequence):
  """Rows of seq_len positions as lm.data.make_batch lays them out (inputs, targets,
  segment_ids, positions, loss_mask), the examples in order, several per row if `pack`."""

  def __init__(self, examples: Iterable[Example], seq_len: int, pack: bool, pad_id: int):
    rows, row, used = [], [], 0
    for example in examples:
      n = len(example.trained)
      if row and (not pack or used + n > seq_len):
        rows.append(row)
        row, used = [], 0
      row.append(example)
      used += n
    if row:
      rows.append(row)
    shape = (len(rows), seq_len)
    self.arrays = dict(inputs=np.full(shape, pad_id, np.int32),
                       targets=np.full(shape, pad_id, np.int32),
                       segment_ids=np.zeros(shape, np.int32), positions=np.zeros(shape, np.int32),
                       loss_mask=np.zeros(shape, np.float32))
    for r, examples_in_row in enumerate(rows):
      start = 0
      for segment, example in enumerate(examples_in_row, start=1):
        span = slice(start, start + len(example.trained))
        self.arrays['inputs'][r, span] = example.tokens[:-1]
        self.arrays['targets'][r, span] = example.tokens[1:]
        self.arrays['segment_ids'][r, span] = segment
        self.arrays['positions'][r, span] = np.arange(len(example.trained))
        self.arrays['loss_mask'][r, span] = example.trained
        start = span.stop

  def __len__(self):
    return len(self.arrays['inputs'])

  def __getitem__(self, index):
    return {name: array[index] for name, array in self.arrays.items()}


def train_iterator(rows: PackedRows, *, batch_size: int, seed: int, shard_index: int = 0,
                   shard_count: int = 1) -> grain.DatasetIterator:
  """Shuffled batches of rows, reshuffled each epoch, forever; sharded like lm.data's."""
  local = data_lib.local_batch_size(batch_size, shard_count)
  dataset = (grain.MapDataset.source(rows).shuffle(seed=seed % 2**32).repeat()
             .slice(slice(shard_index, None, shard_count)).batch(local, drop_remainder=True))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def eval_batches(rows, n: int, *, batch_size: int, shard_index: int = 0,
                 shard_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first n batches of the held-out rows (PackedRows, or any rows with .arrays of equal
  length), a short last one padded with empty rows (all zeros: no loss, no pair)."""
  batches = []
  for start in range(0, min(n * batch_size, len(rows)), batch_size):
    batch = {k: v[start:start + batch_size] for k, v in rows.arrays.items()}
    pad = batch_size - min(start + batch_size, len(rows)) + start
    batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in
             batch.items()}
    batches.append({k: v[shard_index::shard_count] for k, v in batch.items()})
  return batches


def load_tokenizer(config, vocab_size: int) -> tokenizer_lib.Tokenizer:
  """The tokenizer the model was trained with: config.data.tokenizer, else init_from's."""
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm import generate  # pylint: disable=g-import-not-at-top
  path = config.data.tokenizer
  if not path and config.init_from:
    path = generate.find_tokenizer(config.init_from, config)
  if not path:
    raise config_lib.ConfigError(
        f'config.mode={config.mode!r} needs the tokenizer the model was trained with: set '
        'config.data.tokenizer, or config.init_from to a checkpoint that has one')
  tokenizer = tokenizer_lib.Tokenizer(path)
  padded = tokenizer_lib.padded_vocab_size(tokenizer.vocab_size)
  if vocab_size not in (tokenizer.vocab_size, padded):
    raise config_lib.ConfigError(
        f'config.model.vocab_size={vocab_size} but the tokenizer {path} has '
        f'{tokenizer.vocab_size} pieces (the model needs {tokenizer.vocab_size} or {padded} rows)')
  return tokenizer


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
  """(train, held out): a seeded eval_fraction of the items held out, at least one, and at
  least one left to train on."""
  order = np.random.default_rng(seed).permutation(len(items))
  num_eval = min(max(1, round(eval_fraction * len(items))), len(items) - 1)
  return [items[i] for i in order[num_eval:]], [items[i] for i in order[:num_eval]]


def as_data(train, held_out, tokenizer, t, stats: dict, *, shard_index: int,
            shard_count: int) -> data_lib.Data:
  """Rows (PackedRows, or pairs of them) as lm.data.Data: the training rows shuffled each epoch,
  the held-out rows in order, this process's slice of every batch."""
  return data_lib.Data(
      tokenizer=tokenizer,
      train_iter=train_iterator(train, batch_size=t.batch_size, seed=t.seed,
                                shard_index=shard_index, shard_count=shard_count),
      eval_batches=lambda n: eval_batches(held_out, n, batch_size=t.batch_size,
                                          shard_index=shard_index, shard_count=shard_count),
      token_bytes=tokenizer.token_bytes(), stats=stats)


def make_sft_data(config, tokenizer: tokenizer_lib.Tokenizer, *, shard_index: int = 0,
                  shard_count: int = 1) -> data_lib.Data:
  """config.post.data as lm.data.Data: the held-out examples are a seeded eval_fraction of the
  deduplicated ones (at least one), the rest train; both packed by config.post.pack."""
  post, t, seq_len = config.post, config.train, config.data.seq_len
  examples, counts = read_examples(post, tokenizer, seq_len + 1, t.seed)
  if len(examples) < 2:
    raise sources_lib.DataError(f'config.post.data={post.data!r} has {len(examples)} usable '
                                'example: at least one to train on and one to hold out')
  train_examples, eval_examples = split(examples, post.eval_fraction, t.seed)
  held_out = PackedRows(eval_examples, seq_len, post.pack, tokenizer.pad_id)
  train = PackedRows(train_examples, seq_len, post.pack, tokenizer.pad_id)
  stats = dict(dataclasses.asdict(counts), examples=len(examples),
               train_examples=len(train_examples), eval_examples=len(eval_examples),
               train_rows=len(train), eval_rows=len(held_out),
               trained_tokens=int(train.arrays['loss_mask'].sum()),
               row_fill=float((train.arrays['segment_ids'] > 0).mean()), tokenizer=tokenizer.path)
  logging.info('Post-training data: %s', stats)
  if counts.truncated_prompts or counts.truncated_responses or counts.dropped_empty:
    logging.warning('%d examples lost context from the left, %d responses were cut at their end '
                    'and %d examples had nothing left to train on, at data.seq_len=%d',
                    counts.truncated_prompts, counts.truncated_responses, counts.dropped_empty,
                    seq_len)
  if len(train) < data_lib.local_batch_size(t.batch_size, shard_count):
    logging.warning('%d training rows fill less than one batch of %d: rows repeat within a batch',
                    len(train), t.batch_size)
  return as_data(train, held_out, tokenizer, t, stats, shard_index=shard_index,
                 shard_count=shard_count)
