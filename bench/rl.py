"""RL step time, phase by phase: lm's PPO and GRPO steps (mode='ppo', 'grpo') split into rollout,
scoring and update.

  python bench/rl.py [--config tiny] [--runs ppo,ppo_rm,grpo] [--batch 16] [--slots 16]
      [--group_size 4] [--max_new_tokens 32] [--seq_len 128] [--steps 8] [--warmup 2]
  python bench/rl.py --smoke   # seconds (tests/test_bench_rl.py runs it)

Each run is built as lm.train.train builds it: configs/post/MODE.py (PPO: 4 update epochs x 2
minibatches, kl_coef 0.05; GRPO: 1 x 1, kl_coef 0.04) with init_from a checkpoint of
configs/NAME.py's model shape (random, seeded weights; max_seq_len raised to data.seq_len + 1,
which a rollout needs) and a SentencePiece tokenizer trained on the standard library's source
with that config's vocab_size. train.setup(config) gives the run, train.make_data(run, workdir)
its Rollouts; each step is the loop body of train(): next(data.train_iter), data.rollout(state,
batch), then run.step_fn on the global batch, all inside run.active(), blocked until the new
state is ready. Completions are sampled (temperature 1) from --prompts, scored by
--reward_function; 'ppo_rm' is PPO scored by a reward model instead (post.reward_model, a
checkpoint of the same shape with config.model.reward_head=True, random weights). A random
policy rarely samples EOS, so nearly every completion runs to max_new_tokens: the
completion-length worst case, the same work in every step.

The phases of a step, which add up to it:
  rollout  generation with lm.engine (rollout metrics' time_rollout): continuous batching over
           post.rollout_slots rows, prefill and decode;
  scoring  the policy's log-probabilities (and values, PPO), the reference's, and the score
           (reward model or function), on the devices and back (time_scoring);
  other    the rest on the host: the prompt batch, advantages (PPO's GAE), the KL controller;
  update   the jitted, donated optimizer step(s) of run.step_fn: update_epochs x minibatches
           updates per step, with the batch's transfer to the devices.
Times are medians over --steps timed steps after --warmup untimed ones; the first step, which
compiles (JAX's caches are cleared before each run), is reported apart. Before the warmup steps every lm.engine prefill bucket (prompt
lengths rounded up to its block size) is compiled, so a new prompt length cannot put a
compilation into a timed step; the compilations that still ran during the timed steps are
counted. Shares are each phase's median over the sum of the medians. Rollout tokens/s counts
the tokens generated (completion tokens, EOS included) per rollout second, prefill included;
decode slot use is the share of the engine's decode slot-steps whose tokens were kept.

There is no peer here: TRL's PPOTrainer and GRPOTrainer generate with transformers' generate or
vLLM, so on CPU their rollout would time a different generator, not the same work, and
bench/post_training.py already compares lm's optimizer steps with TRL's.
"""

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench import train_throughput as tt  # pylint: disable=wrong-import-position

# train_throughput's machine-load and version probes, private there.
_machine_busy_s, _versions = tt._machine_busy_s, tt._versions  # pylint: disable=protected-access

RUNS = ('ppo', 'ppo_rm', 'grpo')
PHASES = ('rollout', 'scoring', 'other', 'update')
# A model small enough that the three runs compile and time in seconds.
SMOKE_MODEL = dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64)
SMOKE = dict(batch=8, slots=8, group_size=4, max_new_tokens=8, seq_len=32, steps=2, warmup=1,
             max_examples=64, tokenizer_chars=200_000)
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def model_config(args):
  """configs/NAME.py with its model's max_seq_len raised to fit a rollout (data.seq_len + 1),
  fp32, data.tokenizer unset (the checkpoint's own tokenizer.model is found instead)."""
  config = tt.load_config(args.config)
  if args.smoke:
    config.model.update(SMOKE_MODEL)
  config.model.max_seq_len = max(config.model.max_seq_len, args.seq_len + 1)
  config.model.dtype = 'float32'
  config.data.seq_len = args.seq_len
  config.data.tokenizer = ''
  return config


