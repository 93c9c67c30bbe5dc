"""Decoding speed on this machine: lm's KV-cached decoding against recomputing the prefix every
step, and against HuggingFace transformers' `generate` (PyTorch, KV-cached) at the same shape.

  pip install -e '.[bench]'   # torch==2.13.0 (CPU wheel) and transformers
  python bench/generate.py [--config tiny] [--contexts 256,1024] [--new_tokens 32] [--batch 1]

For each context length C, a batch of random C-token prompts is extended by --new_tokens greedy
tokens. Decode tokens/s counts decode steps only: (time for N new tokens - time for 1) / (N - 1)
per step, so the prefill is left out; each time is the fastest of --repeats runs after a warmup
(the first compiles), the least disturbed by other processes on a shared machine. 'no cache'
(no_cache_decoder) recomputes every step from scratch: the model over the tokens so far, padded
to a multiple of 16, logits at the last token only. The model is configs/NAME's shape with
random fp32 weights (max_seq_len raised to fit); HF runs LlamaForCausalLM (sdpa, fp32,
DynamicCache) with the same shape in this process after the JAX runs, on the same cores.

Serving (lm/engine.py, lm/quantize.py), unless --skip_engine / --skip_int8:
  continuous batching against static batching on --requests greedy requests (prompts of 8-64
  tokens; three in four want 8-32 new tokens, one in four 128-192) with --slots rows. Static
  batching runs batches of `slots` requests, each until its longest request finishes, through
  the same engine (and, for reference, through generate.sample). Tokens/s counts the tokens
  requested, so a batch's idle rows do not count; each time is the best of --repeats.
  int8 weight-only against fp32: the engine's tokens/s on that workload, parameter bytes, and
  held-out perplexity (lm.train.evaluate on the run's eval batches) of configs/tiny.py trained
  --train_steps steps into a temporary workdir, or of the run in --workdir.
"""

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_throughput  # pylint: disable=g-import-not-at-top,wrong-import-position


def _best_time(fn, repeats: int) -> float:
  """The fastest of `repeats` runs after a warmup: on a shared machine the least disturbed."""
  fn()  # Warmup (compiles).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _decode_rate(run, batch: int, new_tokens: int, repeats: int) -> float:
  """Decode tokens/s from run(n) (generate n tokens, blocking): prefill cancels out."""
  many, one = _best_time(lambda: run(new_tokens), repeats), _best_time(lambda: run(1), repeats)
  return batch * (new_tokens - 1) / max(many - one, 1e-9)


NO_CACHE_BUCKET = 16  # The no-cache decoder pads the tokens so far to a multiple of this.


