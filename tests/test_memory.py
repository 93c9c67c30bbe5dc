"""The memory planner's arithmetic, fit search, table and CLI (one device; nothing compiles).

tests/multidevice/test_memory.py checks the same estimates against XLA's compiled train step.
"""

import math
import os
import subprocess
import sys

import jax
import pytest

from lm import config as config_lib
from lm import memory
from lm import model as model_lib
from lm import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, H, K, F, V, L, T = 32, 4, 2, 64, 64, 2, 16


def _config(mesh=(1, 1, 1), B=16, accum=1, moe=None, **model):
  config = config_lib.base_config()
  config.model.update(vocab_size=V, d_model=D, num_layers=L, num_heads=H, num_kv_heads=K,
                      d_ff=F, max_seq_len=T, dtype='float32')
  config.model.update(model)
  config.model.moe.update(moe or {})
  config.train.update(batch_size=B, grad_accum_steps=accum)
  config.data.seq_len = T
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh)))
  return config


def _num_params(config):
  cfg = memory.model_config(config)
  return model_lib.count_params(jax.eval_shape(lambda: model_lib.init_params(cfg, 0)))


def test_unsharded_parameters_gradients_and_adam_are_16_bytes_per_param_in_fp32():
  config = _config()
  e = memory.estimate(config, (1, 1, 1))
  n = _num_params(config)
  assert e.num_params == n
  assert e.parameters == e.gradients == 4 * n
  assert e.optimizer == 8 * n
  assert e.parameters + e.gradients + e.optimizer == 16 * n
  assert e.accumulation == e.reduction == 0  # One micro-batch, one device.
  bf16 = memory.estimate(_config(param_dtype='bfloat16'), (1, 1, 1))
  assert bf16.parameters + bf16.gradients + bf16.optimizer == 8 * n


