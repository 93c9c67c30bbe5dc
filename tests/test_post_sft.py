"""mode='sft' end to end: lm.train's loop on lm.post.data's rows, against TRL's SFT loss."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import requirements
from lm import config as config_lib
from lm import generate
from lm import train as train_lib
from lm.post import data as post_data

# Real text as prompt/response pairs: a line of the standard library and the line after it.
_LINES = [line for line in open(os.__file__, encoding='utf-8').read().splitlines()
          if len(line.strip()) > 12][:240]
RECORDS = [{'prompt': a, 'response': '\n' + b} for a, b in zip(_LINES[::2], _LINES[1::2])]


@pytest.fixture(scope='module')
def sft_data(tmp_path_factory):
  path = tmp_path_factory.mktemp('sft') / 'pairs.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in RECORDS))
  return f'jsonl:{path}'


def _config(checkpoint, data, **train):
  config = config_lib.config_from_checkpoint(checkpoint)
  config.mode = 'sft'
  config.post.update(data=data, eval_fraction=0.1)
  config.data.seq_len = 64
  config.model.dtype = 'float32'
  config.train.update(dict(steps=6, batch_size=4, warmup_steps=1, learning_rate=1e-3,
                           log_every=2, eval_every=6, eval_batches=2, checkpoint_every=3), **train)
  return config


def _examples(tokenizer, records, max_tokens=65):
  return [post_data.encode_example([(r['prompt'], False), (r['response'], True)], tokenizer,
                                   max_tokens, post_data.Counts()) for r in records]


def _loss(graphdef, params, rows):
  _, sums = train_lib.loss_sums(params, {k: np.asarray(v) for k, v in rows.arrays.items()},
                                graphdef=graphdef)
  return float(sums['nll'] / sums['tokens'])


def test_the_loss_equals_trls_completion_only_sft_loss(tiny_llama):
  torch, datasets, trl = (requirements.require(n) for n in ('torch', 'datasets', 'trl'))
  transformers = requirements.require('transformers')
  graphdef, params, tokenizer, _ = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  examples = _examples(tokenizer, RECORDS[:6])
  ours = _loss(graphdef, params, post_data.PackedRows(examples, 128, False, tokenizer.pad_id))
  packed = post_data.PackedRows(examples, 128, True, tokenizer.pad_id)
  assert len(packed) < len(examples)  # Packing changes rows, not the loss.
  assert _loss(graphdef, params, packed) == pytest.approx(ours, abs=1e-5)

  rows = [{'input_ids': e.tokens.tolist(), 'completion_mask': [0] + e.trained.astype(int).tolist()}
          for e in examples]
  trainer = trl.SFTTrainer(
      model=tiny_llama.model, processing_class=transformers.AutoTokenizer.from_pretrained(
          tiny_llama.hf),
      args=trl.SFTConfig(output_dir=os.path.join(os.path.dirname(tiny_llama.hf), 'trl'),
                         completion_only_loss=True, report_to=[], use_cpu=True, bf16=False,
                         max_length=None, per_device_train_batch_size=len(rows)),
      train_dataset=datasets.Dataset.from_list(rows))
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
  with torch.no_grad():  # TRL's own labels: -100 outside the completion.
    theirs = trainer.compute_loss(trainer.model, batch).item()
  assert ours == pytest.approx(theirs, abs=1e-5)


def test_prompt_targets_do_not_count(tiny_llama):
  graphdef, params, tokenizer, _ = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  rows = post_data.PackedRows(_examples(tokenizer, RECORDS[:6]), 64, True, tokenizer.pad_id)
  before = _loss(graphdef, params, rows)
  untrained = rows.arrays['loss_mask'] == 0
  rows.arrays['targets'][untrained] = (rows.arrays['targets'][untrained] + 7) % 400
  assert _loss(graphdef, params, rows) == before


def test_sft_trains_resumes_exactly_and_never_updates_frozen_base_weights(tiny_llama, sft_data,
                                                                          tmp_path):
  straight, metrics = train_lib.train(_config(tiny_llama.lm, sft_data), str(tmp_path / 'a'))
  assert int(straight.step) == 6 and np.isfinite(metrics['eval_loss'])
  config = _config(tiny_llama.lm, sft_data, steps_per_run=3)
  train_lib.train(config, str(tmp_path / 'b'))
  config.train.steps_per_run = 0
  resumed, _ = train_lib.train(config, str(tmp_path / 'b'))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.params),
               jax.device_get(resumed.params))
  rows = [json.loads(line) for line in open(tmp_path / 'a' / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 4, 6]

  config = _config(tiny_llama.lm, sft_data, trainable='lora')
  config.lora.update(rank=4, alpha=8.0, targets='all')
  lora, _ = train_lib.train(config, str(tmp_path / 'lora'))
  _, base, _, _ = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  np.testing.assert_array_equal(lora.params['embed'], base['embed'])
  np.testing.assert_array_equal(lora.params['blocks']['attention']['w_q'],
                                base['blocks']['attention']['w_q'])
  assert not np.allclose(lora.params['blocks']['attention']['w_q_lora_b'], 0)


def test_the_sft_config_runs_from_the_command_line(tiny_llama, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', os.path.join(root, 'configs', 'post', 'sft.py'),
       '--workdir', str(tmp_path / 'sft'), f'--config.init_from={tiny_llama.lm}',
       '--config.post.max_examples=120', '--config.data.seq_len=64', '--config.train.steps=4',
       '--config.train.batch_size=4', '--config.train.warmup_steps=1',
       '--config.train.log_every=2', '--config.train.eval_every=4', '--config.model.dtype=float32'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Post-training data:' in result.stderr and 'step 4/4: loss' in result.stderr
  assert sorted(os.listdir(tmp_path / 'sft' / 'checkpoints')) == ['4']
