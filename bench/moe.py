"""Mixture-of-Experts training throughput on CPU: configs/moe_tiny.py, dropping and dropless,
against a dense model of the same active size; and its expert-parallel step on 8 fake devices.

  python bench/moe.py [--steps 10] [--warmup 3] [--rounds 5] [--dtype float32]
      [--capacity_factor 1.25] [--sections single,expert]
  python bench/moe.py --smoke   # seconds, a 1-layer model (tests/test_bench_moe.py runs it)

single  On one CPU device, three runs of the same shape, batch and sequence length:
          moe_dropping  configs/moe_tiny.py (8 experts of width d_ff, top-2, every block) with
                        model.moe.capacity_factor=--capacity_factor: C = ceil(cf * top_k * T / E)
                        slots per expert and row, assignments beyond them dropped (lm/moe.py's
                        capacity path, one-hot dispatch and combine einsums);
          moe_dropless  the same with capacity_factor=0: every assignment computed, sorted by
                        expert, with jax.lax.ragged_dot (grouped matmuls, which XLA:CPU computes
                        as one masked matmul per expert, lm/moe.py says);
          dense         configs/tiny.py with d_ff = top_k x moe_tiny's d_ff, so a token's MLP
                        matmuls are the MoE's top_k experts' (same active parameters but the
                        router's D x E per layer; both are in the report).
        Each run is built by lm.train.setup(config) and stepped with its jitted, donated
        run.step_fn inside run.active(), on one synthetic packed batch (bench/train_throughput.py's
        synthetic_batch: random tokens, 2-4 documents per row). The first --warmup steps are
        untimed; the first of them compiles, and compile_s is JAX's own trace, lowering and XLA
        compile time during it (jax.monitoring events), reported apart from first_step_s. Then
        --steps timed steps per run alternate between the runs in --rounds rounds, so that load
        from other processes falls on all alike (bench/train_throughput.py's _measure); step
        times are medians, tokens/s counts batch x seq_len per step. Compilations during the
        timed steps are counted (they should be 0). The moe_dropped share is the step metrics'
        (lm.train.moe_metric_sums: dropped assignments over all assignments, mean over MoE
        layers), at the first step and as the median over the timed steps, per layer too.
expert  moe_dropping on 8 fake CPU devices (a subprocess with
        XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX starts): config.mesh
        data=8 (experts replicated), expert=8 (experts and batch split 8 ways), and expert=4 x
        data=2, timed as above; each row counts the collectives in the compiled step's HLO
        (run.step_fn.lower(...).compile().as_text(), the jit cache's executable, after timing)
        and says whether it contains an all-to-all. All 8 devices share this machine's cores,
        so these step times only compare the meshes with each other.

MFU is computed as lm/train.py computes it: flops.flops_per_token(cfg, seq_len, N, N_trained)
with N from flops.matmul_param_counts(params, ..., active_expert_share=top_k / num_experts)
(the PaLM count 6N + 12 L H Q T with N the active matmul parameters: a token's top_k experts,
the router, attention and the output projection), times tokens/s, over
flops.peak_flops_per_device(dtype) x jax.device_count(): on CPU the matmul FLOP/s measured on this
machine for the compute dtype (the higher of a fresh measurement and the cached best), shared
by all fake devices. Moving tokens to their experts (dispatch, sort, all-to-all) is not model
FLOPs, so it lowers MFU. Writes --out (default bench/results/moe.json) and prints two tables.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench import train_throughput as tt  # pylint: disable=wrong-import-position
from bench.rl import COMPILE_EVENT  # pylint: disable=wrong-import-position

# train_throughput's timing, interleaving and version helpers, private there.
# pylint: disable-next=protected-access
_time_steps, _warm, _measure, _summary, _versions = (
    tt._time_steps, tt._warm, tt._measure, tt._summary, tt._versions)

VARIANTS = ('moe_dropping', 'moe_dropless', 'dense')
# Row name: config.mesh sizes (the others 1); each uses all 8 devices.
MESHES = {
    'data=8': dict(data=8),
    'expert=8': dict(expert=8),
    'expert=4 x data=2': dict(expert=4, data=2),
}
EXPERT_DEVICES = 8
# JAX's trace, lowering and XLA compile: together, what a first step spends compiling.
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration', COMPILE_EVENT)
COLLECTIVES = ('all-to-all', 'all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute')
# A model small enough that the six runs compile and time in seconds (8 experts kept, so that
# expert=8 divides them); --smoke also compiles with XLA:CPU's backend optimizations off
# (SMOKE_XLA_FLAGS), which halves compile time: its step times mean nothing.
SMOKE_MODEL = dict(vocab_size=256, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32,
                   max_seq_len=32)
SMOKE = dict(steps=2, warmup=1, rounds=1, batch=8, seq_len=32)
SMOKE_XLA_FLAGS = '--xla_backend_optimization_level=0'


def bench_config(variant: str, args, mesh: dict | None = None):
  """The run config of one variant (VARIANTS), at the benchmark's dtype, batch and sequence
  length, on a config.mesh of `mesh`'s sizes (default: one device)."""
  moe = tt.load_config('moe_tiny')
  dense = tt.load_config('tiny') if variant == 'dense' else None
  for c in [c for c in (moe, dense) if c is not None]:
    if args.smoke:
      c.model.update(SMOKE_MODEL)
    c.model.dtype = args.dtype
    c.train.batch_size = args.batch or c.train.batch_size
    c.data.seq_len = args.seq_len or c.data.seq_len
    c.model.max_seq_len = max(c.model.max_seq_len, c.data.seq_len)
  if dense is not None:
    config = dense
    config.model.d_ff = moe.model.moe.top_k * moe.model.d_ff
    differ = sorted(k for k in set(config.model) | set(moe.model)
                    if k not in ('d_ff', 'moe') and config.model.get(k) != moe.model.get(k))
    differ += [f'train.{k}' for k in config.train if config.train[k] != moe.train.get(k)]
    if differ or config.model.moe.num_experts:
      raise ValueError(f'configs/tiny.py and configs/moe_tiny.py differ beyond model.d_ff and '
                       f'model.moe ({differ}): the dense run would not be the MoE run with one '
                       'wide MLP')
  else:
    config = moe
    config.model.moe.capacity_factor = 0.0 if variant == 'moe_dropless' else args.capacity_factor
  config.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1, **(mesh or {})})
  return config


