"""mode='reward': the Bradley-Terry loss against TRL's RewardTrainer, and a reward model that
learns a preference and keeps its head in the checkpoint."""

import json
import os

import jax
import numpy as np
import pytest

import requirements
from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import generate
from lm import model as model_lib
from lm import train as train_lib
from lm.post import data as post_data
from lm.post import dpo
from lm.post import reward
from test_post_dpo import RECORDS


def _pair_rows(tokenizer, records, seq_len=128):
  pairs = [tuple(reward.through_eos(post_data.encode_example(
      [(r['prompt'], False), (r[side], True)], tokenizer, seq_len, post_data.Counts()),
      tokenizer.pad_id) for side in dpo.SIDES) for r in records]
  return dpo.PairRows(pairs, seq_len, tokenizer.pad_id)


def test_the_loss_equals_trls_reward_trainer(tiny_llama):
  torch, datasets, trl = (requirements.require(n) for n in ('torch', 'datasets', 'trl'))
  transformers = requirements.require('transformers')
  graphdef, params, tokenizer, config = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  hf = transformers.LlamaForSequenceClassification.from_pretrained(
      tiny_llama.hf, num_labels=1, pad_token_id=tokenizer.pad_id).eval()
  torch.manual_seed(0)
  with torch.no_grad():
    hf.score.weight.normal_(0, 0.5)
  config.model.reward_head = True
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  params = dict(params, reward_head=hf.score.weight[0].detach().numpy())
  records = RECORDS[:6]
  rows = _pair_rows(tokenizer, records)
  _, sums = reward.loss_sums(params, {k: np.asarray(v) for k, v in rows.arrays.items()},
                             graphdef=model_lib.graphdef(cfg))
  ours = float(sums['loss'] / sums['pairs'])

  bos, eos = [tokenizer.bos_id], [tokenizer.eos_id]
  examples = [{side + '_ids': bos + tokenizer.encode(r['prompt']) + tokenizer.encode(r[side]) + eos
               for side in dpo.SIDES} for r in records]
  # A pad piece of its own: with pad = EOS, a sequence classifier would read the token before
  # the EOS (the last non-pad one) instead of the EOS.
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama.hf)
  hf_tokenizer.pad_token = hf_tokenizer.convert_ids_to_tokens(tokenizer.pad_id)
  trainer = trl.RewardTrainer(
      model=hf, processing_class=hf_tokenizer,
      args=trl.RewardConfig(output_dir=os.path.join(os.path.dirname(tiny_llama.hf), 'trl_rm'),
                            report_to=[], use_cpu=True, bf16=False, max_length=None,
                            center_rewards_coefficient=None,
                            per_device_train_batch_size=len(examples)),
      train_dataset=datasets.Dataset.from_list(records))
  with torch.no_grad():
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
  assert ours == pytest.approx(theirs, abs=1e-5)
  assert abs(ours - np.log(2)) > 1e-3  # The head reads something.


def test_a_reward_model_learns_the_preference_and_saves_its_head(tiny_llama, tmp_path):
  path = tmp_path / 'pairs.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in RECORDS))
  config = config_lib.config_from_checkpoint(tiny_llama.lm)
  config.mode = 'reward'
  config.model.update(reward_head=True, dtype='float32')
  config.post.update(data=f'jsonl:{path}', eval_fraction=0.15)
  config.data.seq_len = 64
  config.train.update(steps=60, batch_size=8, warmup_steps=2, learning_rate=3e-3,
                      weight_decay=0.0, log_every=10, eval_every=60, eval_batches=4,
                      checkpoint_every=60)
  state, metrics = train_lib.train(config, str(tmp_path / 'rm'))
  assert metrics['eval_accuracy'] > 0.9, metrics
  saved = checkpoint_lib.params_shapes(str(tmp_path / 'rm'))
  assert saved['reward_head'].shape == (config.model.d_model,)
  restored = checkpoint_lib.restore_params(
      str(tmp_path / 'rm'), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                         state.params))
  np.testing.assert_array_equal(restored['reward_head'], state.params['reward_head'])


def test_reward_mode_needs_the_head(tiny_llama):
  config = config_lib.config_from_checkpoint(tiny_llama.lm)
  config.update(mode='reward')
  config.post.data = 'stdlib:function_pairs'
  with pytest.raises(config_lib.ConfigError, match='reward_head=True'):
    config_lib.validate(config)


def test_a_lora_run_trains_the_scalar_heads_with_the_adapters():
  """A fresh head must learn: trainable='lora' trains the reward (and value) head too."""
  config = config_lib.base_config()
  config.model.update(reward_head=True, value_head=True)
  config.lora.update(rank=4, targets='all')
  config.train.trainable = 'lora'
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  trained = train_lib.trained_paths(config.train, model_lib.logical_axes(cfg))
  assert ('reward_head',) in trained and ('value_head',) in trained
  assert all(p[-1].endswith(('_lora_a', '_lora_b')) for p in trained
             if p not in (('reward_head',), ('value_head',)))


def test_an_moe_reward_model_adds_its_router_losses(tiny_llama):
  _, _, tokenizer, config = generate.load_checkpoint(tiny_llama.lm, dtype='float32')
  config.model.update(reward_head=True)
  config.model.moe.update(num_experts=4, top_k=2, capacity_factor=2.0)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  rows = _pair_rows(tokenizer, RECORDS[:4])
  batch = {k: np.asarray(v) for k, v in rows.arrays.items()}
  objective, sums = reward.loss_sums(model_lib.init_params(cfg, 0), batch,
                                     graphdef=model_lib.graphdef(cfg))
  assert float(sums['moe_loss']) > 0 and 'moe_router_z' in sums and float(sums['pairs']) == 4
  np.testing.assert_allclose(float(objective), float(sums['loss'] + sums['moe_loss']), rtol=1e-6)
