"""Training throughput on this machine: `lm` (JAX) against HuggingFace's LlamaForCausalLM (PyTorch).

  pip install -e '.[bench]'   # torch==2.13.0 (CPU wheel) and transformers
  python bench/train_throughput.py [--configs tiny,llama_20m] [--steps 10] [--skip_torch]

For each config, one full training step (forward, backward, clipping, AdamW) is timed on both
sides at the same shape, batch and sequence length, on synthetic packed batches (2-4 documents
per row, as the data pipeline makes them). The JAX side runs the project's own code path:
lm.train.setup's jitted, donated train_step and sharded initial state, as training builds them,
in fp32 like the PyTorch side (--dtype picks another only with --skip_torch). Each side runs in
its own process (so the frameworks' thread pools never compete), set up and warmed up once
(--warmup steps, the first compiling); then --steps timed steps per side alternate between the
sides in --rounds rounds, so that load from other processes falls on both alike. Step times are
medians; the 'others' column says how much of the CPUs other processes took meanwhile.

MFU = flops.flops_per_token x tokens/s / peak, where peak is the matmul FLOP/s measured on this
machine (lm/flops.py) for the compute dtype, the higher of a fresh measurement and the cached one,
so a peak measured on a busy machine never inflates MFU.
"""

import argparse
import datetime
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)


