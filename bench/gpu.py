"""One command on one accelerator: lm's training step, memory plan, decoding and serving there.

  bench/gpu.sh [flags]   # on a machine with one NVIDIA GPU: installs carried wheels, runs this
  python bench/gpu.py [--config llama_1b] [--batch 16] [--seq_len 2048] [--variants ...]
      [--decode_batches 1,32] [--contexts 1024,4096] [--sections train,decode,serving]
  python bench/gpu.py --smoke   # configs/tiny.py on CPU in seconds (tests/test_bench_gpu.py)

Writes one JSON (--out, default bench/results/gpu.json) and prints a table per section. Every
run is built by lm.train.setup(config), the one setup path, from configs/NAME.py with
train.batch_size=--batch, data.seq_len=--seq_len and scan_layers=True; all token ids are random
(no text, so no tokenizer and no network).

train      One row per variant ATTENTION:REMAT of --variants. ATTENTION is config.model.attention
           ('auto', 'xla'), or 'cudnn': 'xla' with every jax.nn.dot_product_attention call
           forced to implementation='cudnn' while the step is traced, i.e. cuDNN's fused
           (flash) attention. That is what 'auto' means to pick on GPUs, but 'auto' passes
           implementation=None, which jax's dot_product_attention (0.10.2, 0.11.2) resolves to
           XLA's; each row's cudnn_fmha_calls counts the cuDNN attention calls in its compiled
           step, so the row says which kernel it ran. REMAT is 'remat' or 'noremat'. The jitted,
           donated run.step_fn is lowered for the abstract state and batch and compiled
           (compile_s: trace, lower and XLA compile; nothing is allocated yet), then --warmup
           steps and --steps timed ones run that executable on one synthetic packed batch
           (bench/train_throughput.py's). step_s is their median, tokens/s counts batch x
           seq_len per step, MFU is lm.flops' PaLM count (6N + 12 L H Q T per token) x
           tokens/s over the device's dense bf16 peak (lm/flops.py's table; on CPU the
           measured matmul peak).
memory     Per row: lm.memory.estimate's planned per-device peak against XLA's
           compiled.memory_analysis() of the same compiled step (argument + output - alias +
           temp + generated code, as lm.memory.xla_bytes counts it; --check_xla_bytes also calls
           xla_bytes, which compiles the step a second time, and records its total beside), and
           in an isolated run the allocator's measured peak. A step XLA says needs more than the
           allocator's limit (or --device_gb) is not run; an 'auto' or 'xla' variant planned
           above 1.3x that limit is not even compiled (lm.memory plans both as XLA's attention,
           which keeps the T x T scores, as they compile today; --compile_all compiles them
           anyway). A 'cudnn' row's plan is that same XLA path's, so it is high by those
           scores.
decode     lm.generate.sample (greedy, KV cache) for each --decode_batches x --contexts cell of
           random prompts: decode tokens/s = batch x (N - 1) / (t(N) - t(1)) with N =
           --new_tokens, each time the best of --repeats after a compiling warmup
           (bench/generate.py's measure), so the prefill cancels; first_token_s is t(1).
serving    lm.engine's continuous batching against static batching (batches of --slots
           requests, each until its longest is done) through the same engine, on
           bench/generate.py's request mix (--requests greedy requests, prompts of 8-64 tokens,
           3 in 4 wanting 8-32 new tokens, 1 in 4 128-192), max_seq_len 256; tokens/s counts
           the tokens requested (bench/generate.py's serving_rates).
compile    Every row's compile seconds (JAX's trace, lowering and backend compile events while
           it ran; for train rows the explicit lower + compile), gathered in one table.

Each train variant, the decode cells and the serving run are separate jobs; with --isolate (the
default except under --smoke) each runs in its own Python process, so a crash, an out-of-memory
or a cuDNN failure in one is recorded in its row (error) and the rest still run, and each
starts with the device's memory empty. A decode cell's failure is recorded in its own row. Jobs
start in the order auto:remat, cudnn:remat (those of them in --variants), decode, serving,
then the other variants; once --budget_s has passed the rest are recorded as skipped, and an
isolated job still running BUDGET_GRACE_S later is stopped, so the JSON is always written
(under 10 minutes by default).
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench import generate as bench_generate  # pylint: disable=wrong-import-position
from bench import train_throughput as tt  # pylint: disable=wrong-import-position

SECTIONS = ('train', 'decode', 'serving')
VARIANTS = ('auto:remat', 'cudnn:remat', 'auto:noremat', 'cudnn:noremat', 'xla:remat',
            'xla:noremat')
ATTENTIONS = ('auto', 'xla', 'cudnn')
FIRST_VARIANTS = VARIANTS[:2]  # Run before decode and serving.
SERVING_MAX_SEQ_LEN = 256  # bench/generate.py's request mix: prompts <= 64 + outputs <= 192.
BUDGET_GRACE_S = 45  # How far past --budget_s an isolated job may run before it is stopped.
PLAN_MARGIN = 1.3  # An auto/xla variant planned above this x the memory limit is not compiled.
VERSIONED = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'jax-cuda12-plugin',
             'jax-cuda12-pjrt', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'ml-collections',
             'grain', 'nvidia-cudnn-cu13', 'nvidia-cudnn-cu12')
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')
# --smoke: configs/tiny.py's vocabulary and rl.py's smoke model shape, so every section compiles
# and runs in seconds on CPU; 'cudnn' fails there (no GPU), which exercises a failing row. XLA's
# CPU backend then compiles without LLVM optimization and, before jaxlib 0.11, fusion emitters
# (SMOKE_XLA_FLAGS; 3-5x faster compiles on 2 cores with jaxlib 0.10): most of a smoke run is
# compilation, and its numbers only check the plumbing.
SMOKE = dict(config='tiny', batch=4, seq_len=64, steps=2, warmup=1, decode_batches='1,4',
             contexts='32,64', new_tokens=32, repeats=3, requests=8, slots=4, dtype='float32',
             variants='auto:remat,xla:noremat,cudnn:remat', check_xla_bytes=True)
SMOKE_MODEL = dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64)
SMOKE_XLA_FLAGS = '--xla_backend_optimization_level=0'
# jaxlib 0.11 dropped this flag, and XLA aborts on a flag it does not know.
SMOKE_XLA_FLAGS_BEFORE_0_11 = '--xla_cpu_use_fusion_emitters=false'


def smoke_xla_flags() -> str:
  """SMOKE_XLA_FLAGS, with those the installed jaxlib still knows."""
  try:
    major, minor = (int(x) for x in importlib.metadata.version('jaxlib').split('.')[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return SMOKE_XLA_FLAGS
  if (major, minor) < (0, 11):
    return f'{SMOKE_XLA_FLAGS} {SMOKE_XLA_FLAGS_BEFORE_0_11}'
  return SMOKE_XLA_FLAGS


def parse_variant(spec: str) -> tuple[str, bool]:
  """'ATTENTION:remat' or 'ATTENTION:noremat' -> (attention, remat)."""
  attention, _, remat = spec.partition(':')
  if attention not in ATTENTIONS or remat not in ('remat', 'noremat'):
    raise ValueError(f'variant {spec!r}: expected ATTENTION:remat or ATTENTION:noremat with '
                     f'ATTENTION one of {ATTENTIONS}')
  return attention, remat == 'remat'


def bench_config(args, attention: str = 'auto', remat: bool = False, max_seq_len: int = 0,
                 seq_len: int = 0):
  """configs/NAME.py at the benchmark's batch, sequence length, dtype and variant."""
  config = tt.load_config(args.config)
  if args.smoke:
    config.model.update(SMOKE_MODEL)
  seq_len = seq_len or args.seq_len
  config.train.update(batch_size=args.batch, grad_accum_steps=1)
  config.data.seq_len = seq_len
  config.model.update(attention='xla' if attention == 'cudnn' else attention, remat=remat,
                      scan_layers=True,
                      max_seq_len=max_seq_len or max(config.model.max_seq_len, seq_len))
  if args.dtype:
    config.model.dtype = args.dtype
  return config