def _round_up(length: int) -> int:
  return -(-length // NO_CACHE_BUCKET) * NO_CACHE_BUCKET


def no_cache_decoder(graphdef):
  """decode(params, prompts_BC, n): the prompts followed by n greedy tokens, [B, C + n], each
  token from a forward pass over every token before it (no KV cache), logits at the last only.
  The tokens so far are padded to a multiple of NO_CACHE_BUCKET, so a few compilations serve
  every step; causal attention keeps the padding out of the logits."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, static_argnames='length')
  def greedy_steps(params, buffer_BL, start, stop, length):
    """Slots [start, stop) filled one by one, each from the buffer's first `length` slots."""
    model = nnx.merge(graphdef, params)

    def body(position, buffer_BL):
      x_BLD = model(buffer_BL[:, :length], hidden_only=True)
      next_B = jnp.argmax(model.logits(x_BLD[:, position - 1]), -1)
      return buffer_BL.at[:, position].set(next_B.astype(buffer_BL.dtype))
    return jax.lax.fori_loop(start, stop, body, buffer_BL)

  def decode(params, prompts_BC: np.ndarray, num_tokens: int):
    B, C = prompts_BC.shape
    end = C + num_tokens
    buffer_BL = jnp.zeros((B, _round_up(end)), jnp.int32).at[:, :C].set(prompts_BC)
    for length in range(_round_up(C), _round_up(end - 1) + 1, NO_CACHE_BUCKET):
      start = max(C, length - NO_CACHE_BUCKET + 1)  # The positions whose prefix rounds to length.
      buffer_BL = greedy_steps(params, buffer_BL, start, min(length + 1, end), length=length)
    return buffer_BL[:, :end]
  return decode


def jax_rates(cfg, prompts_BC: np.ndarray, new_tokens: int, repeats: int) -> dict:
  """Decode tokens/s of lm.generate (KV cache) and of recomputing the prefix every step."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import generate, model as model_lib  # pylint: disable=g-import-not-at-top
  graphdef, params = model_lib.init(cfg, 0)
  prompts, B = prompts_BC.tolist(), len(prompts_BC)
  decode_without_cache = no_cache_decoder(graphdef)

  def cached(n):
    generate.sample(graphdef, params, prompts, max_new_tokens=n, temperature=0, stop_tokens=[])

  def uncached(n):
    jax.block_until_ready(decode_without_cache(params, prompts_BC, n))

  with_cache = _decode_rate(cached, B, new_tokens, repeats)
  without = _decode_rate(uncached, B, new_tokens, max(1, repeats // 2))
  return {'kv_cache_tok_s': with_cache, 'no_cache_tok_s': without,
          'speedup': with_cache / without}


def hf_rate(cfg, prompts_BC: np.ndarray, new_tokens: int, repeats: int) -> dict:
  """Decode tokens/s of transformers' LlamaForCausalLM.generate (greedy, KV cache)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
      attention_bias=False, mlp_bias=False, attn_implementation='sdpa',
      dtype=torch.float32)).eval()
  input_ids = torch.from_numpy(prompts_BC.astype(np.int64))

  def run(n):
    with torch.inference_mode():
      model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                     min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

  return {'hf_tok_s': _decode_rate(run, len(prompts_BC), new_tokens, repeats),
          'torch_threads': torch.get_num_threads()}


def mixed_requests(vocab_size: int, count: int, seed: int = 0) -> list:
  """Greedy requests with mixed output lengths: 3 in 4 short (8-32 tokens), 1 in 4 long."""
  from lm import engine  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  long_B = rng.random(count) < 0.25
  new_B = np.where(long_B, rng.integers(128, 193, count), rng.integers(8, 33, count))
  return [engine.Request(prompt=rng.integers(4, vocab_size, int(rng.integers(8, 65))).tolist(),
                         max_new_tokens=int(n)) for n in new_B]


def serving_rates(cfg, params, requests, slots: int, repeats: int, with_generate: bool) -> dict:
  """Requested tokens/s of continuous batching, static batching through the engine, and (if
  with_generate) static batching through generate.sample."""
  from lm import engine, generate, model as model_lib  # pylint: disable=g-import-not-at-top
  server = engine.Engine(cfg, params, slots=slots)
  batches = [requests[i:i + slots] for i in range(0, len(requests), slots)]
  tokens = sum(r.max_new_tokens for r in requests)

  def static_generate():
    for batch in batches:
      generate.sample(model_lib.graphdef(cfg), params, [r.prompt for r in batch], temperature=0,
                      max_new_tokens=max(r.max_new_tokens for r in batch), stop_tokens=[])

  rates = {'continuous_tok_s': tokens / _best_time(lambda: server.run(requests), repeats)}
  rates['continuous_decode_steps'] = server.stats['decode_steps']
  rates['static_tok_s'] = tokens / _best_time(
      lambda: [server.run(batch) for batch in batches], repeats)
  rates['continuous_over_static'] = rates['continuous_tok_s'] / rates['static_tok_s']
  if with_generate:
    rates['static_generate_tok_s'] = tokens / _best_time(static_generate, repeats)
  return rates


