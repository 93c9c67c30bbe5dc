"""The memory planner against XLA's own figure for the compiled sharded train step (8 devices).

Compile only: jax.ShapeDtypeStruct inputs, so nothing is allocated or run, and the models can be
bigger than the other multi-device tests use.
"""

import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm import memory


def _config(mesh, B=32, T=256, accum=1, lora=None, trainable='all', moe=None, **model):
  config = config_lib.base_config()
  config.model.update(
      vocab_size=4096, d_model=256, num_layers=2, num_heads=8, num_kv_heads=8, d_ff=768,
      max_seq_len=T, dtype='float32', attention='xla')
  config.model.update(model)
  config.model.moe.update(moe or {})
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


def _dpo(config, reference: str):
  """config as a DPO run: its data and reference (post.data, init_from) are never read, but
  setup validates that they are named."""
  config.update(mode='dpo', init_from=reference)
  config.post.data = 'stdlib:function_pairs'
  return config


def _check_dpo(config) -> tuple[memory.Estimate, dict]:
  """(plan, XLA's train step): the planned train step, reference pass and peak each within 15%
  of XLA's (8 devices), the reference pass below the train step, and completing the reference's
  params holding only the fresh leaves beside the restored ones (no second model)."""
  devices = jax.devices()
  step, reference = memory.xla_bytes(config, devices), memory.xla_reference_bytes(config, devices)
  planned = memory.estimate(config, num_devices=8)
  assert planned.train_step == pytest.approx(step['total'], rel=0.15), (planned, step)
  assert planned.reference_pass == pytest.approx(reference['total'], rel=0.15), (
      planned, reference)
  assert planned.total == pytest.approx(max(step['total'], reference['total']), rel=0.15)
  assert planned.reference_pass < planned.train_step and reference['total'] < step['total']
  complete = reference['complete']
  assert complete['alias'] == complete['argument']  # The restored leaves are passed through.
  assert 0 <= complete['output'] - complete['alias'] - planned.reference_fresh < 256
  assert complete['temp'] <= max(planned.reference_fresh, 256)  # The fresh leaves' init only.
  return planned, step


def test_lora_dpo_is_within_15_percent_of_xla(tmp_path):
  """A preference pair is two rows; LoRA trains the adapters only."""
  config = _dpo(_config(dict(data=2, fsdp=2, tensor=2), B=16, lora=dict(rank=8),
                        trainable='lora'), str(tmp_path))
  planned, xla = _check_dpo(config)
  assert planned.micro_batch == 2 * 16 // 4 and planned.reference_fresh > 0
  # Both sides' rows and the reference's log-probabilities: 12 [pairs, seq_len] arrays.
  fields = memory.batch_fields('dpo')
  batch = sum(np.dtype(d).itemsize for d in fields.values()) * 16 * config.data.seq_len // 4
  assert len(fields) == 12
  assert 0 <= xla['argument'] - (planned.parameters + planned.optimizer + batch) < 256


# DPO in micro-batches: the reference pass runs one side of one micro-batch at a time.
DPO_ACCUM_CASES = {
    'dpo_data2_fsdp2_tensor2_accum4': _config(dict(data=2, fsdp=2, tensor=2), B=32, accum=4),
    'lora_dpo_data4_fsdp2_accum2': _config(dict(data=4, fsdp=2), B=32, accum=2,
                                           lora=dict(rank=8), trainable='lora'),
}


@pytest.mark.parametrize('name', DPO_ACCUM_CASES)
def test_dpo_with_gradient_accumulation_is_within_15_percent_of_xla(name, tmp_path):
  config = _dpo(DPO_ACCUM_CASES[name].copy_and_resolve_references(), str(tmp_path))
  planned, _ = _check_dpo(config)
  pairs = config.train.batch_size // config.train.grad_accum_steps
  assert planned.micro_batch == 2 * pairs // (config.mesh.data * config.mesh.fsdp)


# Mixture of Experts: 8 experts of width 384 (top-2, capacity 1.25: C = 80 slots per row) in
# every block; the batch is split over data x fsdp x expert.
_MOE = dict(d_ff=384, moe=dict(num_experts=8, top_k=2, capacity_factor=1.25))
MOE_CASES = {
    'moe_capacity_data2_expert4': _config(dict(data=2, expert=4), **_MOE),
    'moe_capacity_fsdp2_tensor2_expert2': _config(dict(fsdp=2, tensor=2, expert=2), **_MOE),
    'moe_capacity_fsdp2_tensor2_expert2_remat': _config(
        dict(fsdp=2, tensor=2, expert=2), remat=True, scan_layers=True, **_MOE),
    # XLA:CPU computes ragged_dot as one masked dense matmul per expert ([E, A, D] buffers), so
    # only with one expert does its figure stand for a grouped matmul's (GPUs, TPUs).
    'moe_dropless_data8_one_expert': _config(
        dict(data=8), d_ff=384, moe=dict(num_experts=1, top_k=1, capacity_factor=0.0)),
}


@pytest.mark.parametrize('name', MOE_CASES)
def test_moe_estimate_is_within_15_percent_of_xla(name):
  config = MOE_CASES[name]
  xla = memory.xla_bytes(config, jax.devices())
  planned = memory.estimate(config, num_devices=8)
  assert planned.total == pytest.approx(xla['total'], rel=0.15), (planned, xla)
  # Parameters and AdamW's moments are exact, the experts split over expert: XLA's arguments
  # are those, the batch split over data x fsdp x expert, and a few scalars.
  m = config.mesh
  batch = 5 * config.train.batch_size * config.data.seq_len * 4 // (m.data * m.fsdp * m.expert)
  assert 0 <= xla['argument'] - (planned.parameters + planned.optimizer + batch) < 256