@contextlib.contextmanager
def attention_implementation(attention: str):
  """For 'cudnn': every jax.nn.dot_product_attention call (lm's 'xla' attention makes one per
  block) runs with implementation='cudnn' until the block ends; other attentions: unchanged."""
  import jax  # pylint: disable=g-import-not-at-top
  if attention != 'cudnn':
    yield
    return
  original = jax.nn.dot_product_attention

  @functools.wraps(original)
  def forced(*args, implementation=None, **kwargs):
    del implementation
    return original(*args, implementation='cudnn', **kwargs)

  jax.nn.dot_product_attention = forced
  try:
    yield
  finally:
    jax.nn.dot_product_attention = original


@contextlib.contextmanager
def compile_events():
  """{'compile_s': seconds JAX spent tracing, lowering and compiling, 'compiles': backend
  compilations} over the block (filled in as it runs)."""
  import jax  # pylint: disable=g-import-not-at-top
  totals = {'compile_s': 0.0, 'compiles': 0}

  def listen(event, duration, **_):
    if event in COMPILE_EVENTS:
      totals['compile_s'] += duration
      totals['compiles'] += event == COMPILE_EVENTS[-1]

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield totals
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def device_info(dtype: str, peak: bool = False) -> dict:
  """The devices, the allocator's limit and (peak=True) the peak FLOP/s MFU is taken against:
  on a CPU a fresh matmul measurement, a second or two, so only where MFU needs it."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import flops  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {'jax_backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'devices': [str(d) for d in jax.devices()],
          'memory_limit_bytes': stats.get('bytes_limit'),
          'peak_flops_per_device': flops.peak_flops_per_device(dtype, device) if peak else None,
          'mem_fraction': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}


def memory_limit(args, device: dict) -> int | None:
  """Bytes a step may use: --device_gb if given, else the allocator's limit (None on CPU)."""
  if args.device_gb:
    return int(args.device_gb * 2**30)
  return device['memory_limit_bytes']


