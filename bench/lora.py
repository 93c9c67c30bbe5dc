"""LoRA against full fine-tuning (memory and step time), and lm's LoRA step against HF PEFT.

  pip install -e '.[bench]' peft   # torch==2.13.0 (CPU wheel), transformers, peft
  python bench/lora.py [--rank 16] [--configs tiny,llama_20m] [--peft_configs tiny]
      [--steps 10] [--rounds 5] [--warmup 3] [--skip_peft]
  # On a GPU: python bench/lora.py --configs llama_125m,llama_1b --batch 8 --skip_peft

Three sections, each a table and a part of the JSON report (--out):

1. Memory plan, one device: lm.memory.estimate(config, (1, 1, 1)) for --plan_configs trained
   three ways: 'full' (train.trainable='all', no adapters), 'lora' (rank --rank adapters on all
   seven projections, trainable='lora') and 'lora+emb' ('lora,embeddings'). Arithmetic on the
   real parameter shapes, no compilation: it stands in for the ~125M/1B/7B configs on a CPU.
   The batch is --plan_batch sequences of the config's own data.seq_len (0: the config's batch).
2. Measured step, full fine-tuning vs LoRA, for --configs: the project's own jitted, donated
   step on a one-device mesh (lm.train.setup, as training builds it; a LoRA step differentiates
   and updates the adapters only), in the dtype 'auto' picks (fp32 for a config that is also
   compared with PEFT in section 3), with XLA's compiled bytes
   (lm.memory.xla_bytes) and the planner's figure for the same run. On a GPU, pass the 125m/1b
   configs with a --batch that fits; the device's peak bytes in use are reported there too.
3. lm's LoRA step against transformers' LlamaForCausalLM wrapped by peft.get_peft_model at the
   same shape, batch, rank, alpha and targets (q, k, v, o, gate, up, down; no dropout), fp32,
   SDPA attention, torch AdamW over the adapters, torch.set_num_threads(cores available). The
   trainable parameter counts of both sides are printed and must match. CPU only.

Every timed side runs in its own process (bench/train_throughput.py's _Worker), is warmed up
once (--warmup steps, the first compiling), then --steps timed steps per side alternate between
the sides of a config in --rounds rounds, so load from other processes falls on all alike.
Step times are medians; tokens/s counts batch x seq_len tokens per step; 'others' is the
largest share of the CPUs other processes took while a side was timed.
"""

import argparse
import datetime
import functools
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench import train_throughput as tt  # pylint: disable=wrong-import-position

# train_throughput's worker processes, warmup and alternating rounds, private there.
# pylint: disable=protected-access
_Worker, _measure, _summary, _warm = tt._Worker, tt._measure, tt._summary, tt._warm
# pylint: enable=protected-access

GIB, MIB = 2 ** 30, 2 ** 20
# Name in the tables -> config.train.trainable; 'full' has no adapters, the others rank --rank.
VARIANTS = {'full': 'all', 'lora': 'lora', 'lora+emb': 'lora,embeddings'}
HF_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def lora_config(name: str, trainable: str, rank: int, batch: int = 0):
  """configs/NAME.py trained as `trainable`: adapters of `rank` on all projections unless it is
  'all' (full fine-tuning, no adapters); batch > 0 replaces train.batch_size. Validated."""
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  config = tt.load_config(name)
  config.lora.update(rank=0 if trainable == 'all' else rank, targets='all')
  config.train.trainable = trainable
  if batch:
    config.train.batch_size = batch
  config_lib.validate(config)
  return config


def trainable_count(config) -> tuple[int, int]:
  """(trained parameters, all parameters) from the abstract parameters: nothing allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import memory, model as model_lib, train  # pylint: disable=g-import-not-at-top
  cfg = memory.model_config(config)
  params = jax.eval_shape(functools.partial(model_lib.init_params, cfg, 0))
  trained = train.trained_paths(config.train, model_lib.logical_axes(cfg))
  return (model_lib.count_params(train.split_trained(params, trained)[0]),
          model_lib.count_params(params))


def plan(names: list[str], rank: int, batch: int) -> dict:
  """Section 1: the planner's bytes per device on one device, per config and variant."""
  from lm import memory  # pylint: disable=g-import-not-at-top
  results = {}
  for name in names:
    for variant, trainable in VARIANTS.items():
      config = lora_config(name, trainable, rank, batch)
      e = memory.estimate(config, (1, 1, 1))
      trained, total = trainable_count(config)
      results.setdefault(name, {})[variant] = dict(
          batch_size=config.train.batch_size, seq_len=config.data.seq_len,
          dtype=memory.compute_dtype(config.model), remat=e.remat, params=total,
          trainable_params=trained, trainable_share=trained / total, parameters=e.parameters,
          gradients=e.gradients, optimizer=e.optimizer, weights=e.weights,
          activations=e.activations, total=e.total)
  return results


