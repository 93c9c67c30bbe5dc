import json

import ml_collections
import numpy as np
import pytest

from lm import config as config_lib
from lm import data as data_lib
from lm import sources
from lm import tokenizer as tokenizer_lib
from lm.post import data as post_data

PROMPTS = ['def add(a, b):', 'import os\n', 'class Point:', 'for i in range(10):']
RESPONSES = ['\n    return a + b\n', 'print(os.getcwd())', '\n    x: int\n    y: int\n',
             '\n    print(i)\n']


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok') / 'spm.model')
  texts = list(data_lib.iter_documents('stdlib', max_chars=200_000))
  return tokenizer_lib.train_tokenizer(texts, 512, path, max_chars=200_000, seed=0)


def _post(**overrides):
  post = config_lib.base_config().post
  post.update(overrides)
  return post


def _write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return f'jsonl:{path}'


def test_the_layout_is_bos_prompt_response_eos_with_the_loss_on_the_response(tokenizer):
  counts = post_data.Counts()
  example = post_data.encode_example([(PROMPTS[0], False), (RESPONSES[0], True)], tokenizer, 64,
                                     counts)
  prompt, response = tokenizer.encode(PROMPTS[0]), tokenizer.encode(RESPONSES[0])
  assert example.tokens.tolist() == ([tokenizer.bos_id] + prompt + response
                                     + [tokenizer.eos_id])
  # trained[j] says whether tokens[j + 1] is a target: the response's tokens and the EOS.
  assert example.trained.tolist() == [False] * len(prompt) + [True] * (len(response) + 1)
  assert counts == post_data.Counts()


def test_truncation_drops_the_prompt_from_the_left_then_the_response_end(tokenizer):
  prompt, response = tokenizer.encode(PROMPTS[2] * 4), tokenizer.encode(RESPONSES[2])
  counts = post_data.Counts()
  limit = len(response) + 5
  example = post_data.encode_example([(PROMPTS[2] * 4, False), (RESPONSES[2], True)], tokenizer,
                                     limit, counts)
  assert len(example.tokens) == limit
  assert example.tokens.tolist() == ([tokenizer.bos_id] + prompt[-3:] + response
                                     + [tokenizer.eos_id])
  assert counts.truncated_prompts == 1 and counts.truncated_responses == 0
  # The response alone does not fit: its start is kept, with no EOS (it was not the end).
  example = post_data.encode_example([(PROMPTS[2], False), (RESPONSES[2], True)], tokenizer, 4,
                                     counts)
  assert example.tokens.tolist() == [tokenizer.bos_id] + response[:3]
  assert example.trained.all() and counts.truncated_responses == 1
  # An empty response truncated away, EOS and all, leaves nothing to train on.
  assert post_data.encode_example([(PROMPTS[2], False), ('', True)], tokenizer, 1, counts) is None
  assert counts.dropped_empty == 1


def test_packed_rows_keep_examples_apart(tokenizer):
  examples = [post_data.encode_example([(p, False), (r, True)], tokenizer, 64, post_data.Counts())
              for p, r in zip(PROMPTS, RESPONSES)]
  packed = post_data.PackedRows(examples, 48, pack=True, pad_id=tokenizer.pad_id)
  unpacked = post_data.PackedRows(examples, 48, pack=False, pad_id=tokenizer.pad_id)
  assert len(unpacked) == 4 and len(packed) < 4
  assert packed.arrays['loss_mask'].sum() == unpacked.arrays['loss_mask'].sum() == sum(
      e.trained.sum() for e in examples)
  row = packed[0]
  for segment in range(1, row['segment_ids'].max() + 1):
    where = np.flatnonzero(row['segment_ids'] == segment)
    assert row['positions'][where].tolist() == list(range(len(where)))
    assert row['inputs'][where[0]] == tokenizer.bos_id
  assert (row['loss_mask'][row['segment_ids'] == 0] == 0).all()