def measured_peak(args) -> int | None:
  """The allocator's peak bytes in use so far: the job's own only in its own process."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use') if args.isolate else None


def xla_memory(compiled) -> dict:
  """compiled.memory_analysis() in bytes, with the total lm.memory.xla_bytes reports
  (lm.memory.analysed_bytes), and XLA's peak where this jaxlib reports one."""
  from lm import memory  # pylint: disable=g-import-not-at-top
  out = memory.analysed_bytes(compiled)
  peak = getattr(compiled.memory_analysis(), 'peak_memory_in_bytes', None)
  if peak is not None:
    out['peak_memory'] = peak
  return out


def _error(e: BaseException) -> str:
  """The exception's type and message, its first 2,000 characters (XLA's can be pages)."""
  text = f'{type(e).__name__}: {e}'
  return text if len(text) <= 2000 else text[:2000] + ' ...'


def _free():
  import jax  # pylint: disable=g-import-not-at-top
  gc.collect()
  jax.clear_caches()


def train_variant(spec: str, args) -> dict:
  """One row of the train section (module docstring); errors end up in row['error']."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import flops, memory, model as model_lib, train  # pylint: disable=g-import-not-at-top

  attention, remat = parse_variant(spec)
  _free()  # Each variant compiles all it needs, as a fresh process would.
  config = bench_config(args, attention, remat)
  row = {'attention': attention, 'remat': remat, 'scan_layers': True,
         'batch_size': args.batch, 'seq_len': args.seq_len,
         'tokens_per_step': args.batch * args.seq_len}
  holder = {}
  try:
    with attention_implementation(attention):
      run = train.setup(config)
      row['device'] = device_info(run.cfg.dtype)
      row['dtype'] = run.cfg.dtype
      limit = memory_limit(args, row['device'])
      plan = memory.estimate(run.config)
      row['memory'] = {'planned': plan.total, 'plan': dataclasses.asdict(plan),
                       'limit': limit}
      if (attention != 'cudnn' and limit and plan.total > PLAN_MARGIN * limit
          and not args.compile_all):
        row['skipped'] = (f'planned {plan.total / 2**30:.1f} GiB per device, over '
                          f'{PLAN_MARGIN}x the {limit / 2**30:.1f} GiB the allocator may use: '
                          'not compiled (--compile_all compiles it)')
        return row
      batch_np = tt.synthetic_batch(args.batch, args.seq_len, run.cfg.vocab_size,
                                    config.train.seed)
      # Compiled for the state's and batch's shapes and shardings before either exists, as
      # lm.memory.xla_bytes compiles it: a step that cannot fit allocates nothing. The calls
      # below reuse this executable (compiles_after_compile counts any that do not).
      abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=run.batch_sharding)
                        for k, v in batch_np.items()}
      with run.active(), compile_events() as events:
        start = time.perf_counter()
        compiled = run.step_fn.lower(run.abstract_state(), abstract_batch).compile()
        row['compile_s'] = time.perf_counter() - start
      row['compile_events'] = dict(events)
      row['cudnn_fmha_calls'] = compiled.as_text().count('custom_call_target="__cudnn$fmha')
      xla = row['memory']['xla'] = xla_memory(compiled)
      row['memory']['planned_over_xla'] = plan.total / xla['total']
      if args.check_xla_bytes:
        row['memory']['xla_bytes_helper'] = memory.xla_bytes(run.config)['total']
      del compiled
      if limit and xla['total'] > limit:
        row['skipped'] = (f'XLA needs {xla["total"] / 2**30:.1f} GiB per device, over the '
                          f'{limit / 2**30:.1f} GiB the allocator may use: not run')
        return row
      holder['state'] = run.init_state()
      batch = jax.device_put(batch_np, run.batch_sharding)

      def step():
        with run.active():
          holder['state'], holder['metrics'] = run.step_fn(holder['state'], batch)
        jax.block_until_ready((holder['state'], holder['metrics']))

      with compile_events() as warm_events:
        row['first_step_s'] = tt._warm(step, args.warmup)  # pylint: disable=protected-access
      with compile_events() as events:
        timed = tt._time_steps(step, args.steps)  # pylint: disable=protected-access
      metrics = jax.device_get(holder['metrics'])
      step_s = float(np.median(timed['times']))
      fpt = flops.flops_per_token(run.cfg, args.seq_len)
      row['device'] = device_info(run.cfg.dtype, peak=True)
      peak = row['device']['peak_flops_per_device']
      row.update(
          params=model_lib.count_params(holder['state'].params), times=timed['times'],
          step_s=step_s, step_s_min=min(timed['times']), step_s_max=max(timed['times']),
          tokens_per_s=row['tokens_per_step'] / step_s, flops_per_token=fpt, peak_flops=peak,
          mfu=fpt * row['tokens_per_step'] / step_s / (peak * jax.device_count())
          if peak else None,
          compiles_after_compile=warm_events['compiles'] + events['compiles'],
          compiles_during_timing=events['compiles'], loss=float(metrics['loss']),
          target_tokens=float(metrics['tokens']),
          target_tokens_in_batch=float(batch_np['loss_mask'].sum()),
          others_cpu_share=timed['others_cpu_share'])
      row['memory']['measured_peak'] = measured_peak(args)
  except Exception as e:  # pylint: disable=broad-except
    row['error'] = _error(e)
    row['traceback'] = traceback.format_exc()[-4000:]
  finally:
    holder.clear()
    _free()
  return row


def _params(run):
  """Seeded parameters of run's model, created where run's shardings put them."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import model as model_lib  # pylint: disable=g-import-not-at-top
  return jax.jit(functools.partial(model_lib.init_params, run.cfg, run.config.train.seed),
                 out_shardings=run.shardings.params)()