def jax_setup(name: str, trainable: str, rank: int, batch: int, warmup: int, dtype: str = ''):
  """lm's sharded, jitted, donated train_step on one device for `trainable`, warmed up; with
  XLA's compiled bytes and the planner's for the same run. dtype: '' keeps the config's."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import flops, memory, model as model_lib, train  # pylint: disable=g-import-not-at-top

  config = lora_config(name, trainable, rank, batch)
  # Timed, compiled and planned alike, in the pinned dtype or the one 'auto' picks here.
  config.model.dtype = dtype or flops.resolve_dtype(config.model.dtype)
  devices = jax.devices()[:1]
  run = train.setup(config, devices)
  cfg, t = run.cfg, config.train
  state = run.init_state()
  arrays = jax.device_put(
      tt.synthetic_batch(t.batch_size, config.data.seq_len, cfg.vocab_size, t.seed),
      run.batch_sharding)
  holder = {'state': state}

  def step():
    with run.active():
      holder['state'], metrics = run.step_fn(holder['state'], arrays)
    jax.block_until_ready((holder['state'], metrics))

  first = _warm(step, warmup)
  params = holder['state'].params
  stats = devices[0].memory_stats() or {}
  return step, dict(
      first_step_s=first, backend=jax.default_backend(), dtype=cfg.dtype,
      attention=cfg.attention, params=model_lib.count_params(params),
      trainable_params=model_lib.count_params(train.split_trained(params, run.trained)[0]),
      xla_bytes=memory.xla_bytes(config, devices)['total'],
      plan_bytes=memory.estimate(config, (1, 1, 1)).total,
      device_peak_bytes=stats.get('peak_bytes_in_use'))


def peft_setup(name: str, rank: int, batch: int, threads: int, warmup: int):
  """transformers' LlamaForCausalLM (sdpa, fp32) under peft.get_peft_model, torch AdamW over
  the adapters, warmed up: train_throughput.torch_train_step's work, adapters trained."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  warnings.filterwarnings('ignore', category=FutureWarning)  # transformers' deprecations, via peft.
  config = lora_config(name, 'lora', rank, batch)
  model = peft.get_peft_model(tt.hf_llama(config, name), peft.LoraConfig(
      r=rank, lora_alpha=config.lora.alpha, lora_dropout=0.0, target_modules=HF_TARGETS)).train()
  step, params = tt.torch_train_step(model, config)  # Decay on matrices: every adapter.
  first = _warm(step, warmup)
  return step, dict(first_step_s=first, dtype='float32', threads=torch.get_num_threads(),
                    params=sum(p.numel() for p in model.parameters()),
                    trainable_params=sum(p.numel() for p in params))


def _peer_missing() -> str | None:
  """Why the PEFT peer cannot run here, or None."""
  missing = [n for n in ('torch', 'transformers', 'peft') if importlib.util.find_spec(n) is None]
  return f'not installed: {", ".join(missing)}' if missing else None