def load_config(name: str, grad_accum_steps: int = 0):
  """configs/NAME.py's get_config(), with train.grad_accum_steps overridden unless 0."""
  path = os.path.join(_ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs.{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if grad_accum_steps:
    config.train.grad_accum_steps = grad_accum_steps
  return config


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
  """Random tokens packed 2-4 documents per row, laid out as lm.data.make_batch lays them out.

  segment_ids count documents from 1, positions restart at 0 in each document, and loss_mask is
  0 where the target is the next document's first token.
  """
  rng = np.random.default_rng(seed)
  segment_ids_BT = np.zeros((batch_size, seq_len), np.int32)
  positions_BT = np.zeros((batch_size, seq_len), np.int32)
  loss_mask_BT = np.ones((batch_size, seq_len), np.float32)
  for b in range(batch_size):
    num_docs = int(rng.integers(2, 5))
    starts = np.sort(rng.choice(np.arange(1, seq_len), num_docs - 1, replace=False))
    is_start_T = np.zeros(seq_len, bool)
    is_start_T[0] = True
    is_start_T[starts] = True
    segment_ids_BT[b] = np.cumsum(is_start_T)
    index_T = np.arange(seq_len)
    positions_BT[b] = index_T - np.maximum.accumulate(np.where(is_start_T, index_T, 0))
    loss_mask_BT[b, starts - 1] = 0.0
  tokens_BT1 = rng.integers(1, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  return dict(inputs=tokens_BT1[:, :-1], targets=tokens_BT1[:, 1:], segment_ids=segment_ids_BT,
              positions=positions_BT, loss_mask=loss_mask_BT)


def _machine_busy_s() -> float:
  """CPU-seconds all processes on this machine have spent busy since boot (from /proc/stat)."""
  try:
    with open('/proc/stat') as f:
      ticks = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return float('nan')
  idle = ticks[3] + ticks[4]  # idle + iowait
  return (sum(ticks[:8]) - idle) / os.sysconf('SC_CLK_TCK')


def _time_steps(step, n: int) -> dict:
  """Times n calls of step(); also how busy the rest of the machine was meanwhile."""
  times = []
  busy, own, wall = _machine_busy_s(), time.process_time(), time.perf_counter()
  for _ in range(n):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  wall = time.perf_counter() - wall
  others = _machine_busy_s() - busy - (time.process_time() - own)
  return {'times': times, 'others_cpu_share': max(others, 0.0) / (wall * os.cpu_count())}


def _serve(conn, setup, args):
  """Worker process: builds and warms up a step once, then times steps on request."""
  try:
    step, info = setup(*args)
  except Exception:  # pylint: disable=broad-except
    conn.send(RuntimeError(f'{setup.__name__}{args} failed:\n{traceback.format_exc()}'))
    return
  conn.send(info)
  while (n := conn.recv()) is not None:
    conn.send(_time_steps(step, n))


class _Worker:
  """A framework's training step in its own process, so thread pools never compete."""

  def __init__(self, setup, *args):
    context = multiprocessing.get_context('spawn')
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_serve, args=(child, setup, args), daemon=True)
    self._process.start()
    self.info = self._conn.recv()
    if isinstance(self.info, Exception):
      raise self.info

  def time_steps(self, n: int) -> dict:
    self._conn.send(n)
    return self._conn.recv()

  def close(self):
    self._conn.send(None)
    self._process.join()


def _warm(step, warmup: int) -> float:
  """Runs warmup steps (the first compiles); returns the first step's seconds."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    step()
  return first


def jax_setup(config_name: str, grad_accum_steps: int, dtype: str, attention: str, warmup: int):
  """lm's own sharded, jitted, donated train step (lm.train.setup, as training builds it),
  warmed up. dtype '' keeps the config's."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import flops, model as model_lib, train  # pylint: disable=g-import-not-at-top

  config = load_config(config_name, grad_accum_steps)
  if attention:
    config.model.attention = attention
  config.model.dtype = dtype or config.model.dtype
  run = train.setup(config)
  cfg, t = run.cfg, config.train
  state = run.init_state()
  batch = jax.device_put(
      synthetic_batch(t.batch_size, config.data.seq_len, cfg.vocab_size, t.seed),
      run.batch_sharding)
  holder = {'state': state}

  def step():
    with run.active():
      holder['state'], metrics = run.step_fn(holder['state'], batch)
    jax.block_until_ready((holder['state'], metrics))

  first = _warm(step, warmup)
  return step, dict(first_step_s=first, dtype=cfg.dtype, attention=cfg.attention,
                    devices=jax.device_count(), mesh=dict(run.mesh.shape),
                    params=model_lib.count_params(holder['state'].params),
                    flops_per_token=flops.flops_per_token(cfg, config.data.seq_len))


def hf_llama(config, name: str):
  """transformers' LlamaForCausalLM (sdpa, fp32) of config.model's shape, seeded by
  config.train.seed, in training mode: the PyTorch peer of configs/NAME.py."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  m = config.model
  if m.block != 'llama':
    raise ValueError(f'config {name}: model.block={m.block!r}; the peer is llama only')
  torch.manual_seed(config.train.seed)
  llama_config = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_seq_len,
      rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
      attention_bias=False, mlp_bias=False, initializer_range=m.init_std,
      attn_implementation='sdpa', dtype=torch.float32)
  return transformers.LlamaForCausalLM(llama_config).train()


def torch_train_step(model, config):
  """(step, trained parameters): one step of lm's train_step's work on a torch model.

  Forward, masked cross-entropy, backward (over t.grad_accum_steps micro-batches, as train_step
  splits them), clipping to global norm t.grad_clip, torch AdamW with weight decay on matrices
  only, over the parameters that require grad, on one synthetic batch.
  """
  import torch  # pylint: disable=g-import-not-at-top

  t = config.train
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(
      [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': t.weight_decay},
       {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}],
      lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.eps)
  batch = {k: torch.from_numpy(v) for k, v in synthetic_batch(
      t.batch_size, config.data.seq_len, config.model.vocab_size, t.seed).items()}
  micro_batches = [{k: v[j::t.grad_accum_steps] for k, v in batch.items()}
                   for j in range(t.grad_accum_steps)]  # Rows j, j + k, ... as train_step.
  tokens = batch['loss_mask'].sum().clamp(min=1.0)

  def step():
    optimizer.zero_grad(set_to_none=True)
    for micro in micro_batches:
      logits_BTV = model(input_ids=micro['inputs'], position_ids=micro['positions'].long()).logits
      nll_BT = torch.nn.functional.cross_entropy(
          logits_BTV.flatten(0, 1), micro['targets'].long().flatten(), reduction='none')
      ((nll_BT * micro['loss_mask'].flatten()).sum() / tokens).backward()
    if t.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    optimizer.step()

  return step, params


def torch_setup(config_name: str, grad_accum_steps: int, warmup: int):
  """transformers' LlamaForCausalLM (sdpa, fp32) with torch AdamW, warmed up.

  The same work per step as lm's train_step (torch_train_step). Attention takes SDPA's plain
  causal path (position ids restart per document, as on the JAX side, but documents are not
  masked from each other): the fastest causal path torch has, so the ratio is conservative.
  """
  import torch  # pylint: disable=g-import-not-at-top

  config = load_config(config_name, grad_accum_steps)
  step, params = torch_train_step(hf_llama(config, config_name), config)
  first = _warm(step, warmup)
  return step, dict(first_step_s=first, dtype='float32', threads=torch.get_num_threads(),
                    params=sum(p.numel() for p in params))


def _measure_peaks() -> dict:
  from lm import flops  # pylint: disable=g-import-not-at-top
  cached = dict(flops.cpu_peak_flops())
  fresh = {dtype: flops.measure_matmul_flops(dtype) for dtype in ('float32', 'bfloat16')}
  return {'cached': cached, 'fresh': fresh,
          'used': {k: max(cached[k], fresh[k]) for k in fresh}}


def _versions() -> dict:
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers', 'numpy'):
    try:
      versions[name] = importlib.import_module(name).__version__
    except ImportError:
      versions[name] = None
  return versions


def _measure(workers: dict, steps: int, rounds: int) -> dict:
  """Times `steps` steps per worker in `rounds` interleaved rounds, so that load from other
  processes falls on both sides alike; returns each side's times and the others' CPU share."""
  results = {name: {'times': [], 'others_cpu_share': []} for name in workers}
  per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
  for r, n in enumerate(per_round):
    order = list(workers) if r % 2 == 0 else list(workers)[::-1]
    for name in order:
      timed = workers[name].time_steps(n)
      results[name]['times'] += timed['times']
      results[name]['others_cpu_share'].append(timed['others_cpu_share'])
  return results


def _summary(info: dict, timed: dict, tokens_per_step: int) -> dict:
  step_s = statistics.median(timed['times'])
  return {**info, 'times': timed['times'], 'step_s': step_s,
          'tokens_per_s': tokens_per_step / step_s, 'step_s_min': min(timed['times']),
          'step_s_max': max(timed['times']), 'others_cpu_share': max(timed['others_cpu_share'])}


def finish_report(report: dict, path: str, start: float) -> None:
  """Records the load at the end and the wall time since `start`, prints it, writes the report."""
  report['machine']['load_avg_at_end'] = os.getloadavg()
  report['wall_s'] = time.perf_counter() - start
  print(f'wall time {report["wall_s"]:.0f} s')
  write_report(report, path)


def write_report(report: dict, path: str) -> None:
  """Writes a bench's JSON report (creating its folder) and says where."""
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(report, f, indent=1)
  print(f'wrote {path}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='tiny,llama_20m',
                      help='comma-separated names of configs/*.py')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per side and config')
  parser.add_argument('--rounds', type=int, default=5,
                      help='the timed steps alternate between JAX and torch in this many rounds')
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed steps first (the first one compiles)')
  parser.add_argument('--skip_torch', action='store_true', help='time the JAX side only')
  parser.add_argument('--dtype', default='',
                      help="JAX compute dtype; default float32 (PyTorch's), or with --skip_torch "
                      "the config's (usually 'auto')")
  parser.add_argument('--attention', default='', help='override config.model.attention')
  parser.add_argument('--grad_accum_steps', type=int, default=0,
                      help='override config.train.grad_accum_steps on both sides (0: keep)')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results',
                                                    'train_throughput.json'))
  args = parser.parse_args()
  if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
    parser.error('--warmup, --steps and --rounds must be at least 1')
  if not args.skip_torch and args.dtype not in ('', 'float32'):
    parser.error(f'--dtype {args.dtype} against the PyTorch side, which runs float32: the ratio '
                 'would compare dtypes, not frameworks; add --skip_torch')
  if not args.skip_torch:
    args.dtype = 'float32'

  import jax  # pylint: disable=g-import-not-at-top
  from lm import flops  # pylint: disable=g-import-not-at-top
  peaks = _measure_peaks()
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cpu': flops._cpu_model(),  # pylint: disable=protected-access
                  'cores': os.cpu_count(), 'platform': platform.platform(),
                  'jax_backend': jax.default_backend(), 'load_avg_at_start': os.getloadavg()},
      'versions': _versions(),
      'peak_flops': peaks,
      'warmup_steps': args.warmup, 'timed_steps': args.steps,
      'rounds': min(args.rounds, args.steps),
      'results': {},
  }
  rows = []
  for name in args.configs.split(','):
    config = load_config(name, args.grad_accum_steps)
    tokens_per_step = config.train.batch_size * config.data.seq_len
    workers = {'jax': _Worker(jax_setup, name, args.grad_accum_steps, args.dtype, args.attention,
                              args.warmup)}
    if not args.skip_torch:
      workers['torch'] = _Worker(torch_setup, name, args.grad_accum_steps, args.warmup)
    try:
      timed = _measure(workers, args.steps, min(args.rounds, args.steps))
    finally:
      for worker in workers.values():
        worker.close()
    entry = {'batch_size': config.train.batch_size, 'seq_len': config.data.seq_len,
             'grad_accum_steps': config.train.grad_accum_steps,
             'model': config.model.to_dict()}
    j = entry['jax'] = _summary(workers['jax'].info, timed['jax'], tokens_per_step)
    j['peak_flops'] = peaks['used'][j['dtype']]
    j['mfu'] = j['flops_per_token'] * j['tokens_per_s'] / j['peak_flops']
    tr = None
    if 'torch' in workers:
      tr = entry['torch'] = _summary(workers['torch'].info, timed['torch'], tokens_per_step)
      tr['mfu'] = j['flops_per_token'] * tr['tokens_per_s'] / peaks['used']['float32']
      entry['jax_over_torch'] = j['tokens_per_s'] / tr['tokens_per_s']
    report['results'][name] = entry
    rows.append((name, entry, j, tr))

  report['machine']['load_avg_at_end'] = os.getloadavg()
  used, fresh = peaks['used'], peaks['fresh']
  print(f'\n{report["machine"]["cpu"]}, {report["machine"]["cores"]} cores; matmul peak fp32 '
        f'{used["float32"] / 1e9:.0f} GFLOP/s, bf16 {used["bfloat16"] / 1e9:.0f} GFLOP/s (this '
        f'run: {fresh["float32"] / 1e9:.0f} / {fresh["bfloat16"] / 1e9:.0f}); median of '
        f'{args.steps} steps after {args.warmup} warmup')
  header = (f'{"config":<10} {"params":>7} {"BxT":>7} {"dtype":>8} {"attention":>9} '
            f'{"jax ms":>8} {"jax tok/s":>10} {"MFU":>6} {"torch ms":>9} {"torch tok/s":>11} '
            f'{"jax/torch":>9} {"others":>6}')
  print(header)
  print('-' * len(header))
  for name, entry, j, tr in rows:
    others = max(j['others_cpu_share'], tr['others_cpu_share'] if tr else 0.0)
    torch_cols = (f'{tr["step_s"] * 1e3:>9.1f} {tr["tokens_per_s"]:>11,.0f} '
                  f'{entry["jax_over_torch"]:>8.2f}x' if tr else f'{"-":>9} {"-":>11} {"-":>9}')
    print(f'{name:<10} {j["params"] / 1e6:>6.1f}M {entry["batch_size"]:>3}x{entry["seq_len"]:<3} '
          f'{j["dtype"]:>8} {j["attention"]:>9} {j["step_s"] * 1e3:>8.1f} '
          f'{j["tokens_per_s"]:>10,.0f} {j["mfu"]:>6.1%} {torch_cols} {others:>6.0%}')
  print('others: the largest share of the CPUs other processes used while a side was timed; '
        'above ~10%, treat the numbers as disturbed and rerun.')
  write_report(report, args.out)


if __name__ == '__main__':
  main()