def save_checkpoints(config, directory: str, tokenizer_chars: int) -> tuple[str, str]:
  """(policy, reward model): checkpoints of config's shape, seeded init_params, each with its
  config.json and tokenizer.model (one SentencePiece model of config.model.vocab_size pieces,
  trained on tokenizer_chars characters of the standard library's source); the reward model's
  config has model.reward_head=True."""
  # pylint: disable-next=g-import-not-at-top
  from lm import checkpoint, data as data_lib, model as model_lib, tokenizer as tokenizer_lib
  from lm import vocab  # pylint: disable=g-import-not-at-top
  spm = os.path.join(directory, 'spm.model')
  texts = data_lib.iter_documents('stdlib', max_chars=tokenizer_chars)
  tokenizer_lib.train_tokenizer(texts, config.model.vocab_size, spm, max_chars=tokenizer_chars,
                                seed=config.train.seed)
  paths = []
  for name, reward_head in (('policy', False), ('reward_model', True)):
    path = os.path.join(directory, name)
    saved = config.copy_and_resolve_references()
    saved.model.reward_head = reward_head
    cfg = model_lib.ModelConfig.from_config(saved, 'float32')
    checkpoint.save_params(path, model_lib.init_params(cfg, config.train.seed + reward_head))
    vocab.write_checkpoint_config(path, saved)
    shutil.copyfile(spm, os.path.join(path, 'tokenizer.model'))
    paths.append(path)
  return tuple(paths)


def rl_config(name: str, policy: str, reward_model: str, args):
  """configs/post/MODE.py's run from the policy checkpoint at the benchmark's shape."""
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  mode = name.split('_')[0]
  config = config_lib.load_config(os.path.join(_ROOT, 'configs', 'post', f'{mode}.py'))
  config.init_from = policy
  config.model_from_init = True
  config.model.dtype = 'float32'
  config.data.seq_len = args.seq_len
  config.train.batch_size = args.batch
  config.post.update(data=args.prompts, max_new_tokens=args.max_new_tokens,
                     max_examples=args.max_examples, reward_function=args.reward_function,
                     rollout_slots=args.slots,
                     group_size=args.group_size if mode == 'grpo' else 1)
  if name == 'ppo_rm':
    config.post.update(reward_model=reward_model, reward_function='')
  config_lib.validate(config)
  return config