def measure(name: str, sides: list[str], args) -> dict:
  """Sections 2 and 3 for one config: its sides ('full', 'lora', 'peft') timed in alternation."""
  config = lora_config(name, 'all', args.rank, args.batch)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  workers, entry = {}, {'batch_size': config.train.batch_size, 'seq_len': config.data.seq_len}
  try:
    for side in sides:
      if side == 'peft' and (why := _peer_missing()):
        entry['peft_missing'] = why
      elif side == 'peft':
        threads = len(os.sched_getaffinity(0))
        try:
          workers[side] = _Worker(peft_setup, name, args.rank, args.batch, threads, args.warmup)
        except RuntimeError as e:  # Its traceback names the import or call that failed.
          entry['peft_missing'] = str(e).strip().splitlines()[-1]
      else:  # Against PEFT's fp32, lm's sides run fp32 too, wherever bf16 would be faster.
        workers[side] = _Worker(jax_setup, name, VARIANTS[side], args.rank, args.batch,
                                args.warmup, 'float32' if 'peft' in sides else '')
    timed = _measure(workers, args.steps, min(args.rounds, args.steps))
  finally:
    for worker in workers.values():
      worker.close()
  for side, worker in workers.items():
    entry[side] = _summary(worker.info, timed[side], tokens_per_step)
  if 'full' in entry and 'lora' in entry:
    entry['lora_speedup'] = entry['full']['step_s'] / entry['lora']['step_s']
  if 'peft' in entry and 'lora' in entry:
    entry['jax_over_peft'] = entry['peft']['step_s'] / entry['lora']['step_s']
    entry['trainable_equal'] = (entry['peft']['trainable_params']
                                == entry['lora']['trainable_params'])
  return entry


def _print_plan(results: dict, args) -> None:
  batch = f'{args.plan_batch} sequence(s) per device' if args.plan_batch else "the configs' batch"
  print(f'\n1. Memory plan (lm.memory.estimate), one device, {batch}; LoRA rank {args.rank} on '
        'all 7 projections. GiB; share = trainable / all parameters (adapters included)')
  header = (f'{"config":<11} {"variant":<9} {"BxT":>8} {"remat":>5} {"trainable":>13} '
            f'{"share":>6} {"params":>7} {"grads":>6} {"AdamW":>6} {"weights":>7} '
            f'{"activ.":>7} {"total":>7}')
  print(header + '\n' + '-' * len(header))
  for name, variants in results.items():
    for variant, r in variants.items():
      gib = ' '.join(f'{r[k] / GIB:>{w}.2f}' for k, w in (
          ('parameters', 7), ('gradients', 6), ('optimizer', 6), ('weights', 7),
          ('activations', 7), ('total', 7)))
      print(f'{name:<11} {variant:<9} {r["batch_size"]:>3}x{r["seq_len"]:<4} '
            f'{"on" if r["remat"] else "off":>5} {r["trainable_params"]:>13,} '
            f'{r["trainable_share"]:>6.1%} {gib}')
  print('total = params + AdamW + max(grads, activations + weights); compute dtype as the config '
        "says ('auto' planned as bfloat16); remat on = remat with scan_layers")


def _print_steps(results: dict) -> None:
  print('\n2. Measured train step, full fine-tuning vs LoRA (lm.train.setup, one '
        "device); speedup = full step / LoRA step; MiB of XLA's compiled step and the planner's")
  header = (f'{"config":<10} {"variant":<7} {"device":>6} {"BxT":>7} {"dtype":>8} '
            f'{"trainable":>11} {"step ms":>8} {"tok/s":>8} {"speedup":>7} {"XLA MiB":>8} '
            f'{"plan MiB":>8} {"others":>6}')
  print(header + '\n' + '-' * len(header))
  for name, entry in results.items():
    for variant in ('full', 'lora'):
      if (r := entry.get(variant)) is None or 'full' not in entry:
        continue
      speedup = entry['lora_speedup'] if variant == 'lora' else 1.0
      print(f'{name:<10} {variant:<7} {r["backend"]:>6} {entry["batch_size"]:>3}x'
            f'{entry["seq_len"]:<3} {r["dtype"]:>8} {r["trainable_params"]:>11,} '
            f'{r["step_s"] * 1e3:>8.1f} {r["tokens_per_s"]:>8,.0f} {speedup:>6.2f}x '
            f'{r["xla_bytes"] / MIB:>8.1f} {r["plan_bytes"] / MIB:>8.1f} '
            f'{r["others_cpu_share"]:>6.0%}')
      if r.get('device_peak_bytes'):
        print(f'{"":<19} device peak bytes in use: {r["device_peak_bytes"] / MIB:,.0f} MiB')