@contextlib.contextmanager
def _events(names):
  """Records (event, seconds) of the JAX monitoring events in `names` while open."""
  seen = []

  def listen(event, duration, **_):
    if event in names:
      seen.append((event, duration))

  import jax  # pylint: disable=g-import-not-at-top
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


class _Run:
  """One config's run, built by lm.train.setup and warmed up; time_steps(n) as tt._Worker's, so
  tt._measure can interleave the runs of one process."""

  def __init__(self, config, devices, warmup: int):
    import jax  # pylint: disable=g-import-not-at-top
    from lm import flops, model as model_lib, train  # pylint: disable=g-import-not-at-top

    self.run = run = train.setup(config, devices)
    cfg, t, seq_len = run.cfg, run.config.train, run.config.data.seq_len
    self.batch = jax.device_put(tt.synthetic_batch(t.batch_size, seq_len, cfg.vocab_size, t.seed),
                                run.batch_sharding)
    self.state = run.init_state()
    self.metrics = []  # Every step's metrics, warmup included (device scalars until the end).
    with _events(COMPILE_EVENTS) as compiled:
      first = _warm(self.step, warmup)
    # lm/train.py's MFU terms: the active matmul count and the devices' peak.
    experts, top_k, moe_layers = flops.moe_shape(cfg)
    matmul, trained_matmul = flops.matmul_param_counts(
        run.abstract_state().params, run.trained, cfg.tie_embeddings,
        active_expert_share=top_k / experts if experts else 1.0)
    self.info = dict(
        dtype=cfg.dtype, attention=cfg.attention, devices=run.mesh.devices.size,
        mesh={k: v for k, v in run.mesh.shape.items()}, batch_size=t.batch_size, seq_len=seq_len,
        tokens_per_step=t.batch_size * seq_len, d_ff=cfg.d_ff,
        params=model_lib.count_params(self.state.params),
        matmul_params_active=matmul, matmul_params_total=flops.matmul_params(cfg),
        flops_per_token=flops.flops_per_token(cfg, seq_len, matmul, trained_matmul),
        peak_flops=flops.peak_flops_per_device(cfg.dtype) * jax.device_count(),
        compile_s=sum(seconds for _, seconds in compiled), first_step_s=first,
        moe=dict(num_experts=experts, top_k=top_k, layers=moe_layers,
                 capacity_factor=cfg.moe_capacity_factor) if experts else None)
    if experts and cfg.moe_capacity_factor > 0:
      from lm import moe as moe_lib  # pylint: disable=g-import-not-at-top
      self.info['moe']['capacity_slots'] = moe_lib.capacity(
          cfg.moe_capacity_factor, top_k, seq_len, experts)

  def step(self):
    import jax  # pylint: disable=g-import-not-at-top
    with self.run.active():
      self.state, metrics = self.run.step_fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    self.metrics.append(metrics)

  def time_steps(self, n: int) -> dict:
    return _time_steps(self.step, n)

  def collectives(self) -> dict:
    """How many of each collective the compiled step's HLO holds (the executable jit already
    built: lowering the same arguments again is a cache hit)."""
    with self.run.active():
      hlo = self.run.step_fn.lower(self.state, self.batch).compile().as_text()
    return {op: len(re.findall(rf' {op}(?:-start)?\(', hlo)) for op in COLLECTIVES}