def trained_tiny(workdir: str | None, steps: int):
  """(config, workdir) of a configs/tiny.py run: the one in workdir, or a fresh short one."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from lm import config as config_lib, train  # pylint: disable=g-import-not-at-top
  if workdir:
    return config_lib.config_from_json(os.path.join(workdir, 'config.json')), workdir
  workdir = tempfile.mkdtemp(prefix='bench_generate_')
  config = config_lib.load_config('configs/tiny.py', train=dict(
      steps=steps, warmup_steps=min(30, steps // 2), eval_every=steps, checkpoint_every=steps))
  train.train(config, workdir)
  return config, workdir


def int8_perplexity(config, workdir: str) -> dict:
  """Held-out perplexity of the run's fp32 parameters and of their int8 quantization."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import data as data_lib, generate, quantize, train  # pylint: disable=g-import-not-at-top
  graphdef, params, _ = generate.load(config, workdir)
  data = data_lib.make_data(config.data, vocab_size=config.model.vocab_size,
                            batch_size=config.train.batch_size, seed=config.train.seed,
                            workdir=workdir)
  batches = data.eval_batches(config.train.eval_batches)

  def eval_fn(qparams, batch, token_bytes_V):
    return train.eval_step(quantize.dequantize(qparams), batch, token_bytes_V, graphdef=graphdef)

  qparams = quantize.quantize(params, include_embed=True)
  fp32 = train.evaluate(jax.jit(eval_fn), params, batches, data.token_bytes)
  int8 = train.evaluate(jax.jit(eval_fn), qparams, batches, data.token_bytes)
  return {'fp32_perplexity': fp32['eval_perplexity'], 'int8_perplexity': int8['eval_perplexity'],
          'perplexity_increase': int8['eval_perplexity'] / fp32['eval_perplexity'] - 1,
          'eval_tokens': sum(int(b['loss_mask'].sum()) for b in batches),
          'fp32_bytes': quantize.num_bytes(params), 'int8_bytes': quantize.num_bytes(qparams)}


def serving_report(cfg, args) -> dict:
  """The continuous-vs-static and int8-vs-fp32 sections of the report (see the docstring)."""
  from lm import model as model_lib, quantize  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(cfg, max_seq_len=256)  # Prompts <= 64 + outputs <= 192 tokens.
  params = model_lib.init_params(cfg, 0)
  requests = mixed_requests(cfg.vocab_size, args.requests)
  report = {'slots': args.slots, 'requests': len(requests),
            'requested_tokens': sum(r.max_new_tokens for r in requests)}
  if not args.skip_engine:
    report['batching'] = serving_rates(cfg, params, requests, args.slots, args.repeats, True)
  if not args.skip_int8:
    qparams = quantize.quantize(params, include_embed=True)
    fp32 = serving_rates(cfg, params, requests, args.slots, args.repeats, False)
    int8 = serving_rates(cfg, qparams, requests, args.slots, args.repeats, False)
    report['int8'] = {'fp32_tok_s': fp32['continuous_tok_s'],
                      'int8_tok_s': int8['continuous_tok_s'],
                      'fp32_bytes': quantize.num_bytes(params),
                      'int8_bytes': quantize.num_bytes(qparams),
                      **int8_perplexity(*trained_tiny(args.workdir, args.train_steps))}
  return report


