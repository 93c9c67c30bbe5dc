"""The memory planner against XLA's own figure for the compiled sharded train step (8 devices).

Compile only: jax.ShapeDtypeStruct inputs, so nothing is allocated or run, and the models can be
bigger than the other multi-device tests use.
"""

import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm import memory


def _config(mesh, B=32, T=256, accum=1, lora=None, trainable='all', **model):
  config = config_lib.base_config()
  config.model.update(
      vocab_size=4096, d_model=256, num_layers=2, num_heads=8, num_kv_heads=8, d_ff=768,
      max_seq_len=T, dtype='float32', attention='xla')
  config.model.update(model)
  config.lora.update(lora or {})
  config.train.update(batch_size=B, grad_accum_steps=accum, trainable=trainable)
  config.data.seq_len = T
  config.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, **mesh})
  return config


_WIDER = dict(B=16, T=512, num_layers=4, d_model=512, d_ff=1536, vocab_size=8192)

# (config, devices): every strategy, with and without remat. fp32 only: XLA:CPU computes bf16
# matmuls and elementwise ops in fp32, so its bf16 figure says nothing about a GPU's.
CASES = {
    'data8': (_config(dict(data=8)), 8),
    'fsdp8_remat': (_config(dict(fsdp=8), remat=True, scan_layers=True, **_WIDER), 8),
    'data2_tensor4_gqa': (_config(dict(data=2, tensor=4), num_kv_heads=4), 8),
    'data2_fsdp2_tensor2': (_config(dict(data=2, fsdp=2, tensor=2), **_WIDER), 8),
    'data2_fsdp2_tensor2_remat': (
        _config(dict(data=2, fsdp=2, tensor=2), remat=True, scan_layers=True, **_WIDER), 8),
    'data4_accum2': (_config(dict(data=4), B=32, accum=2), 4),
    'data2_fsdp2_tensor2_blocked_attention': (
        _config(dict(data=2, fsdp=2, tensor=2), attention='blocked'), 8),
    # LoRA: gradients and AdamW state for the adapters only.
    'fsdp8_lora': (_config(dict(fsdp=8), lora=dict(rank=16), trainable='lora', **_WIDER), 8),
    'data2_fsdp2_tensor2_lora_embeddings': (_config(
        dict(data=2, fsdp=2, tensor=2), lora=dict(rank=8),
        trainable='lora,embeddings'), 8),
    # Unrolled remat saves nothing in XLA; the planner says so, and so does XLA.
    'data8_remat_unrolled': (_config(dict(data=8), remat=True), 8),
}


@pytest.mark.parametrize('name', CASES)
def test_estimate_is_within_15_percent_of_xla(name):
  config, num_devices = CASES[name]
  xla = memory.xla_bytes(config, jax.devices()[:num_devices])
  planned = memory.estimate(config, num_devices=num_devices)
  assert planned.total == pytest.approx(xla['total'], rel=0.15), (planned, xla)
  # Parameters and AdamW's moments are exact: XLA's arguments are those plus the batch shards
  # and a few scalars (step, rng, optimizer counts).
  batch = 5 * config.train.batch_size * config.data.seq_len * 4 // (
      config.mesh.data * config.mesh.fsdp)
  assert 0 <= xla['argument'] - (planned.parameters + planned.optimizer + batch) < 256
  if name == 'data8_remat_unrolled':
    off = memory.estimate(memory.remat_options(config)['remat off'], num_devices=num_devices)
    assert planned.total == off.total


def test_lora_dpo_train_step_is_within_15_percent_of_xla(tmp_path):
  """A preference pair is two rows; LoRA trains the adapters only. The run's data and reference
  (post.data, init_from) are never read, but setup validates that they are named."""
  config = _config(dict(data=2, fsdp=2, tensor=2), B=16, lora=dict(rank=8), trainable='lora')
  config.update(mode='dpo', init_from=str(tmp_path))
  config.post.data = 'stdlib:function_pairs'
  xla = memory.xla_bytes(config, jax.devices())
  planned = memory.estimate(config, num_devices=8)
  assert planned.micro_batch == 2 * 16 // 4 and planned.reference_pass < planned.train_step
  assert planned.train_step == pytest.approx(xla['total'], rel=0.15), (planned, xla)
  # Both sides' rows and the reference's log-probabilities: 12 [pairs, seq_len] arrays.
  fields = memory.batch_fields('dpo')
  batch = sum(np.dtype(d).itemsize for d in fields.values()) * 16 * config.data.seq_len // 4
  assert len(fields) == 12
  assert 0 <= xla['argument'] - (planned.parameters + planned.optimizer + batch) < 256