def _median(values):
  return float(statistics.median(values)) if values else None


def measure(runs: dict, args) -> tuple[dict, int]:
  """Times the runs of this process interleaved; returns (rows, compilations while timed)."""
  with _events((COMPILE_EVENT,)) as compiles:
    timed = _measure(runs, args.steps, min(args.rounds, args.steps))
  rows = {}
  for name, r in runs.items():
    row = _summary(r.info, timed[name], r.info['tokens_per_step'])
    row['mfu'] = row['flops_per_token'] * row['tokens_per_s'] / row['peak_flops']
    metrics = [{k: float(v) for k, v in m.items()} for m in r.metrics]
    steady = metrics[-args.steps:]
    row['first_loss'] = metrics[0]['loss']
    row['losses'] = [m['loss'] for m in steady]
    if row['moe']:
      layers = range(row['moe']['layers'])
      row['moe'].update(
          dropped_first=metrics[0]['moe_dropped'],
          dropped=_median([m['moe_dropped'] for m in steady]),
          dropped_per_layer=[_median([m[f'moe_dropped_{i}'] for m in steady]) for i in layers],
          max_load_per_layer=[_median([m[f'moe_max_load_{i}'] for m in steady]) for i in layers],
          load_balance=_median([m['moe_load_balance'] for m in steady]))
    row['collectives'] = r.collectives()
    row['all_to_all'] = row['collectives']['all-to-all'] > 0
    rows[name] = row
  return rows, len(compiles)


def ratios(rows: dict, base: str) -> dict:
  """Each other row's tokens/s, step time and MFU over row `base`'s."""
  b = rows[base]
  return {name: {k: r[k] / b[k] for k in ('tokens_per_s', 'step_s', 'mfu')}
          for name, r in rows.items() if name != base}