def _contexts(args) -> list[int]:
  return [int(c) for c in args.contexts.split(',') if c]


def _decode_batches(args) -> list[int]:
  return [int(b) for b in args.decode_batches.split(',') if b]


def decode(args) -> dict:
  """The decode section: one row per batch x context cell (module docstring)."""
  from lm import generate, train  # pylint: disable=g-import-not-at-top
  _free()
  longest = max(_contexts(args)) + args.new_tokens
  config = bench_config(args, max_seq_len=-(-longest // 16) * 16)  # left_pad's multiple.
  section = {'new_tokens': args.new_tokens, 'repeats': args.repeats, 'rows': {}}
  try:
    run = train.setup(config)
    section['device'] = device_info(run.cfg.dtype)
    params = _params(run)
  except Exception as e:  # pylint: disable=broad-except
    section['error'] = _error(e)
    return section
  graphdef = run.graphdef  # A property that builds the model's graph: once, not per call.
  rng = np.random.default_rng(0)
  for B in _decode_batches(args):
    for C in _contexts(args):
      row = section['rows'][f'b{B}_c{C}'] = {'batch': B, 'context': C,
                                              'new_tokens': args.new_tokens}
      prompts = rng.integers(4, run.cfg.vocab_size, (B, C)).tolist()

      def generate_n(n, prompts=prompts):
        generate.sample(graphdef, params, prompts, max_new_tokens=n, temperature=0,
                        stop_tokens=[])

      try:
        with run.active(), compile_events() as events:
          many = bench_generate._best_time(  # pylint: disable=protected-access
              lambda: generate_n(args.new_tokens), args.repeats)
          one = bench_generate._best_time(  # pylint: disable=protected-access
              lambda: generate_n(1), args.repeats)
        row.update(time_new_tokens_s=many, first_token_s=one, **events)
        if many <= one:  # Noise larger than N - 1 decode steps: no rate to report.
          raise RuntimeError(f'{args.new_tokens} tokens took {many:.4f} s, not more than 1 '
                             f'token ({one:.4f} s): raise --new_tokens or --repeats')
        row.update(decode_step_ms=1e3 * (many - one) / (args.new_tokens - 1),
                   decode_tok_s=B * (args.new_tokens - 1) / (many - one))
      except Exception as e:  # pylint: disable=broad-except
        row['error'] = _error(e)
      _free()
  section['measured_peak'] = measured_peak(args)
  return section


def serving(args) -> dict:
  """The serving section: continuous against static batching (module docstring)."""
  from lm import train  # pylint: disable=g-import-not-at-top
  _free()
  config = bench_config(args, max_seq_len=SERVING_MAX_SEQ_LEN,
                        seq_len=min(args.seq_len, SERVING_MAX_SEQ_LEN))
  section = {'slots': args.slots, 'requests': args.requests, 'repeats': args.repeats,
             'max_seq_len': SERVING_MAX_SEQ_LEN}
  try:
    run = train.setup(config)
    section['device'] = device_info(run.cfg.dtype)
    params = _params(run)
    requests = bench_generate.mixed_requests(run.cfg.vocab_size, args.requests)
    section['requested_tokens'] = sum(r.max_new_tokens for r in requests)
    with run.active(), compile_events() as events:
      section.update(bench_generate.serving_rates(run.cfg, params, requests, args.slots,
                                                  args.repeats, args.static_generate))
    section.update(events)
    section['measured_peak'] = measured_peak(args)
  except Exception as e:  # pylint: disable=broad-except
    section['error'] = _error(e)
  _free()
  return section


def run_job(job: str, args) -> dict:
  """'train:VARIANT', 'decode' or 'serving', in this process."""
  kind, _, spec = job.partition(':')
  if kind == 'train':
    return train_variant(spec, args)
  if kind == 'decode':
    return decode(args)
  if kind == 'serving':
    return serving(args)
  raise ValueError(f'job {job!r}: expected train:VARIANT, decode or serving')


def run_isolated(job: str, argv: list[str], timeout: float) -> dict:
  """run_job in a fresh Python process (this file with the flags argv and --_job); a crash or
  a timeout becomes the result's error, with the end of the process's output."""
  with tempfile.TemporaryDirectory(prefix='bench_gpu_') as directory:
    path = os.path.join(directory, 'result.json')
    command = [sys.executable, os.path.abspath(__file__), *argv, '--_job', job,
               '--_job_out', path]
    try:
      done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
      output = (e.stderr or b'')[-3000:]
      return {'error': f'timed out after {timeout:.0f} s (--job_timeout, --budget_s)',
              'log_tail': output.decode(errors='replace') if isinstance(output, bytes)
              else output}
    if done.returncode or not os.path.exists(path):
      return {'error': f'the job\'s process exited with status {done.returncode}',
              'log_tail': (done.stdout[-1000:] + done.stderr[-3000:])}
    with open(path) as f:
      return json.load(f)


def jobs(args) -> list[str]:
  """Jobs in the order they run: FIRST_VARIANTS, decode, serving, the other variants."""
  sections = args.sections.split(',')
  variants = [v for v in args.variants.split(',') if v] if 'train' in sections else []
  first = [f'train:{v}' for v in variants if v in FIRST_VARIANTS]
  rest = [f'train:{v}' for v in variants if v not in FIRST_VARIANTS]
  return first + [s for s in ('decode', 'serving') if s in sections] + rest


def versions() -> dict:
  """Installed versions of what the run depends on, read without importing (torch and
  transformers, which train_throughput's probe imports, are not used here)."""
  found = {}
  for name in VERSIONED:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def _gib(n) -> str:
  return f'{n / 2**30:.2f}' if n else '-'


def _print(report: dict) -> None:
  m = report['machine']
  print(f'\n{report["settings"]["config"]}{" (smoke)" if report["settings"]["smoke"] else ""} '
        f'on {m.get("device_count", "?")} x {m.get("device_kind", "?")} '
        f'({m.get("jax_backend", "?")}), peak {(m.get("peak_flops_per_device") or 0) / 1e12:.3g} '
        f'TFLOP/s per device, allocator limit {_gib(m.get("memory_limit_bytes"))} GiB')
  if 'train' in report:
    t = report['train']
    print(f'\ntrain: batch {t["batch_size"]} x seq {t["seq_len"]} = {t["tokens_per_step"]:,} '
          f'tokens per step, scan_layers; median of {report["settings"]["steps"]} steps after '
          f'{report["settings"]["warmup"]} warmup')
    header = (f'{"variant":<14} {"dtype":>8} {"cuDNN":>5} {"compile s":>9} {"step ms":>8} '
              f'{"tok/s":>9} {"MFU":>6} {"plan GiB":>8} {"XLA GiB":>8} {"plan/XLA":>8} '
              f'{"peak GiB":>8}')
    print(header + '\n' + '-' * len(header))
    for name, r in t['rows'].items():
      mem = r.get('memory', {})
      xla = mem.get('xla', {}).get('total')
      compiled = f'{r["compile_s"]:>9.1f}' if 'compile_s' in r else f'{"-":>9}'
      cols = (f'{name:<14} {r.get("dtype", "-"):>8} {r.get("cudnn_fmha_calls", "-"):>5} '
              f'{compiled} ')
      if 'step_s' in r:
        mfu = f'{r["mfu"]:>6.1%}' if r.get('mfu') is not None else f'{"-":>6}'
        cols += f'{1e3 * r["step_s"]:>8.1f} {r["tokens_per_s"]:>9,.0f} {mfu} '
      else:
        cols += f'{"-":>8} {"-":>9} {"-":>6} '
      ratio = f'{mem["planned_over_xla"]:>8.2f}' if 'planned_over_xla' in mem else f'{"-":>8}'
      cols += (f'{_gib(mem.get("planned")):>8} {_gib(xla):>8} {ratio} '
               f'{_gib(mem.get("measured_peak")):>8}')
      print(cols)
      note = r.get('error') or r.get('skipped')
      if note:
        print(f'  {name}: {note.splitlines()[0][:300]}')
    print('cuDNN: cuDNN fused attention calls in the compiled step; plan: lm.memory.estimate; '
          'XLA: compiled.memory_analysis(); peak: the allocator\'s, in an isolated run')
  if 'decode' in report:
    d = report['decode']
    print(f'\ndecode (lm.generate.sample, greedy, KV cache): {d.get("new_tokens")} new tokens, '
          f'best of {d.get("repeats")}')
    header = (f'{"batch":>5} {"context":>7} {"decode tok/s":>12} {"ms/step":>8} '
              f'{"first token s":>13} {"compile s":>9}')
    print(header + '\n' + '-' * len(header))
    for r in d.get('rows', {}).values():
      if 'decode_tok_s' in r:
        print(f'{r["batch"]:>5} {r["context"]:>7} {r["decode_tok_s"]:>12,.0f} '
              f'{r["decode_step_ms"]:>8.2f} {r["first_token_s"]:>13.3f} {r["compile_s"]:>9.1f}')
      else:
        print(f'{r["batch"]:>5} {r["context"]:>7}  {r.get("error", "")[:200]}')
    if 'error' in d or 'skipped' in d:
      print(f'  decode: {(d.get("error") or d["skipped"])[:300]}')
  if 'serving' in report:
    s = report['serving']
    if 'continuous_tok_s' in s:
      generated = (f', static via generate.sample {s["static_generate_tok_s"]:,.0f} tok/s'
                   if 'static_generate_tok_s' in s else '')
      print(f'\nserving: {s["requests"]} requests ({s["requested_tokens"]:,} new tokens) through '
            f'{s["slots"]} slots: continuous batching {s["continuous_tok_s"]:,.0f} tok/s, static '
            f'{s["static_tok_s"]:,.0f} tok/s ({s["continuous_over_static"]:.2f}x){generated}; '
            f'compile {s["compile_s"]:.1f} s')
    else:
      print(f'\nserving: {(s.get("error") or s.get("skipped") or "")[:300]}')
  print('\ncompile s: ' + ', '.join(f'{k} {v:.1f}' for k, v in report['compile_s'].items()))


def _compile_summary(report: dict) -> dict:
  """{row: compile seconds} over every section: the fourth table."""
  out = {}
  for name, r in report.get('train', {}).get('rows', {}).items():
    if 'compile_s' in r:
      out[f'train {name}'] = r['compile_s']
  for name, r in report.get('decode', {}).get('rows', {}).items():
    if 'compile_s' in r:
      out[f'decode {name}'] = r['compile_s']
  if 'compile_s' in report.get('serving', {}):
    out['serving'] = report['serving']['compile_s']
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='llama_1b', help='model: configs/NAME.py')
  parser.add_argument('--batch', type=int, default=16, help='train.batch_size (sequences)')
  parser.add_argument('--seq_len', type=int, default=2048, help='data.seq_len')
  parser.add_argument('--dtype', default='', help="model.dtype; '' keeps the config's")
  parser.add_argument('--variants', default=','.join(VARIANTS),
                      help='comma-separated ATTENTION:remat|noremat, ATTENTION of '
                      f'{ATTENTIONS}')
  parser.add_argument('--steps', type=int, default=5, help='timed train steps per variant')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed train steps after compiling (at least 1)')
  parser.add_argument('--device_gb', type=float, default=0,
                      help='plan and skip variants as if a device held this many GiB (e.g. 80 '
                      'for an H100 on an H200); 0: the allocator\'s limit')
  parser.add_argument('--compile_all', action='store_true',
                      help='compile auto/xla variants planned far over the memory limit too')
  parser.add_argument('--check_xla_bytes', action='store_true',
                      help='also call lm.memory.xla_bytes per variant (compiles it again)')
  parser.add_argument('--decode_batches', default='1,32', help='lm.generate batch sizes')
  parser.add_argument('--contexts', default='1024,4096', help='prompt lengths, comma-separated')
  parser.add_argument('--new_tokens', type=int, default=64, help='tokens generated per timing')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per decode/serving time')
  parser.add_argument('--requests', type=int, default=64, help='requests in the serving mix')
  parser.add_argument('--slots', type=int, default=16, help='engine slots = static batch size')
  parser.add_argument('--static_generate', action='store_true',
                      help='serving: also static batching through generate.sample (compiles '
                      'once per batch)')
  parser.add_argument('--sections', default=','.join(SECTIONS),
                      help=f'comma-separated, of {SECTIONS}')
  parser.add_argument('--isolate', action=argparse.BooleanOptionalAction, default=None,
                      help='each job in its own process (default: yes, except with --smoke)')
  parser.add_argument('--job_timeout', type=float, default=300, help='seconds per isolated job')
  parser.add_argument('--budget_s', type=float, default=540,
                      help='start no job after this many seconds (the rest are skipped) and, '
                      f'isolated, stop one still running {BUDGET_GRACE_S} s later')
  parser.add_argument('--smoke', action='store_true',
                      help=f'tiny sizes on CPU in seconds: {SMOKE}')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results', 'gpu.json'))
  parser.add_argument('--_job', help=argparse.SUPPRESS)
  parser.add_argument('--_job_out', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  if args.isolate is None:
    args.isolate = not args.smoke
  if args.smoke and SMOKE_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):  # Before JAX starts.
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {smoke_xla_flags()}'.strip()
  sections = args.sections.split(',')
  if not sections or set(sections) - set(SECTIONS):
    parser.error(f'--sections={args.sections!r}: expected a comma-separated subset of {SECTIONS}')
  try:
    for spec in args.variants.split(','):
      parse_variant(spec)
  except ValueError as e:
    parser.error(f'--variants: {e}')
  if min(args.steps, args.warmup, args.batch, args.repeats, args.requests, args.slots) < 1:
    parser.error('--steps, --warmup, --batch, --repeats, --requests and --slots must be >= 1')
  if args.new_tokens < 2 or not _contexts(args) or not _decode_batches(args):
    parser.error('--new_tokens must be at least 2; --contexts and --decode_batches non-empty')

  if args._job:  # pylint: disable=protected-access
    result = run_job(args._job, args)  # pylint: disable=protected-access
    with open(args._job_out, 'w') as f:  # pylint: disable=protected-access
      json.dump(result, f)
    return

  start = time.perf_counter()
  from lm import flops  # pylint: disable=g-import-not-at-top  (starts no device)
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cpu': flops._cpu_model(),  # pylint: disable=protected-access
                  'cores': os.cpu_count(), 'platform': platform.platform(),
                  'python': platform.python_version(), 'load_avg_at_start': os.getloadavg()},
      'versions': versions(),
      'settings': vars(args),
      'model': bench_config(args).model.to_dict(),
      'jobs': {},
  }
  if 'train' in sections:
    report['train'] = {'batch_size': args.batch, 'seq_len': args.seq_len,
                       'tokens_per_step': args.batch * args.seq_len, 'rows': {}}
  for job in jobs(args):
    job_start = time.perf_counter()
    left = start + args.budget_s - job_start
    if left <= 0:
      result = {'skipped': f'--budget_s={args.budget_s:g} s had passed'}
    elif args.isolate:  # A job may run BUDGET_GRACE_S past the budget, no more.
      result = run_isolated(job, sys.argv[1:], min(args.job_timeout, left + BUDGET_GRACE_S))
    else:
      result = run_job(job, args)
    report['jobs'][job] = {'wall_s': time.perf_counter() - job_start,
                           'error': result.get('error'), 'skipped': result.get('skipped')}
    note = result.get('error') or result.get('skipped') or 'done'
    print(f'[{time.perf_counter() - start:4.0f} s] {job}: {note.splitlines()[0][:160]}',
          flush=True)
    device = result.pop('device', {})
    report['machine'].update({k: v for k, v in device.items() if v is not None})
    kind, _, spec = job.partition(':')
    if kind == 'train':
      report['train']['rows'][spec] = result
    else:
      report[kind] = result
  if 'train' in report:  # Rows in --variants order.
    rows = report['train']['rows']
    report['train']['rows'] = {v: rows[v] for v in args.variants.split(',') if v in rows}
  report['compile_s'] = _compile_summary(report)
  _print(report)
  tt.finish_report(report, args.out, start)


if __name__ == '__main__':
  main()