def test_lora_plans_gradients_and_adam_for_the_adapters_only():
  config = _config()
  config.lora.update(rank=4, targets='q,down')
  config.train.trainable = 'lora'
  e = memory.estimate(config, (1, 1, 1))
  adapters = L * 4 * ((D + H * (D // H)) + (F + D))  # r (in + out) for w_q and w_down.
  assert e.num_params == _num_params(config)
  assert e.parameters == 4 * e.num_params
  assert e.gradients == 4 * adapters and e.optimizer == 8 * adapters
  config.train.trainable = 'lora,embeddings'
  assert memory.estimate(config, (1, 1, 1)).optimizer == 8 * (adapters + 2 * V * D)


def _mode(config, mode):
  config.mode = mode
  return config


def test_dpo_plans_a_pair_as_two_rows_the_activations_of_sft_at_twice_the_batch():
  for remat in (False, True):
    for mesh in [(1, 1, 1), (2, 2, 2)]:
      dpo, sft = (memory.estimate(_mode(_config(B=B, remat=remat, scan_layers=remat), mode), mesh)
                  for B, mode in ((8, 'dpo'), (16, 'sft')))
      assert (dpo.rows_per_example, sft.rows_per_example) == (2, 1)
      assert dpo.micro_batch == sft.micro_batch == 16 // (mesh[0] * mesh[1])
      assert dpo.activations == sft.activations and dpo.logits == sft.logits
      assert dpo.train_step == sft.train_step == sft.total


def test_lora_dpo_plans_gradients_and_adam_for_the_adapters_only():
  config = _mode(_config(B=8), 'dpo')
  config.lora.update(rank=4, targets='all')
  full = memory.estimate(config, (1, 1, 1))
  config.train.trainable = 'lora'
  lora = memory.estimate(config, (1, 1, 1))
  Q = D // H
  # r (in + out) of each adapted projection: q, k, v, o, gate, up, down.
  adapters = L * 4 * ((D + H * Q) + 2 * (D + K * Q) + (H * Q + D) + 3 * (D + F))
  assert lora.gradients == 4 * adapters and lora.optimizer == 8 * adapters
  assert lora.parameters == full.parameters == full.gradients  # The base weights stay.
  assert lora.activations == full.activations  # The backward pass still runs through every block.
  assert lora.reference_pass == full.reference_pass  # The reference: base and (zero) adapters.
  assert lora.reference_fresh == 4 * adapters  # What the base checkpoint lacks starts fresh.


def test_dpo_plans_the_reference_pass_at_the_train_steps_micro_batch():
  # 64 pairs a step in micro-batches of one: the reference's forward passes take one side of
  # one micro-batch at a time, b = 1 row, not the whole batch's 64.
  config = _mode(_config(B=64, accum=64), 'dpo')
  e = memory.estimate(config, (1, 1, 1))
  b, c, Q = 1, 4, D // H
  block = b * T * c * (D + K * Q) + b * H * T * T * (8 + c)
  head = b * T * (D * c + 4 * V)
  assert e.micro_batch == 2 and e.reference_activations == max(block, head)
  assert e.reference_fresh == 0  # No LoRA adapters, no scalar head: nothing starts fresh.
  assert e.reference_pass == e.parameters + e.weights + e.reference_activations
  assert e.total == e.train_step > e.reference_pass
  text, fits = memory.fit_report(config, 1, device_gb=1)
  assert fits and 'GiB spare, peak in the train step)' in text
  # Split over data x fsdp like the micro-batch: 4 pairs over 4 devices.
  config.train.grad_accum_steps = 16
  assert memory.estimate(config, (2, 2, 1)).reference_activations == max(block, head)
  config.train.grad_accum_steps = 1
  assert memory.estimate(config, (2, 2, 1)).reference_activations == max(block * 16, head * 16)
  sft = memory.estimate(_mode(_config(B=64, accum=64), 'sft'), (1, 1, 1))
  assert sft.reference_activations == sft.reference_pass == 0 and sft.total == sft.train_step


def test_the_dpo_reference_pass_is_never_the_peak():
  """Half the train step's rows, forward only: below the train step on every mesh, remat
  setting, micro-batch and attention (LoRA included, whose fresh adapters it adds)."""
  for accum in (1, 8, 64):  # 64: one pair per micro-batch.
    for mesh in [(1, 1, 1), (1, 1, 2)] + memory.meshes(8):
      for remat in (False, True):
        for attention in ('xla', 'blocked'):
          config = _mode(_config(B=64, accum=accum, remat=remat, scan_layers=remat,
                                 attention=attention), 'dpo')
          for lora in (0, 4):
            config.lora.update(rank=lora, targets='all')
            config.train.trainable = 'lora' if lora else 'all'
            try:
              e = memory.estimate(config, mesh)
            except sharding.ShardingError:
              continue  # Heads or kv heads that the tensor split does not divide.
            assert 0 < e.reference_pass < e.train_step, (mesh, remat, accum, attention, lora)


def test_a_reward_model_plans_pairs_without_logits():
  reward = memory.estimate(_mode(_config(B=8, reward_head=True), 'reward'), (1, 1, 1))
  language_model = memory.estimate(_config(B=16, reward_head=True), (1, 1, 1))
  assert reward.micro_batch == language_model.micro_batch == 16 and reward.logits == 0
  output_gradient = 4 * V * D
  assert language_model.activations - reward.activations == (language_model.logits
                                                             + output_gradient)
  assert reward.reference_pass == 0


def test_a_plan_needs_no_post_training_data_or_checkpoints():
  config = _mode(_config(), 'dpo')
  with pytest.raises(config_lib.ConfigError, match='needs config.post.data'):
    config_lib.validate(config)
  memory.validate(config)
  config.init_from = config.post.reference = '/no/such/checkpoint'
  memory.validate(config)
  with pytest.raises(config_lib.ConfigError, match='config.model.reward_head=True'):
    memory.validate(_mode(config, 'reward'))  # What is not about data is still checked.


def test_parameter_bytes_are_split_as_the_sharding_rules_say():
  config = _config(B=64)
  n = _num_params(config)
  norms = (2 * L + 1) * D  # Norm scales: the only parameters without a tensor-split axis.
  assert memory.estimate(config, (8, 1, 1)).parameters == 4 * n  # Replicated.
  assert memory.estimate(config, (1, 8, 1)).parameters == 4 * n // 8  # All have 'embed'.
  assert memory.estimate(config, (4, 1, 2)).parameters == 4 * ((n - norms) // 2 + norms)
  assert memory.estimate(config, (2, 2, 2)).parameters == 4 * ((n - norms) // 4 + norms // 2)


def test_activations_follow_the_documented_formula():
  config = _config(B=4)  # b = 4 sequences of T tokens on one device, fp32.
  Q, b, c = D // H, 4, 4
  block = b * T * c * (6 * D + 2 * (H + K) * Q + 5 * F) + b * H * T * T * (4 + c)
  logits = b * T * 2 * 4 * V
  head = b * T * 3 * D * c + logits
  e = memory.estimate(config, (1, 1, 1))
  assert e.logits == logits
  assert e.activations == L * block + head + 4 * V * D
  # Remat (with scan_layers) keeps each block's input, recomputes one block at a time, and the
  # scan's stacked block gradients exist throughout the backward pass.
  remat = memory.estimate(memory.remat_options(config)['remat on'], (1, 1, 1))
  blocks = remat.parameters - 4 * (2 * V * D + D)  # Everything but embeddings and final norm.
  assert remat.activations == L * b * T * D * c + max(block, head) + 4 * V * D + blocks


def test_blocked_attention_keeps_the_causal_triangle_and_slices_of_k_and_v():
  elements = memory._attention_elements  # pylint: disable=protected-access
  assert elements(128, 'xla') == elements(128, 'einsum') == (128 * 128, 0)
  # Blocks of 64 query rows: rows 0-63 see keys 0-63, rows 64-127 see keys 0-127.
  assert elements(128, 'blocked') == (64 * 64 + 64 * 128, 64 + 128)
  # At T = 16 (one block) the scores are the same; each layer adds its copies of k and v.
  xla, blocked = (memory.estimate(_config(B=1, attention=a), (1, 1, 1))
                  for a in ('xla', 'blocked'))
  assert blocked.activations - xla.activations == L * 2 * K * (D // H) * T * 4


def test_activations_grow_with_the_micro_batch_and_shrink_with_tensor_parallelism():
  small, large = (memory.estimate(_config(B=B), (1, 1, 1)) for B in (4, 8))
  output_gradient = 4 * V * D  # The only activation-phase buffer not per token.
  assert large.activations - output_gradient == 2 * (small.activations - output_gradient)
  assert large.micro_batch == 2 * small.micro_batch == 8
  data, tensor = (memory.estimate(_config(B=16), mesh) for mesh in [(2, 1, 1), (1, 1, 2)])
  assert data.micro_batch == 8 and tensor.micro_batch == 16
  assert tensor.activations < 2 * data.activations  # Heads, d_ff and vocab are split by 2.


def test_peak_holds_the_larger_of_gradients_and_activations_not_their_sum():
  # Many parameters, one short sequence per device: the gradients' all-reduce is the peak.
  e = memory.estimate(_config(B=8, d_ff=1024), (8, 1, 1))
  assert e.reduction == e.gradients == e.parameters  # Replicated gradients, all-reduced.
  assert e.gradients + e.reduction > e.activations + e.weights
  assert e.total == e.parameters + e.optimizer + e.gradients + e.reduction
  big = memory.estimate(_config(B=64), (1, 1, 1))
  assert big.total == big.parameters + big.optimizer + big.activations + big.weights
  accum = memory.estimate(_config(B=64, accum=2), (1, 1, 1))
  assert accum.accumulation == accum.parameters


def test_remat_without_scan_layers_is_planned_as_no_remat():
  unrolled = memory.estimate(_config(remat=True, scan_layers=False), (1, 1, 1))
  off = memory.estimate(_config(remat=False, scan_layers=False), (1, 1, 1))
  on = memory.estimate(_config(remat=True, scan_layers=True), (1, 1, 1))
  assert not unrolled.remat and unrolled.total == off.total
  assert on.remat and on.activations < off.activations


def test_meshes_come_in_order_of_preference():
  assert memory.meshes(8) == [
      (8, 1, 1, 1), (4, 2, 1, 1), (2, 4, 1, 1), (1, 8, 1, 1), (4, 1, 2, 1), (2, 2, 2, 1),
      (1, 4, 2, 1), (2, 1, 4, 1), (1, 2, 4, 1), (1, 1, 8, 1)]
  # An MoE model's: expert sizes that divide its 4 experts, after fsdp and before more data.
  assert memory.meshes(4, num_experts=4) == [
      (4, 1, 1, 1), (2, 1, 1, 2), (1, 1, 1, 4), (2, 2, 1, 1), (1, 2, 1, 2), (1, 4, 1, 1),
      (2, 1, 2, 1), (1, 1, 2, 2), (1, 2, 2, 1), (1, 1, 4, 1)]
  assert max(m[3] for m in memory.meshes(8, num_experts=6)) == 2


def test_search_prefers_no_remat_then_less_tensor_then_data_over_fsdp():
  config = _config(B=64, num_heads=8, num_kv_heads=8)
  everything = [memory.estimate(c, m) for c in memory.remat_options(config).values()
                for m in memory.meshes(8)]
  best, _ = memory.search(config, 8, device_bytes=math.inf)
  assert best.mesh == (8, 1, 1, 1) and not best.remat
  # Just below the data=8 plan, fsdp (which splits parameters and AdamW) must take over.
  data8 = memory.estimate(config, (8, 1, 1))
  best, _ = memory.search(config, 8, device_bytes=data8.total - 1)
  assert best.mesh == (4, 2, 1, 1) and not best.remat
  # Below every remat-off plan, remat turns on.
  budget = min(e.total for e in everything if not e.remat) - 1
  best, _ = memory.search(config, 8, device_bytes=budget)
  assert best.remat and best.total <= budget
  best, smallest = memory.search(config, 8, device_bytes=1)
  assert best is None and smallest.total == min(e.total for e in everything)


def test_a_mesh_or_batch_that_does_not_divide_is_a_clear_error():
  with pytest.raises(sharding.ShardingError,
                     match=r'blocks.attention.w_k: dimension 2 \(kv_heads=2\) is not divisible '
                           r'by tensor=4'):
    memory.estimate(_config(B=16), (2, 1, 4))
  with pytest.raises(sharding.ShardingError,
                     match=r'config.train.batch_size=12 / config.train.grad_accum_steps=1 is not '
                           r'divisible by data=8 x fsdp=1 x expert=1 = 8'):
    memory.estimate(_config(B=12), (8, 1, 1))
  with pytest.raises(sharding.ShardingError, match='the product 3 is not the device count 8'):
    memory.estimate(_config(mesh=(3, 1, 1)), num_devices=8)
  with pytest.raises(sharding.ShardingError, match='no data x fsdp x tensor mesh of 7 devices'):
    memory.search(_config(B=16), 7, device_bytes=math.inf)
  with pytest.raises(sharding.ShardingError,
                     match=r'no data x fsdp x tensor x expert mesh of 7 devices .*'
                           r'moe.num_experts=4\)'):
    memory.search(_config(B=16, moe=_MOE), 7, device_bytes=math.inf)
  with pytest.raises(sharding.ShardingError,
                     match=r'moe_blocks.mlp.w_down: dimension 1 \(expert=4\) is not divisible by '
                           r'expert=8'):
    memory.estimate(_config(B=16, moe=_MOE), (1, 1, 1, 8))


def test_plans_for_devices_that_do_not_exist():
  config = config_lib.load_config('configs/llama_7b.py')
  text, fits = memory.fit_report(config, 256, device_gb=1e6)
  assert fits and 'fits in 1e+06 GiB per device on 256 devices: data=256 fsdp=1 tensor=1' in text
  e = memory.estimate(config, (32, 8, 1))
  assert e.parameters == pytest.approx(4 * e.num_params / 8, rel=1e-3)


def _cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'lm.memory', '--config', 'configs/tiny.py', '--num_devices', '8',
       *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_prints_the_table_and_the_cheapest_mesh_that_fits():
  result = _cli('--device_gb', '1')
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert 'MiB per device' in out and 'remat off' in out and 'remat on' in out
  for row in ('parameters', 'gradients', 'optimizer state (AdamW mu, nu)', 'activations',
              'total (peak)'):
    assert f'\n  {row} ' in out
  assert 'rule of thumb, unsharded: 24 B/param' in out and 'AdamW 16 B/param' in out
  assert 'fits in 1 GiB per device on 8 devices: data=8 fsdp=1 tensor=1, remat off' in out
  assert '--config.mesh.data=8 --config.mesh.fsdp=1 --config.mesh.tensor=1' in out


def test_cli_plans_lora_dpo_with_its_reference_pass():
  result = _cli('--device_gb', '1', '--config.mode=dpo', '--config.train.trainable=lora',
                '--config.lora.rank=8')
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert 'mode dpo (a preference pair: 2 rows per batch entry), trains lora:' in out
  for row in ('train step', 'reference pass: parameters', 'reference pass: activations',
              'reference pass', 'total (peak)'):
    assert f'\n  {row} ' in out
  assert 'total = max(train step, reference pass)' in out
  assert 'GiB spare, peak in the train step)' in out


def test_cli_says_when_nothing_fits_and_how_much_is_missing():
  result = _cli('--device_gb', '0.001')
  assert result.returncode == 1
  assert 'nothing fits in 0.001 GiB per device on 8 devices: the smallest is' in result.stdout
  assert 'GiB more than there is' in result.stdout


def test_cli_names_the_parameter_a_mesh_does_not_divide():
  result = _cli('--config.mesh.data=2', '--config.mesh.tensor=4')
  assert result.returncode == 1
  assert ('blocks.attention.w_k: dimension 2 (kv_heads=2) is not divisible by tensor=4'
          in result.stderr)


# MoE: 4 experts of width F, top-2, in every block; capacity C = ceil(1.25 * 2 * T / 4) slots.
_MOE = dict(num_experts=4, top_k=2, capacity_factor=1.25)
E, TOP_K, C = 4, 2, 10


def _expert_params(config) -> tuple[int, int]:
  """(parameters of the experts' w_gate, w_up and w_down; of all the blocks)."""
  n = L * 3 * E * D * F
  return n, _num_params(config) - 2 * V * D - D  # Blocks: all but embeddings and final norm.


def test_moe_expert_weights_are_split_over_expert_and_reduced_over_the_other_batch_axes():
  config = _config(B=16, moe=_MOE)
  n, experts = _num_params(config), _expert_params(config)[0]
  assert memory.estimate(config, (1, 1, 1)).parameters == 4 * n
  # Experts split 4 ways, everything else (attention, router, norms, embeddings) replicated.
  e4 = memory.estimate(config, (1, 1, 1, 4))
  assert e4.mesh == (1, 1, 1, 4) and e4.num_params == n and e4.micro_batch == 4
  assert e4.parameters == e4.gradients == 4 * (n - experts + experts // 4)
  assert e4.optimizer == 2 * e4.parameters
  # The batch is split over expert too: the replicated parameters' gradients are all-reduced
  # over it, the experts' are not (each device's experts see only their own tokens).
  assert e4.reduction == 4 * (n - experts)
  data2 = memory.estimate(config, (2, 1, 1, 2))
  assert data2.reduction == 4 * (n - experts + experts // 2)  # Experts all-reduced over data.
  # Weights sliced out of the stacked blocks keep the expert split (capacity: experts compute
  # where they live); dropless gathers every expert to the tokens.
  blocks = _expert_params(config)[1]
  assert e4.weights == 4 * (blocks - experts + experts // 4)
  dropless = memory.estimate(_config(B=16, moe={**_MOE, 'capacity_factor': 0.0}), (1, 1, 1, 4))
  assert dropless.parameters == e4.parameters and dropless.weights == 4 * blocks
  assert dropless.reduction == 4 * n  # Gathered experts: reduce-scattered over expert.


def test_moe_activations_follow_the_documented_formula():
  b, c, Q = 4, 4, D // H
  trunk = b * T * c * (6 * D + 2 * (H + K) * Q) + b * H * T * T * (4 + c)
  capacity = (b * E * C * c * (2 * D + 5 * F) + 2 * b * T * E * C * c
              + b * T * TOP_K * (E + C) * 4 + 2 * b * T * E * 4)
  A = TOP_K * T * b  # One device: the rows it sorts are its own.
  dropless = A * c * (D + 5 * F) + b * T * TOP_K * D * c + 2 * b * T * E * 4
  head = b * T * 3 * D * c + b * T * 2 * 4 * V
  config = _config(B=4, moe=_MOE)
  assert memory.estimate(config, (1, 1, 1)).activations == (
      L * (trunk + capacity) + head + 4 * V * D)
  config = _config(B=4, moe={**_MOE, 'capacity_factor': 0.0})
  assert memory.estimate(config, (1, 1, 1)).activations == (
      L * (trunk + dropless) + head + 4 * V * D)
  # Every other block MoE, with remat: a scan step's group (a dense block and an MoE block) is
  # recomputed together, and the scan's stacked block gradients count from the backward's start.
  config = _config(B=4, num_layers=4, remat=True, scan_layers=True,
                   moe={**_MOE, 'every_n_layers': 2})
  e = memory.estimate(config, (1, 1, 1))
  blocks = _expert_params(config)[1]
  group = 2 * trunk + b * T * c * 5 * F + capacity
  assert e.remat and e.activations == 4 * b * T * D * c + group + 4 * V * D + 4 * blocks
  assert e.weights == 4 * blocks // 2  # One group's of the two.
  # On expert=4 (the same b), an MoE block's backward also holds its output gradient gathered
  # over expert, and the stacked gradients of the 2 MoE layers' experts are split 4 ways.
  config.train.batch_size = 16
  split = memory.estimate(config, (1, 1, 1, 4))
  experts = 2 * 3 * E * D * F
  assert split.micro_batch == 4 and split.activations - e.activations == (
      4 * b * T * D * c - 4 * experts * 3 // 4)


def test_capacity_keeps_more_than_dropless_on_one_device_and_less_on_many():
  """Capacity mode keeps capacity_factor x the assignments' rows (the empty slots too), and
  dispatch and combine; dropless keeps only the assignments, but every device sorts the whole
  micro-batch's, so on data=8 it keeps 8x its rows."""
  capacity, dropless = (_config(B=16, moe={**_MOE, 'capacity_factor': cf}) for cf in (1.25, 0.0))
  one = [memory.estimate(cfg, (1, 1, 1)).activations for cfg in (capacity, dropless)]
  assert one[0] > one[1]
  eight = [memory.estimate(cfg, (8, 1, 1)).activations for cfg in (capacity, dropless)]
  assert eight[1] > 2 * eight[0]
  # Capacity mode's activations split with the batch over expert, all but the output
  # projection's gradient (4 V D).
  e4 = memory.estimate(capacity, (1, 1, 1, 4))
  assert e4.micro_batch == 4 and 4 * (e4.activations - 4 * V * D) == one[0] - 4 * V * D


def test_search_picks_an_expert_mesh_when_that_is_what_fits():
  # Wide experts, a small batch: the experts' weights and AdamW state dominate.
  config = _config(B=8, d_ff=512, moe=_MOE)
  data8 = memory.estimate(config, (8, 1, 1))
  best, _ = memory.search(config, 8, device_bytes=math.inf)
  assert best.mesh == (8, 1, 1, 1) and not best.remat
  best, _ = memory.search(config, 8, device_bytes=data8.total - 1)
  assert best.mesh == (4, 1, 1, 2) and not best.remat  # Before fsdp, which gathers weights.
  assert best.parameters < data8.parameters
  everything = [memory.estimate(c, m) for c in memory.remat_options(config).values()
                for m in memory.meshes(8, num_experts=4) if m[2] <= K]  # tensor | kv heads.
  no_fsdp = min(e.total for e in everything if e.mesh[1] == 1 and e.mesh[2] == 1)
  assert any(e.mesh[3] == 4 and e.total == no_fsdp for e in everything)
  text, fits = memory.fit_report(config, 8, device_gb=(data8.total - 1) / memory.GIB)
  assert fits and 'data=4 fsdp=1 tensor=1 expert=2, remat off' in text
  assert ('--config.mesh.data=4 --config.mesh.fsdp=1 --config.mesh.tensor=1 '
          '--config.mesh.expert=2 --config.model.remat=False') in text


def test_the_table_names_the_expert_axis_of_an_moe_model_only():
  moe = _config(B=16, moe=_MOE)
  moe.mesh.update(data=2, expert=4)
  assert 'on 8 devices as data=2 fsdp=1 tensor=1 expert=4;' in memory.table(moe, 8)
  dense = _config(B=16, mesh=(8, 1, 1))
  assert 'on 8 devices as data=8 fsdp=1 tensor=1;' in memory.table(dense, 8)