def run_single(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()[:1]
  runs = {}
  for name in VARIANTS:
    runs[name] = _Run(bench_config(name, args), devices, args.warmup)
    print(f'{name}: compiled in {runs[name].info["compile_s"]:.1f} s', file=sys.stderr)
  rows, compiles = measure(runs, args)
  return {'results': rows, 'ratios_to_dense': ratios(rows, 'dense'),
          'compiles_during_timing': compiles}


def run_expert(args) -> dict:
  """The expert-parallel rows, in this process (which must have the 8 fake devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() != EXPERT_DEVICES:
    raise RuntimeError(f'{jax.device_count()} devices: the expert-parallel rows need '
                       f'XLA_FLAGS=--xla_force_host_platform_device_count={EXPERT_DEVICES} set '
                       'before JAX starts')
  runs = {}
  for name, mesh in MESHES.items():
    runs[name] = _Run(bench_config('moe_dropping', args, mesh), jax.devices(), args.warmup)
    print(f'{name}: compiled in {runs[name].info["compile_s"]:.1f} s', file=sys.stderr)
  rows, compiles = measure(runs, args)
  return {'results': rows, 'ratios_to_data8': ratios(rows, 'data=8'),
          'compiles_during_timing': compiles, 'devices': [str(d) for d in jax.devices()]}


def expert_subprocess(args) -> dict:
  """run_expert in a fresh Python with 8 fake CPU devices (this process's JAX already started)."""
  env = dict(os.environ, XLA_FLAGS=(
      os.environ.get('XLA_FLAGS', '') +
      f' --xla_force_host_platform_device_count={EXPERT_DEVICES}').strip())
  with tempfile.TemporaryDirectory(prefix='bench_moe_') as directory:
    out = os.path.join(directory, 'expert.json')
    command = [sys.executable, os.path.abspath(__file__), '--expert_child', '--out', out,
               '--steps', str(args.steps), '--warmup', str(args.warmup),
               '--rounds', str(args.rounds), '--dtype', args.dtype,
               '--capacity_factor', str(args.capacity_factor),
               '--batch', str(args.batch), '--seq_len', str(args.seq_len)]
    result = subprocess.run(command + (['--smoke'] if args.smoke else []), env=env, check=False)
    if result.returncode:
      raise RuntimeError(f'the expert-parallel subprocess failed (exit {result.returncode}): '
                         f'{" ".join(command)}')
    with open(out) as f:
      return json.load(f)


def _print(report: dict, args) -> None:
  m = report['machine']
  print(f'\n{m["cpu"]}, {m["cores_available"]} cores, {m["jax_backend"]}; matmul peak '
        f'{report["peak_flops"]["float32"] / 1e9:.0f} GFLOP/s fp32, '
        f'{report["peak_flops"]["bfloat16"] / 1e9:.0f} bf16; median of {args.steps} steps after '
        f'{args.warmup} warmup{" (smoke)" if args.smoke else ""}')
  header = (f'{"run":<18} {"d_ff":>5} {"cap":>5} {"params":>8} {"N active":>9} {"step ms":>8} '
            f'{"tok/s":>8} {"MFU":>6} {"vs dense":>8} {"dropped":>7} {"compile s":>9} '
            f'{"others":>6}')
  single = report.get('single')
  if single:
    print(header + '\n' + '-' * len(header))
    for name, r in single['results'].items():
      moe = r['moe'] or {}
      cap = f'{moe["capacity_factor"]:g}' if moe else '-'
      vs = single['ratios_to_dense'].get(name, {}).get('tokens_per_s', 1.0)
      dropped = f'{moe["dropped"]:.1%}' if moe else '-'
      print(f'{name:<18} {r["d_ff"]:>5} {cap:>5} {r["params"] / 1e6:>7.2f}M '
            f'{r["matmul_params_active"] / 1e6:>8.3f}M {r["step_s"] * 1e3:>8.1f} '
            f'{r["tokens_per_s"]:>8,.0f} {r["mfu"]:>6.1%} {vs:>7.2f}x {dropped:>7} '
            f'{r["compile_s"]:>9.1f} {r["others_cpu_share"]:>6.0%}')
    d = single['results']['moe_dropping']['moe']
    print(f'moe_dropping: {d.get("capacity_slots")} slots per expert and row; dropped '
          f'{d["dropped_first"]:.1%} of assignments at the first step, {d["dropped"]:.1%} (median) '
          f'while timed, per layer {", ".join(f"{x:.1%}" for x in d["dropped_per_layer"])}; '
          f'{single["compiles_during_timing"]} compilations while timed')
  expert = report.get('expert_parallel')
  if expert:
    header = (f'{"mesh (8 fake devices)":<22} {"step ms":>8} {"tok/s":>8} {"MFU":>6} '
              f'{"vs data=8":>9} {"all-to-all":>10} {"all-reduce":>10} {"compile s":>9} '
              f'{"others":>6}')
    print('\n' + header + '\n' + '-' * len(header))
    for name, r in expert['results'].items():
      vs = expert['ratios_to_data8'].get(name, {}).get('step_s', 1.0)
      print(f'{name:<22} {r["step_s"] * 1e3:>8.1f} {r["tokens_per_s"]:>8,.0f} {r["mfu"]:>6.1%} '
            f'{vs:>8.2f}x {r["collectives"]["all-to-all"]:>10} '
            f'{r["collectives"]["all-reduce"]:>10} {r["compile_s"]:>9.1f} '
            f'{r["others_cpu_share"]:>6.0%}')
    print(f'vs data=8: step time over the data=8 row\'s; all-to-all, all-reduce: ops in the '
          f'compiled step; {expert["compiles_during_timing"]} compilations while timed')
  print('tok/s: batch x seq_len per second; MFU: active-parameter FLOPs (6 N_active + attention) '
        'over the measured CPU peak; others: the share of the CPUs other processes took while '
        'timed (above ~10%, rerun).')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sections', default='single,expert',
                      help="comma-separated: 'single' (one device: dropping, dropless, dense), "
                      "'expert' (8 fake devices: data=8, expert=8, expert=4 x data=2)")
  parser.add_argument('--steps', type=int, default=10, help='timed steps per run')
  parser.add_argument('--rounds', type=int, default=5,
                      help="the timed steps alternate between a section's runs in this many rounds")
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed steps first (the first one compiles)')
  parser.add_argument('--dtype', default='float32', help="config.model.dtype ('auto' allowed)")
  parser.add_argument('--capacity_factor', type=float, default=1.25,
                      help="model.moe.capacity_factor of the dropping runs (> 0)")
  parser.add_argument('--batch', type=int, default=0,
                      help='train.batch_size (0: the configs\', 16); must divide by 8 for expert')
  parser.add_argument('--seq_len', type=int, default=0, help='data.seq_len (0: the configs\')')
  parser.add_argument('--smoke', action='store_true',
                      help=f'tiny sizes that finish in seconds: {SMOKE}, model {SMOKE_MODEL}, '
                      f'XLA_FLAGS+={SMOKE_XLA_FLAGS}')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results', 'moe.json'))
  parser.add_argument('--expert_child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
    # Before JAX starts (nothing above imports it); the expert subprocess inherits it.
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {SMOKE_XLA_FLAGS}'.strip()
  sections = [s for s in args.sections.split(',') if s]
  if not sections or set(sections) - {'single', 'expert'}:
    parser.error(f"--sections={args.sections!r}: expected a comma-separated subset of "
                 "single,expert")
  if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
    parser.error('--warmup, --steps and --rounds must be at least 1')
  if not args.capacity_factor > 0:
    parser.error(f'--capacity_factor={args.capacity_factor}: the dropping runs need > 0 (0 is '
                 'the dropless run, always measured)')
  if args.expert_child:
    tt.write_report(run_expert(args), args.out)
    return
  start = time.perf_counter()

  import jax  # pylint: disable=g-import-not-at-top
  from lm import flops  # pylint: disable=g-import-not-at-top
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cpu': flops._cpu_model(),  # pylint: disable=protected-access
                  'cores': os.cpu_count(), 'cores_available': len(os.sched_getaffinity(0)),
                  'platform': platform.platform(), 'jax_backend': jax.default_backend(),
                  'load_avg_at_start': os.getloadavg()},
      'versions': _versions(),
      'settings': vars(args),
      'peak_flops': dict(flops.cpu_peak_flops()),  # Measured before any run, cached per process.
  }
  if 'single' in sections:
    report['single'] = run_single(args)
  if 'expert' in sections:
    report['expert_parallel'] = expert_subprocess(args)
  _print(report, args)
  tt.finish_report(report, args.out, start)


if __name__ == '__main__':
  main()