def test_sft_data_splits_deduplicated_examples(tokenizer, tmp_path):
  records = [{'prompt': f'{p} # {i}', 'response': r} for i in range(10)
             for p, r in zip(PROMPTS, RESPONSES)]
  config = config_lib.base_config()
  config.post.update(data=_write(tmp_path / 'sft.jsonl', records + records[:5]),
                     eval_fraction=0.1)
  config.data.seq_len = 64
  config.train.batch_size = 4
  data = post_data.make_sft_data(config, tokenizer)
  s = data.stats
  assert (s['records'], s['duplicates'], s['examples']) == (45, 5, 40)
  assert (s['train_examples'], s['eval_examples']) == (36, 4)
  held_out = {tuple(row) for b in data.eval_batches(10) for row, seg in
              zip(b['inputs'], b['segment_ids']) if seg.any()}
  train_rows = set()
  for _ in range(20):
    train_rows |= {tuple(row) for row in next(data.train_iter)['inputs']}
  assert not held_out & train_rows
  batch = next(data.train_iter)
  assert {k: v.shape for k, v in batch.items()} == {k: (4, 64) for k in batch}


def test_bad_post_data_is_named(tokenizer, tmp_path):
  config = config_lib.base_config()
  config.data.seq_len = 64
  config.post.data = _write(tmp_path / 'a.jsonl', [{'prompt': 'x', 'answer': 'y'}])
  with pytest.raises(sources.DataError, match=r"a.jsonl:1: no string field "
                     r"config.post.response_field='response' \(found \['answer', 'prompt'\]\)"):
    post_data.make_sft_data(config, tokenizer)
  config.post.data = _write(tmp_path / 'b.jsonl', [])
  with pytest.raises(sources.DataError, match='holds no records'):
    post_data.make_sft_data(config, tokenizer)
  config.post.data = f'jsonl:{tmp_path}/missing*.jsonl'
  with pytest.raises(sources.DataError, match='no files match'):
    post_data.make_sft_data(config, tokenizer)
  config.post.data = _write(tmp_path / 'c.jsonl', [{'prompt': 'x', 'response': 'y'}])
  with pytest.raises(sources.DataError, match='1 usable example'):
    post_data.make_sft_data(config, tokenizer)


def test_the_tokenizer_must_fit_the_model(tokenizer):
  config = config_lib.base_config()
  config.data.tokenizer = tokenizer.path
  assert post_data.load_tokenizer(config, 512).path == tokenizer.path
  with pytest.raises(config_lib.ConfigError, match='vocab_size=1000 but the tokenizer'):
    post_data.load_tokenizer(config, 1000)
  config.data.tokenizer = ''
  with pytest.raises(config_lib.ConfigError, match='needs the tokenizer the model was trained'):
    post_data.load_tokenizer(config, 512)


def test_post_config_is_validated():
  config = config_lib.base_config()
  config.mode = 'sft'
  with pytest.raises(config_lib.ConfigError, match='needs config.post.data'):
    config_lib.validate(config)
  config.post.data = 'text:x.txt'
  with pytest.raises(config_lib.ConfigError, match='expected jsonl:GLOB'):
    config_lib.validate(config)
  config.post.update(data='jsonl:x.jsonl', chat_template='nope')
  with pytest.raises(config_lib.ConfigError, match="chat_template='nope'"):
    config_lib.validate(config)
  config.post.update(chat_template='', template='nope')
  with pytest.raises(config_lib.ConfigError, match="template='nope'"):
    config_lib.validate(config)
  config.post.template = 'qa'
  config_lib.validate(config)
  assert isinstance(config.post, ml_collections.ConfigDict)


def test_stdlib_functions_are_real_prompt_response_pairs():
  import itertools  # pylint: disable=g-import-not-at-top
  records = list(itertools.islice(post_data.stdlib_functions(), 200))
  assert len(records) == 200
  location, record = records[0]
  assert ':' in location and record['prompt'].startswith(('def ', 'async def '))
  assert '"""' in record['prompt'] or "'''" in record['prompt']
  assert record['response'].strip() and not record['response'].startswith((' ' * 8))