def print_serving(report: dict) -> None:
  print(f'\nserving: {report["requests"]} requests ({report["requested_tokens"]} new tokens) '
        f'through {report["slots"]} slots')
  if 'batching' in report:
    b = report['batching']
    print(f'  continuous batching {b["continuous_tok_s"]:,.0f} tok/s, static batching '
          f'{b["static_tok_s"]:,.0f} tok/s (engine) / {b["static_generate_tok_s"]:,.0f} tok/s '
          f'(generate.sample): {b["continuous_over_static"]:.2f}x')
  if 'int8' in report:
    q = report['int8']
    print(f'  int8 {q["int8_tok_s"]:,.0f} tok/s vs fp32 {q["fp32_tok_s"]:,.0f} tok/s; params '
          f'{q["int8_bytes"] / 1e6:.2f} MB vs {q["fp32_bytes"] / 1e6:.2f} MB (random weights)')
    print(f'  trained tiny: perplexity int8 {q["int8_perplexity"]:.3f} vs fp32 '
          f'{q["fp32_perplexity"]:.3f} ({q["perplexity_increase"]:+.2%}) on {q["eval_tokens"]:,} '
          f'held-out tokens')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='tiny', help='model shape: configs/NAME.py')
  parser.add_argument('--contexts', default='256,1024', help='prompt lengths, comma-separated')
  parser.add_argument('--new_tokens', type=int, default=32, help='tokens generated per timing')
  parser.add_argument('--batch', type=int, default=1, help='prompts decoded together')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per measurement')
  parser.add_argument('--skip_hf', action='store_true', help='time lm only')
  parser.add_argument('--skip_decode', action='store_true',
                      help='skip the per-context KV cache / no cache / HF timings')
  parser.add_argument('--skip_engine', action='store_true', help='skip continuous vs static')
  parser.add_argument('--skip_int8', action='store_true', help='skip int8 vs fp32')
  parser.add_argument('--slots', type=int, default=8, help='engine decode slots = static batch')
  parser.add_argument('--requests', type=int, default=32, help='requests in the serving load')
  parser.add_argument('--workdir', default=None,
                      help='a trained run for the perplexity check (default: train tiny)')
  parser.add_argument('--train_steps', type=int, default=150,
                      help='steps to train configs/tiny.py for the perplexity check')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results', 'generate.json'))
  args = parser.parse_args()
  if args.new_tokens < 2 or args.repeats < 1:
    parser.error('--new_tokens must be at least 2 and --repeats at least 1')

  import jax  # pylint: disable=g-import-not-at-top
  from lm import model as model_lib  # pylint: disable=g-import-not-at-top
  contexts = [int(c) for c in args.contexts.split(',')]
  config = train_throughput.load_config(args.config)
  cfg = dataclasses.replace(
      model_lib.ModelConfig.from_config(config, 'float32'),
      max_seq_len=_round_up(max(contexts) + args.new_tokens))  # The no-cache decoder's padding.
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cores': os.cpu_count(), 'platform': platform.platform(),
                  'jax_backend': jax.default_backend(), 'load_avg_at_start': os.getloadavg()},
      'versions': train_throughput._versions(),  # pylint: disable=protected-access
      'model': dataclasses.asdict(cfg), 'batch': args.batch, 'new_tokens': args.new_tokens,
      'repeats': args.repeats, 'results': {},
  }
  busy, own, wall = (train_throughput._machine_busy_s(),  # pylint: disable=protected-access
                     time.process_time(), time.perf_counter())
  rng = np.random.default_rng(0)
  for context in [] if args.skip_decode else contexts:
    prompts_BC = rng.integers(4, cfg.vocab_size, (args.batch, context)).astype(np.int32)
    entry = jax_rates(cfg, prompts_BC, args.new_tokens, args.repeats)
    report['results'][context] = entry
  if not (args.skip_engine and args.skip_int8):
    report['serving'] = serving_report(cfg, args)
  if not args.skip_hf and not args.skip_decode:
    for context in contexts:
      prompts_BC = np.random.default_rng(0).integers(4, cfg.vocab_size, (args.batch, context))
      entry = report['results'][context]
      entry.update(hf_rate(cfg, prompts_BC, args.new_tokens, args.repeats))
      entry['lm_over_hf'] = entry['kv_cache_tok_s'] / entry['hf_tok_s']
  wall = time.perf_counter() - wall
  others = (train_throughput._machine_busy_s() - busy  # pylint: disable=protected-access
            - (time.process_time() - own))
  report['machine']['others_cpu_share'] = max(others, 0.0) / (wall * os.cpu_count())
  report['machine']['load_avg_at_end'] = os.getloadavg()

  num_params = model_lib.count_params(jax.eval_shape(lambda: model_lib.init_params(cfg, 0)))
  print(f'\n{args.config} shape ({num_params / 1e6:.1f}M '
        f'params, fp32), batch {args.batch}, {args.new_tokens} new tokens, best of '
        f'{args.repeats}; {os.cpu_count()} cores, others used '
        f'{report["machine"]["others_cpu_share"]:.0%} of them meanwhile')
  header = (f'{"context":>7} {"kv cache tok/s":>14} {"no cache tok/s":>14} {"speedup":>8} '
            f'{"HF tok/s":>9} {"lm/HF":>6}')
  print(header)
  print('-' * len(header))
  for context, e in report['results'].items():
    hf = (f'{e["hf_tok_s"]:>9,.0f} {e["lm_over_hf"]:>5.2f}x' if 'hf_tok_s' in e
          else f'{"-":>9} {"-":>6}')
    print(f'{context:>7} {e["kv_cache_tok_s"]:>14,.0f} {e["no_cache_tok_s"]:>14,.0f} '
          f'{e["speedup"]:>7.1f}x {hf}')
  if 'serving' in report:
    print_serving(report['serving'])
  train_throughput.write_report(report, args.out)


if __name__ == '__main__':
  main()