def warm_prefill(run, data, params) -> int:
  """Compiles lm.engine's prefill for every prompt length bucket a rollout can meet (prompts
  are at most data.seq_len + 1 - max_new_tokens tokens); returns how many buckets."""
  from lm import engine as engine_lib  # pylint: disable=g-import-not-at-top
  engine, post = data.train_iter.engine, run.config.post
  longest = run.config.data.seq_len + 1 - post.max_new_tokens
  lengths = [min(k * engine.block_size, longest)
             for k in range(1, -(-longest // engine.block_size) + 1)]
  engine.params = params
  with run.active():
    engine.run([engine_lib.Request(prompt=[data.tokenizer.bos_id] * n, max_new_tokens=1)
                for n in lengths])
  return len(lengths)


def measure(name: str, policy: str, reward_model: str, args) -> dict:
  """One run's first step, then its phase times over args.steps steps after args.warmup."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import checkpoint, model as model_lib, train  # pylint: disable=g-import-not-at-top

  jax.clear_caches()  # Each run's first step compiles all it needs, as a fresh process would.
  config = rl_config(name, policy, reward_model, args)
  run = train.setup(config)
  data = train.make_data(run, workdir='/unused')  # Rollouts write nothing.
  abstract = run.abstract_state()
  state = run.init_state(checkpoint.restore_params(
      config.init_from, train.init_from_target(config.init_from, abstract.params)))
  params = model_lib.count_params(state.params)
  holder = {'state': state}
  B = config.train.batch_size

  def step() -> dict:
    with run.active():
      start = time.perf_counter()
      local_batch = next(data.train_iter)
      rows, metrics = data.rollout(holder['state'], local_batch)
      rolled = time.perf_counter()
      batch = jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(run.batch_sharding, x), rows)
      holder['state'], step_metrics = run.step_fn(holder['state'], batch)
      jax.block_until_ready((holder['state'], step_metrics))
      end = time.perf_counter()
    engine = data.train_iter.engine
    tokens = metrics['completion_tokens'] * B
    return {'rollout': metrics['time_rollout'], 'scoring': metrics['time_scoring'],
            'other': rolled - start - metrics['time_rollout'] - metrics['time_scoring'],
            'update': end - rolled, 'step': end - start, 'generated_tokens': tokens,
            'decode_slot_use': (tokens - B) / (engine.stats['decode_steps'] * engine.slots),
            'stopped': metrics['stopped'], 'loss': float(step_metrics['loss'])}

  first = step()
  buckets = warm_prefill(run, data, holder['state'].params)
  for _ in range(args.warmup):
    step()
  compiles = []

  def count(event, duration, **_):
    del duration
    if event == COMPILE_EVENT:
      compiles.append(event)

  busy, own, wall = _machine_busy_s(), time.process_time(), time.perf_counter()
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    timed = [step() for _ in range(args.steps)]
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  wall = time.perf_counter() - wall
  others = _machine_busy_s() - busy - (time.process_time() - own)

  median = lambda key: float(np.median([s[key] for s in timed]))
  phases = {p: median(p) for p in PHASES}
  epochs, minibatches = train.updates_per_step(run.config)
  post = run.config.post
  return {
      'mode': run.config.mode,
      'reward': 'reward model' if post.reward_model else post.reward_function,
      'params': params, 'batch_size': B, 'group_size': post.group_size,
      'prompts_per_step': B // post.group_size, 'max_new_tokens': post.max_new_tokens,
      'seq_len': run.config.data.seq_len, 'rollout_slots': post.rollout_slots,
      'update_epochs': epochs, 'minibatches': minibatches, 'updates_per_step': epochs * minibatches,
      'rows_per_update': B // minibatches, 'prefill_buckets_warmed': buckets,
      'first_step_s': first['step'], 'first_step': {p: first[p] for p in PHASES},
      'phase_ms': {p: 1e3 * v for p, v in phases.items()},
      'phase_share': {p: v / sum(phases.values()) for p, v in phases.items()},
      'step_ms': 1e3 * median('step'),
      'ms_per_update': 1e3 * phases['update'] / (epochs * minibatches),
      'generated_tokens_per_step': median('generated_tokens'),
      'rollout_tokens_per_s': float(np.median([s['generated_tokens'] / s['rollout']
                                               for s in timed])),
      'decode_slot_use': median('decode_slot_use'), 'stopped': median('stopped'),
      'compiles_during_timing': len(compiles),
      'others_cpu_share': max(others, 0.0) / (wall * os.cpu_count()),
      'times': {k: [s[k] for s in timed] for k in PHASES + ('step',)},
      'losses': [s['loss'] for s in timed],
  }


def _print(report: dict, args) -> None:
  results, m = report['results'], report['model']
  any_result = next(iter(results.values()))
  print(f'\n{args.config}{" (smoke)" if args.smoke else ""}: d_model {m["d_model"]}, '
        f'{m["num_layers"]} layers, vocab {m["vocab_size"]} ({any_result["params"]:,} params, '
        f'fp32); {args.batch} completions per step (GRPO: '
        f'{args.batch // args.group_size} prompts x {args.group_size}), {args.max_new_tokens} new '
        f'tokens, seq_len {args.seq_len}, prompts {args.prompts}; median of {args.steps} steps '
        f'after {args.warmup} warmup; {report["machine"]["jax_backend"]}, '
        f'{report["machine"]["cores_available"]} cores')
  header = (f'{"run":<7} {"updates":>7} {"rollout":>8} {"scoring":>8} {"other":>6} '
            f'{"update":>8} {"step ms":>8} {"shares r/s/o/u %":>17} {"gen tok/s":>9} '
            f'{"ms/upd":>7} {"1st s":>6} {"others":>6}')
  print(header + '\n' + '-' * len(header))
  for name, r in results.items():
    ms, share = r['phase_ms'], r['phase_share']
    shares = '/'.join(f'{100 * share[p]:.0f}' for p in PHASES)
    updates = f'{r["update_epochs"]}x{r["minibatches"]}'
    print(f'{name:<7} {updates:>7} {ms["rollout"]:>8.1f} {ms["scoring"]:>8.1f} {ms["other"]:>6.1f} '
          f'{ms["update"]:>8.1f} {r["step_ms"]:>8.1f} {shares:>17} '
          f'{r["rollout_tokens_per_s"]:>9,.0f} {r["ms_per_update"]:>7.1f} '
          f'{r["first_step_s"]:>6.1f} {r["others_cpu_share"]:>6.0%}')
  for name, r in results.items():
    print(f'{name:<7} reward: {r["reward"]}; {r["generated_tokens_per_step"]:.0f} tokens generated '
          f'per step ({r["stopped"]:.0%} stopped at EOS), decode slot use '
          f'{r["decode_slot_use"]:.0%} of {r["rollout_slots"]} slots; {r["updates_per_step"]} '
          f'update(s) of {r["rows_per_update"]} rows; {r["compiles_during_timing"]} compilations '
          'while timed')
  print('times in ms per step; gen tok/s: tokens generated per rollout second; ms/upd: update ms '
        'per optimizer update; 1st s: the first step, compiling; others: the share of the CPUs '
        'other processes took while timed (above ~10%, rerun).')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='tiny', help='model shape: configs/NAME.py')
  parser.add_argument('--runs', default=','.join(RUNS),
                      help=f'comma-separated, of {RUNS} (ppo_rm: PPO scored by a reward model)')
  parser.add_argument('--batch', type=int, default=16, help='train.batch_size: completions/step')
  parser.add_argument('--slots', type=int, default=16,
                      help='post.rollout_slots: lm.engine decode rows')
  parser.add_argument('--group_size', type=int, default=4, help="GRPO's completions per prompt")
  parser.add_argument('--max_new_tokens', type=int, default=32, help='post.max_new_tokens')
  parser.add_argument('--seq_len', type=int, default=128, help='data.seq_len')
  parser.add_argument('--prompts', default='stdlib:functions', help='post.data')
  parser.add_argument('--reward_function', default='lm.post.rewards:keyword_density',
                      help='post.reward_function of the runs without a reward model')
  parser.add_argument('--max_examples', type=int, default=2000, help='post.max_examples')
  parser.add_argument('--tokenizer_chars', type=int, default=1_000_000,
                      help='characters of the standard library the tokenizer trains on')
  parser.add_argument('--steps', type=int, default=8, help='timed steps per run')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps after the first (compiling) one')
  parser.add_argument('--smoke', action='store_true',
                      help=f'tiny sizes that finish in seconds: {SMOKE}, model {SMOKE_MODEL}')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results', 'rl.json'))
  args = parser.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  runs = [r for r in args.runs.split(',') if r]
  if not runs or set(runs) - set(RUNS):
    parser.error(f'--runs={args.runs!r}: expected a comma-separated subset of {RUNS}')
  if min(args.steps, args.batch, args.slots, args.max_new_tokens) < 1 or args.warmup < 0:
    parser.error('--steps, --batch, --slots and --max_new_tokens must be at least 1, --warmup '
                 'at least 0')
  if args.group_size < 2 or args.batch % args.group_size:
    parser.error(f'--group_size={args.group_size}: at least 2, dividing --batch={args.batch}')
  if args.max_new_tokens >= args.seq_len:
    parser.error(f'--max_new_tokens={args.max_new_tokens} leaves no prompt in --seq_len='
                 f'{args.seq_len}')
  start = time.perf_counter()

  import jax  # pylint: disable=g-import-not-at-top
  from lm import flops  # pylint: disable=g-import-not-at-top
  config = model_config(args)
  cpu = flops._cpu_model()  # pylint: disable=protected-access
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cpu': cpu, 'cores': os.cpu_count(),
                  'cores_available': len(os.sched_getaffinity(0)),
                  'platform': platform.platform(), 'jax_backend': jax.default_backend(),
                  'devices': [str(d) for d in jax.devices()],
                  'load_avg_at_start': os.getloadavg()},
      'versions': _versions(),
      'settings': vars(args), 'model': config.model.to_dict(), 'results': {},
  }
  directory = tempfile.mkdtemp(prefix='bench_rl_')
  try:
    setup_start = time.perf_counter()
    policy, reward_model = save_checkpoints(config, directory, args.tokenizer_chars)
    report['checkpoints_s'] = time.perf_counter() - setup_start
    for name in runs:
      report['results'][name] = measure(name, policy, reward_model, args)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  _print(report, args)
  tt.finish_report(report, args.out, start)


if __name__ == '__main__':
  main()
