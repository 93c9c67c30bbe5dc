"""Decoding speed of weight-only int8 and int4 (lm/quantize.py) against fp32 on this machine,
through lm.generate's KV-cached decoding, for configs/tiny.py's shape and a wider one.

  python bench/quantize.py [--new_tokens 32] [--context 64] [--batch 1] [--rounds 3]
      [--group_size 128] [--shapes tiny,wide]
  python bench/quantize.py --smoke   # seconds, 1-layer models: the numbers mean nothing

Shapes: 'tiny' is configs/tiny.py's model (d_model 128, 4 layers, tied embeddings); 'wide' the
same with d_model 512, 8 layers, 8 heads (4 KV), d_ff 1536. Each has random fp32 weights
(lm.model.init) and their quantization by lm.quantize.quantize, embeddings included: int8 with
one scale per output channel; int4 with one scale per --group_size inputs, or the largest power
of two below it that every weight's inputs divide into. Each variant extends a batch of random
--context-token prompts by --new_tokens greedy tokens with generate.sample; the quantized params
go in as they are loaded (QuantizedArrays: each weight is dequantized where the model reads it,
one layer at a time inside the decode loop). Decode tokens/s counts decode steps only,
batch x (N - 1) / (t(N) - t(1)), so the prefill cancels out (bench/generate.py's measure); each
t is the fastest over --rounds rounds in which the variants alternate, so that load from other
processes falls on all alike. Also reported: the parameter bytes and the relative logit error
||logits - fp32|| / ||fp32|| on the prompts. Writes --out (default bench/results/quantize.json)
and prints one table per shape, with each variant's tok/s and bytes as ratios to fp32's.
"""

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench import train_throughput as tt  # pylint: disable=wrong-import-position

SHAPES = {
    'tiny': {},
    'wide': dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, d_ff=1536),
}
SMOKE_MODEL = dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64, vocab_size=256)
SMOKE = dict(new_tokens=4, context=8, rounds=1)


def model_config(shape: str, args):
  """configs/tiny.py's ModelConfig with SHAPES[shape] (SMOKE_MODEL with --smoke), fp32, room for
  the prompts and new tokens."""
  from lm import model as model_lib  # pylint: disable=g-import-not-at-top
  config = tt.load_config('tiny')
  config.model.update(SMOKE_MODEL if args.smoke else SHAPES[shape])
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  return dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.context + args.new_tokens))


