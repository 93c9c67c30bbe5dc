"""Step time and per-device memory of each sharding strategy, on 8 fake CPU devices.

  python bench/sharding.py [--steps 5] [--warmup 2]

For a small Llama (d_model 256, 4 layers, 8 heads, d_ff 768, vocab 4096, 128 tokens, batch 16,
fp32, 'blocked' attention as 'auto' picks on CPU) and each mesh: the median time of the real
sharded train step (lm.train.setup's) over --steps steps after --warmup, XLA's
per-device memory of that compiled step (memory_analysis: argument + output - alias + temp),
lm.memory's estimate beside it, and the bytes of parameters + optimizer state the first device
actually holds (sharding.bytes_per_device). All 8 "devices" share this machine's cores, so step
times only compare strategies with each other (and pay for collectives that are memory copies
here). Prints a table and writes bench/results/sharding.json.
"""

import os
import sys

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import statistics  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from lm import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm import train as train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# name: (data, fsdp, tensor); the product is the number of devices used.
STRATEGIES = {
    'single device': (1, 1, 1),
    'data=8': (8, 1, 1),
    'fsdp=8': (1, 8, 1),
    'data=2 x tensor=4': (2, 1, 4),
    'data=4 x tensor=2': (4, 1, 2),
    'data=2 x fsdp=2 x tensor=2': (2, 2, 2),
}


def bench_config(mesh) -> config_lib.ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.model.update(vocab_size=4096, d_model=256, num_layers=4, num_heads=8, num_kv_heads=8,
                      d_ff=768, max_seq_len=128, dtype='float32', attention='blocked')
  config.train.update(batch_size=16, steps=100, warmup_steps=10)
  config.data.seq_len = 128
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh)))
  return config


def synthetic_batch(config, seed=0) -> dict:
  """Random tokens, two documents per row, laid out as lm.data.make_batch lays them out."""
  B, T = config.train.batch_size, config.data.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, config.model.vocab_size, (B, T + 1), dtype=np.int32)
  segment_ids = np.where(np.arange(T) < T // 2, 1, 2).astype(np.int32)[None].repeat(B, 0)
  positions = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)]).astype(np.int32)
  loss_mask = (np.arange(T) != T // 2 - 1).astype(np.float32)[None].repeat(B, 0)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids,
              positions=positions[None].repeat(B, 0), loss_mask=loss_mask)


def run(name: str, mesh_sizes, steps: int, warmup: int) -> dict:
  """Compiles the sharded step once, reads XLA's memory, then times it on real arrays."""
  config = bench_config(mesh_sizes)
  devices = jax.devices()[:int(np.prod(mesh_sizes))]
  setup = train_lib.setup(config, devices)
  state = setup.init_state()
  held = sharding.bytes_per_device((state.params, state.opt_state))
  batch = jax.device_put(synthetic_batch(config), setup.batch_sharding)
  start = time.perf_counter()
  with setup.active():
    compiled = setup.step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  xla = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
         + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)
  planned = memory.estimate(config, tuple(mesh_sizes))

  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return {
      'strategy': name, 'mesh': dict(zip(sharding.MESH_AXES, mesh_sizes)),
      'devices': len(devices), 'step_s': statistics.median(times), 'step_times_s': times,
      'compile_s': compile_s, 'loss': float(metrics['loss']),
      'xla_bytes_per_device': int(xla), 'xla_temp_bytes': int(stats.temp_size_in_bytes),
      'planned_bytes_per_device': int(planned.total),
      'planned_state_bytes': int(planned.parameters + planned.optimizer),
      'state_bytes_per_device': int(held),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=5, help='timed steps per strategy')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first')
  args = parser.parse_args()
  assert jax.device_count() == 8, 'XLA_FLAGS must be set before jax is imported'

  results = []
  for name, mesh_sizes in STRATEGIES.items():
    config = bench_config(mesh_sizes)
    try:  # Only the strategies whose splits divide the model and the batch.
      memory.estimate(config, mesh_sizes)
    except sharding.ShardingError as e:
      print(f'skipping {name}: {e}')
      continue
    results.append(run(name, mesh_sizes, args.steps, args.warmup))
    print(f'{name}: done', file=sys.stderr)

  M = 2 ** 20
  single = results[0]['step_s']
  print(f'\n{"strategy":<28}{"step ms":>9}{"vs 1 dev":>9}{"XLA MiB":>9}{"planned":>9}'
        f'{"error":>8}{"state MiB":>11}{"planned":>9}')
  for r in results:
    print(f'{r["strategy"]:<28}{r["step_s"] * 1e3:>9.0f}{r["step_s"] / single:>8.2f}x'
          f'{r["xla_bytes_per_device"] / M:>9.1f}{r["planned_bytes_per_device"] / M:>9.1f}'
          f'{r["planned_bytes_per_device"] / r["xla_bytes_per_device"] - 1:>+8.1%}'
          f'{r["state_bytes_per_device"] / M:>11.2f}{r["planned_state_bytes"] / M:>9.2f}')
  print('\nper device; "state" = parameters + AdamW state the first device holds (measured) and '
        'planned; step times on fake CPU devices sharing the cores: relative only')

  os.makedirs(os.path.join(_ROOT, 'bench', 'results'), exist_ok=True)
  path = os.path.join(_ROOT, 'bench', 'results', 'sharding.json')
  with open(path, 'w') as f:
    json.dump({'config': bench_config((1, 1, 1)).to_dict(), 'jax': jax.__version__,
               'results': results}, f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
