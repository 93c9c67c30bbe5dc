import json

import jax
import pytest

from lm import config as config_lib
from lm import flops
from lm import model as model_lib
from lm import train as train_lib


def _config(block='llama', tie=False, trainable='all', lora_rank=0):
  config = config_lib.base_config()
  config.model.update(block=block, vocab_size=256, d_model=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, d_ff=256, max_seq_len=16, tie_embeddings=tie,
                      dtype='float32')
  config.lora.update(rank=lora_rank, targets='all')
  config.train.update(trainable=trainable, batch_size=4, steps=10, warmup_steps=1)
  config.data.seq_len = 16
  return config


def _abstract_params(config):
  cfg = model_lib.ModelConfig.from_config(config)
  return cfg, jax.eval_shape(lambda: model_lib.init_params(cfg, 0))


@pytest.mark.parametrize('block,tie', [('llama', False), ('llama', True), ('gpt2', True)])
def test_matmul_params_of_the_tree_match_the_formula(block, tie):
  cfg, params = _abstract_params(_config(block, tie))
  assert flops.matmul_param_counts(params, None, tie) == (flops.matmul_params(cfg),) * 2


def test_frozen_weights_cost_no_weight_gradient():
  config = _config(trainable='lora,embeddings', lora_rank=8)
  cfg, params = _abstract_params(config)
  trained = train_lib.trained_paths(config.train, model_lib.logical_axes(cfg))
  matmul, trained_matmul = flops.matmul_param_counts(params, trained, cfg.tie_embeddings)
  adapters = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if 'lora' in path[-1].key)
  assert matmul == flops.matmul_params(cfg) + adapters
  assert trained_matmul == adapters + cfg.d_model * cfg.vocab_size  # Adapters and unembed.
  per_token = flops.flops_per_token(cfg, 16, matmul, trained_matmul)
  attention = flops.flops_per_token(cfg, 16, 0, 0)
  assert per_token == 4 * matmul + 2 * trained_matmul + attention
  assert per_token < flops.flops_per_token(cfg, 16, matmul, matmul)
  assert 'N_trained' in flops.describe_flops(matmul, trained_matmul)
  assert flops.describe_flops(matmul, matmul).startswith('6N')


def _compiled_flops(config):
  run = train_lib.setup(config)
  shape = (config.train.batch_size, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, 'int32', sharding=run.batch_sharding)
           for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  batch['loss_mask'] = jax.ShapeDtypeStruct(shape, 'float32', sharding=run.batch_sharding)
  with run.active():
    cost = run.step_fn.lower(run.abstract_state(), batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  params = run.abstract_state().params
  matmul, trained = flops.matmul_param_counts(params, run.trained, run.cfg.tie_embeddings)
  return cost['flops'], flops.flops_per_token(run.cfg, config.data.seq_len, matmul, trained)


def test_the_count_follows_what_xla_compiles_for_a_frozen_base():
  """XLA's own FLOP count of the compiled step falls with the frozen weights as 4N + 2N_trained
  says (a 6N count would claim no change)."""
  full_xla, full_model = _compiled_flops(_config())
  frozen_xla, frozen_model = _compiled_flops(_config(trainable='embeddings'))
  assert frozen_model / full_model == pytest.approx(frozen_xla / full_xla, abs=0.05)
  assert frozen_xla / full_xla < 0.85


def test_cpu_peak_keeps_the_best_measurement(tmp_path, monkeypatch):
  cache = tmp_path / 'peak.json'
  monkeypatch.setattr(flops, '_CACHE', str(cache))
  measured = {'float32': 50e9, 'bfloat16': 20e9}
  monkeypatch.setattr(flops, 'measure_matmul_flops', lambda dtype, **_: measured[dtype])
  key = flops._cpu_key()
  # A figure cached on a busy machine is raised by a fresh, higher one...
  cache.write_text(json.dumps({key: {'float32': 10e9, 'bfloat16': 30e9}}))
  assert flops.cpu_peak_flops.__wrapped__() == {'float32': 50e9, 'bfloat16': 30e9}
  assert json.loads(cache.read_text())[key] == {'float32': 50e9, 'bfloat16': 30e9}
  # ...and a busy moment now never lowers the best seen.
  measured.update(float32=5e9, bfloat16=5e9)
  assert flops.cpu_peak_flops.__wrapped__() == {'float32': 50e9, 'bfloat16': 30e9}
  cache.write_text('not json')  # A damaged cache costs only the fresh measurement.
  assert flops.cpu_peak_flops.__wrapped__() == {'float32': 5e9, 'bfloat16': 5e9}