def _print_peft(results: dict) -> None:
  print('\n3. LoRA step, lm (JAX) vs HF PEFT (PyTorch), same Llama shape, fp32, CPU')
  header = (f'{"config":<10} {"side":<5} {"BxT":>7} {"params":>10} {"trainable":>10} '
            f'{"step ms":>8} {"tok/s":>8} {"jax/peft":>8} {"others":>6}')
  print(header + '\n' + '-' * len(header))
  for name, entry in results.items():
    if 'peft' not in entry and 'peft_missing' not in entry:
      continue
    for side in ('lora', 'peft'):
      if (r := entry.get(side)) is None:
        print(f'{name:<10} {side:<5} peer missing: {entry["peft_missing"]}')
        continue
      ratio = f'{entry["jax_over_peft"]:>7.2f}x' if 'jax_over_peft' in entry else f'{"-":>8}'
      print(f'{name:<10} {"jax" if side == "lora" else side:<5} {entry["batch_size"]:>3}x'
            f'{entry["seq_len"]:<3} {r["params"]:>10,} {r["trainable_params"]:>10,} '
            f'{r["step_s"] * 1e3:>8.1f} {r["tokens_per_s"]:>8,.0f} {ratio} '
            f'{r["others_cpu_share"]:>6.0%}')
    if 'trainable_equal' in entry:
      print(f'{"":<10} trainable parameters equal on both sides: {entry["trainable_equal"]}'
            f' (jax {entry["lora"]["trainable_params"]:,}, peft '
            f'{entry["peft"]["trainable_params"]:,}); torch threads {entry["peft"]["threads"]}')


def _sides(args) -> dict:
  """{config: sides to time}: full and lora for --configs, lora and peft for --peft_configs."""
  split = lambda text: [n for n in text.split(',') if n]
  sides = {name: ['full', 'lora'] for name in split(args.configs)}
  for name in split(args.peft_configs) if not args.skip_peft else []:
    sides.setdefault(name, []).extend(s for s in ('lora', 'peft') if s not in sides[name])
  return sides


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rank', type=int, default=16, help='LoRA rank (alpha: the config\'s)')
  parser.add_argument('--plan_configs', default='llama_125m,llama_1b,llama_7b',
                      help='configs/*.py the memory plan covers (section 1)')
  parser.add_argument('--plan_batch', type=int, default=1,
                      help='sequences per device in the plan (0: config.train.batch_size)')
  parser.add_argument('--configs', default='tiny,llama_20m',
                      help='configs/*.py whose full and LoRA steps are timed (section 2)')
  parser.add_argument('--peft_configs', default='tiny',
                      help='configs/*.py whose LoRA step is timed against PEFT (section 3)')
  parser.add_argument('--batch', type=int, default=0,
                      help='train.batch_size of the timed steps (0: the config\'s)')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per side and config')
  parser.add_argument('--rounds', type=int, default=5,
                      help='the timed steps alternate between the sides in this many rounds')
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed steps first (the first one compiles)')
  parser.add_argument('--skip_peft', action='store_true', help='no PEFT peer (section 3)')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results', 'lora.json'))
  args = parser.parse_args()
  if args.warmup < 1 or args.steps < 1 or args.rounds < 1 or args.rank < 1:
    parser.error('--warmup, --steps, --rounds and --rank must be at least 1')
  start = time.perf_counter()

  import jax  # pylint: disable=g-import-not-at-top
  from lm import flops  # pylint: disable=g-import-not-at-top
  # The planner needs no device: keep this process off any GPU, so the workers get all of it.
  jax.config.update('jax_platforms', 'cpu')
  versions = tt._versions()  # pylint: disable=protected-access
  versions['peft'] = (importlib.metadata.version('peft') if importlib.util.find_spec('peft')
                      else None)
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cpu': flops._cpu_model(), 'cores': os.cpu_count(),  # pylint: disable=protected-access
                  'platform': platform.platform(), 'load_avg_at_start': os.getloadavg()},
      'versions': versions, 'settings': vars(args),
  }
  report['plan'] = plan([n for n in args.plan_configs.split(',') if n], args.rank, args.plan_batch)
  if report['plan']:
    _print_plan(report['plan'], args)

  report['measured'] = {name: measure(name, s, args) for name, s in _sides(args).items()}
  if any('full' in entry for entry in report['measured'].values()):
    _print_steps(report['measured'])
  if any('peft' in entry or 'peft_missing' in entry for entry in report['measured'].values()):
    _print_peft(report['measured'])
  print("others: the largest share of the CPUs other processes used while a side was timed; "
        'above ~10%, treat the numbers as disturbed and rerun.')
  tt.finish_report(report, args.out, start)


if __name__ == '__main__':
  main()