def variants(params, group_size: int) -> dict:
  """{name: params}: fp32, int8 per channel, int4 with the largest group that fits."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import quantize  # pylint: disable=g-import-not-at-top
  quantized = jax.jit(quantize.quantize, static_argnums=(1, 2, 3))
  out = {'fp32': params, 'int8': quantized(params, 8, 0, True)}
  while group_size > 1:
    try:
      out[f'int4_g{group_size}'] = quantized(params, 4, group_size, True)
      break
    except ValueError:
      group_size //= 2
  return out


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def bench_shape(shape: str, args) -> dict:
  """tok/s, bytes and logit error of each variant of one shape (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lm import generate, model as model_lib, quantize  # pylint: disable=g-import-not-at-top
  cfg = model_config(shape, args)
  graphdef, params = model_lib.init(cfg, 0)
  runs = {name: quantize.dequantize_on_read(p)
          for name, p in variants(params, args.group_size).items()}
  prompts_BC = np.random.default_rng(0).integers(4, cfg.vocab_size, (args.batch, args.context))
  prompts = prompts_BC.tolist()

  def decode(p, n):
    generate.sample(graphdef, p, prompts, max_new_tokens=n, temperature=0, stop_tokens=[])

  for p in runs.values():  # Compile both lengths before any timing.
    decode(p, args.new_tokens)
    decode(p, 1)
  best = {name: [float('inf'), float('inf')] for name in runs}
  for _ in range(args.rounds):
    for name, p in runs.items():
      best[name][0] = min(best[name][0], _time(lambda p=p: decode(p, args.new_tokens)))
      best[name][1] = min(best[name][1], _time(lambda p=p: decode(p, 1)))

  forward = jax.jit(model_lib.apply, static_argnums=0)
  fp32_BCV = forward(graphdef, params, prompts_BC)
  result = {'model': dataclasses.asdict(cfg),
            'params': model_lib.count_params(params), 'variants': {}}
  for name, p in runs.items():
    many, one = best[name]
    logits_BCV = forward(graphdef, p, prompts_BC)
    result['variants'][name] = {
        # NaN when noise hid the decode steps (t(N) <= t(1)), as in --smoke's few tokens.
        'decode_tok_s': (args.batch * (args.new_tokens - 1) / (many - one) if many > one
                         else float('nan')),
        'time_s': many, 'time_1_s': one, 'bytes': quantize.num_bytes(p),
        'logit_error': float(jnp.linalg.norm(logits_BCV - fp32_BCV) / jnp.linalg.norm(fp32_BCV))}
  fp32 = result['variants']['fp32']
  for entry in result['variants'].values():
    entry['tok_s_over_fp32'] = entry['decode_tok_s'] / fp32['decode_tok_s']
    entry['bytes_over_fp32'] = entry['bytes'] / fp32['bytes']
  return result


def print_shape(shape: str, result: dict, args) -> None:
  m = result['model']
  print(f'\n{shape}: d_model {m["d_model"]}, {m["num_layers"]} layers, d_ff {m["d_ff"]}, vocab '
        f'{m["vocab_size"]} ({result["params"] / 1e6:.1f}M params); batch {args.batch}, '
        f'{args.context}-token prompts, {args.new_tokens} new tokens, best of {args.rounds}')
  header = (f'{"variant":<10} {"decode tok/s":>12} {"x fp32":>7} {"MB":>7} {"x fp32":>7} '
            f'{"logit err":>9}')
  print(header)
  print('-' * len(header))
  for name, v in result['variants'].items():
    print(f'{name:<10} {v["decode_tok_s"]:>12,.0f} {v["tok_s_over_fp32"]:>6.2f}x '
          f'{v["bytes"] / 1e6:>7.2f} {v["bytes_over_fp32"]:>6.3f}x {v["logit_error"]:>9.4f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default='tiny,wide', help=f'comma-separated, of {list(SHAPES)}')
  parser.add_argument('--new_tokens', type=int, default=32, help='tokens generated per timing')
  parser.add_argument('--context', type=int, default=64, help='prompt tokens')
  parser.add_argument('--batch', type=int, default=1, help='prompts decoded together')
  parser.add_argument('--rounds', type=int, default=3, help='timed rounds over the variants')
  parser.add_argument('--group_size', type=int, default=128, help="int4's inputs per scale")
  parser.add_argument('--smoke', action='store_true', help='a seconds-long run of tiny models')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results', 'quantize.json'))
  args = parser.parse_args()
  shapes = [s for s in args.shapes.split(',') if s]
  if args.smoke:  # One shape: SMOKE_MODEL replaces them all.
    shapes = shapes[:1]
    for key, value in SMOKE.items():
      setattr(args, key, value)
  if args.new_tokens < 2 or args.rounds < 1 or not set(shapes) <= set(SHAPES):
    parser.error(f'--new_tokens must be at least 2, --rounds at least 1, --shapes of '
                 f'{list(SHAPES)}')

  import jax  # pylint: disable=g-import-not-at-top
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cores': os.cpu_count(), 'platform': platform.platform(),
                  'jax_backend': jax.default_backend(), 'load_avg_at_start': os.getloadavg()},
      'versions': tt._versions(),  # pylint: disable=protected-access
      'smoke': args.smoke, 'batch': args.batch, 'context': args.context,
      'new_tokens': args.new_tokens, 'rounds': args.rounds, 'results': {},
  }
  busy, own, wall = (tt._machine_busy_s(),  # pylint: disable=protected-access
                     time.process_time(), time.perf_counter())
  for shape in shapes:
    report['results'][shape] = bench_shape(shape, args)
  wall = time.perf_counter() - wall
  others = (tt._machine_busy_s() - busy  # pylint: disable=protected-access
            - (time.process_time() - own))
  report['machine']['others_cpu_share'] = max(others, 0.0) / (wall * os.cpu_count())
  report['machine']['load_avg_at_end'] = os.getloadavg()
  print(f'{os.cpu_count()} cores, {jax.default_backend()}; other processes used '
        f'{report["machine"]["others_cpu_share"]:.0%} of them meanwhile')
  for shape, result in report['results'].items():
    print_shape(shape, result, args)
  tt.write_report(report, args.out)


if __name__ == '__main__':
  main()
