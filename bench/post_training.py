"""Post-training step time on CPU: lm's SFT and DPO steps against TRL's SFTTrainer and DPOTrainer.

  pip install -e '.[bench]'   # torch==2.13.0 (CPU wheel), transformers, trl
  python bench/post_training.py [--configs tiny] [--modes sft,dpo] [--batch 0] [--seq_len 0]
      [--steps 10] [--rounds 5] [--warmup 3] [--torch_threads N]
  python bench/post_training.py --smoke   # seconds (tests/test_bench_post_training.py runs it)

Each mode is timed on both sides at one shape: configs/NAME.py's Llama model with
configs/post/MODE.py's batch, seq_len and optimizer settings (--batch, --seq_len override them),
fp32, from the same initial weights (lm's, seeded, exported by lm.convert.lm_to_hf; TRL loads
them with from_pretrained, lm reads the same files with lm.convert.read_params) and on the same
synthetic token ids.

The token layout, identical on both sides: every example is [BOS] + prompt + response + [EOS],
each row's length drawn between seq_len / 2 and seq_len tokens (the first row's exactly seq_len),
its prompt a quarter to a half of it. Rows are unpacked, one example each (lm: post.pack=False,
lm.post.data.PackedRows / lm.post.dpo.PairRows padded to seq_len; TRL: packing and padding-free
off, its collator padding to the batch's longest row, also seq_len), so both sides run seq_len
positions per row through the model and train the same targets, the response and its EOS. A
DPO batch is 2 x batch rows, the chosen then the rejected ones.

lm: train.setup(config) for config.mode 'sft' or 'dpo', its jitted, donated step (forward,
loss, backward, clipping, AdamW) and sharded state, as training builds them. DPO's reference
log-probabilities are precomputed on both sides, so neither step runs the reference: lm by
lm.post.dpo.fill_reference_logps into the PairRows before training, TRL by
precompute_ref_log_probs=True; the initial weights are the reference on both (lm's
config.post.reference is their lm checkpoint).

TRL: SFTTrainer (a prompt/completion dataset, completion_only_loss=True) and DPOTrainer (beta and
loss type from config.post), use_cpu=True, bf16=False, gradient_checkpointing=False (lm does not
remat unless asked; TRL's default would recompute the forward), the same learning rate, AdamW
betas, epsilon, weight decay, clipping norm and warmup, TRL's default optimizer (torch's fused
AdamW) and its fused LM head, torch.set_num_threads(--torch_threads, default the cores
available). Its step is what Trainer's loop does per batch: trainer.training_step (forward,
loss, backward), gradient clipping, optimizer and scheduler step, zero_grad.

Each side runs in its own process (bench/train_throughput.py's _Worker). The two sides of a mode
are set up side by side and warmed up (--warmup steps, the first compiling); then --steps timed
steps per side alternate between them in --rounds rounds, so that load from other processes
falls on both alike. Step times are medians; tokens/s counts every position of the batch (rows
x seq_len, padding included, as lm's training log does); 'others' is the largest share of the
CPUs other processes took while a side was timed. That both sides do the same work is checked,
not assumed: their first steps' losses (before any update) must agree, and for DPO so must the
reference log-probabilities each side precomputed.
"""

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench import train_throughput as tt  # pylint: disable=wrong-import-position

# train_throughput's worker processes, alternating rounds and report parts, private there.
# pylint: disable=protected-access
_Worker, _measure, _summary, _versions = tt._Worker, tt._measure, tt._summary, tt._versions
# pylint: enable=protected-access

MODES = ('sft', 'dpo')
SIDES = ('chosen', 'rejected')
# Special ids as lm's SentencePiece tokenizers number them; 4 and up are ordinary tokens.
BOS, EOS, PAD = 1, 2, 3
SMOKE = dict(batch=4, seq_len=32, steps=2, rounds=1, warmup=1)
PEERS = ('torch', 'transformers', 'trl', 'datasets', 'accelerate')


def post_config(name: str, mode: str, batch: int, seq_len: int, directory: str):
  """configs/post/MODE.py's run on configs/NAME.py's model: unpacked rows, fp32; batch and
  seq_len replace the post config's unless 0. DPO's reference is the initial checkpoint
  directory/lm (save_initial_weights), whose log-probabilities the step reads from the batch."""
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(_ROOT, 'configs', 'post', f'{mode}.py'))
  config.model = tt.load_config(name).model
  config.model.dtype = 'float32'
  config.model_from_init = False
  config.post.pack = False
  if batch:
    config.train.batch_size = batch
  if seq_len:
    config.data.seq_len = seq_len
  if mode == 'dpo':
    config.post.reference = os.path.join(directory, 'lm')
  config_lib.validate(config)
  return config


def synthetic_records(n: int, seq_len: int, vocab_size: int, seed: int) -> list[dict]:
  """n {'prompt', 'chosen', 'rejected'} token-id lists (see the module docstring for lengths);
  SFT trains on prompt and chosen."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    total = [int(rng.integers(seq_len // 2, seq_len + 1)) for _ in SIDES]  # BOS and EOS included.
    if i == 0:
      total[0] = seq_len
    prompt_len = int(rng.integers(min(total) // 4, min(total) // 2 + 1))
    ids = lambda k: rng.integers(EOS + 2, vocab_size, k).tolist()
    records.append({'prompt': ids(prompt_len),
                    **{side: ids(t - 2 - prompt_len) for side, t in zip(SIDES, total)}})
  return records


def lm_example(prompt: list[int], response: list[int]):
  """lm.post.data's layout of one example: [BOS] + prompt + response + [EOS], the response and
  the EOS trained."""
  from lm.post import data as post_data  # pylint: disable=g-import-not-at-top
  tokens = np.asarray([BOS] + prompt + response + [EOS], np.int32)
  return post_data.Example(tokens, np.arange(len(tokens) - 1) >= len(prompt))


def lm_setup(name: str, mode: str, batch: int, seq_len: int, directory: str, warmup: int):
  """lm's jitted, donated step for config.mode=MODE (lm.train.setup) from the initial weights
  in directory/hf, on the synthetic rows, warmed up; with the first step's loss and, for DPO,
  the reference log-probabilities it precomputed."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import convert, model as model_lib, train  # pylint: disable=g-import-not-at-top
  from lm.post import data as post_data, dpo  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_platforms', 'cpu')  # TRL's side is on the CPU too.
  config = post_config(name, mode, batch, seq_len, directory)
  run = train.setup(config)
  t, seq_len = config.train, config.data.seq_len
  hf_files = convert.safetensors_files(os.path.join(directory, 'hf'))
  state = run.init_state(convert.read_params(hf_files, run.cfg))
  records = synthetic_records(t.batch_size, seq_len, run.cfg.vocab_size, t.seed)
  info = {}
  if mode == 'sft':
    rows = post_data.PackedRows([lm_example(r['prompt'], r['chosen']) for r in records], seq_len,
                                pack=False, pad_id=PAD)
  else:
    rows = dpo.PairRows([tuple(lm_example(r['prompt'], r[side]) for side in SIDES)
                         for r in records], seq_len, pad_id=PAD)
    dpo.fill_reference_logps(run, state.params, rows)  # Before a step donates it.
    info['ref_logps'] = [rows.arrays[f'{side}_ref_logp'].sum(-1).tolist() for side in SIDES]
  batch_arrays = jax.device_put(rows.arrays, run.batch_sharding)
  holder = {'state': state}

  def step():
    with run.active():
      holder['state'], metrics = run.step_fn(holder['state'], batch_arrays)
    return jax.block_until_ready(metrics)['loss']

  start = time.perf_counter()
  info['first_loss'] = float(step())
  info['first_step_s'] = time.perf_counter() - start
  for _ in range(warmup - 1):
    step()
  return step, dict(info, dtype=run.cfg.dtype, attention=run.cfg.attention,
                    devices=jax.device_count(), params=model_lib.count_params(state.params))


def peer_tokenizer(vocab_size: int):
  """A word-level HF tokenizer in which text 'tN' is token N and '<s>', '</s>', '<pad>' the
  special ids, so TRL's own text preparation yields exactly the synthetic token ids."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {'<unk>': 0, '<s>': BOS, '</s>': EOS, '<pad>': PAD,
           **{f't{i}': i for i in range(EOS + 2, vocab_size)}}
  model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=model, unk_token='<unk>', bos_token='<s>', eos_token='</s>',
      pad_token='<pad>')


def peer_text(record: dict) -> dict:
  """A synthetic record as TRL's text records: prompt '<s> t.. ' (BOS included, so TRL adds
  none) and responses 't.. </s>' (EOS included, so TRL adds none)."""
  words = lambda ids: ' '.join(f't{i}' for i in ids)
  return {'prompt': f'<s> {words(record["prompt"])} ',
          **{side: f'{words(record[side])} </s>' for side in SIDES}}


def save_initial_weights(config, directory: str) -> None:
  """lm's initial parameters for `config` (model.init_params, seeded by train.seed) as the lm
  checkpoint directory/lm and, exported by lm.convert.lm_to_hf, the HF LlamaForCausalLM
  directory/hf that both sides start from."""
  # pylint: disable-next=g-import-not-at-top
  from lm import checkpoint, convert, model as model_lib, vocab
  checkpoint_dir = os.path.join(directory, 'lm')
  os.makedirs(checkpoint_dir)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  checkpoint.save_params(checkpoint_dir, model_lib.init_params(cfg, config.train.seed))
  vocab.write_checkpoint_config(checkpoint_dir, config)
  convert.lm_to_hf(checkpoint_dir, os.path.join(directory, 'hf'))


def _start(specs: dict) -> dict:
  """{side: _Worker(*spec)}, set up side by side so that one's imports and compilation overlap
  the other's; none left running if one fails."""
  with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
    futures = {side: pool.submit(_Worker, *spec) for side, spec in specs.items()}
  workers, errors = {}, []
  for side, future in futures.items():
    try:
      workers[side] = future.result()
    except RuntimeError as e:  # Its traceback names what failed.
      errors.append(e)
  if errors:
    for worker in workers.values():
      worker.close()
    raise errors[0]
  return workers


def trl_setup(name: str, mode: str, batch: int, seq_len: int, directory: str, threads: int,
              warmup: int):
  """TRL's SFTTrainer or DPOTrainer step (Trainer's loop body) from the initial weights in
  directory/hf, on the synthetic records, warmed up; with the first step's loss and, for DPO,
  the reference log-probabilities it precomputed."""
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  warnings.filterwarnings('ignore', category=FutureWarning)  # transformers' deprecations.
  datasets.disable_progress_bars()
  transformers.utils.logging.disable_progress_bar()
  config = post_config(name, mode, batch, seq_len, directory)
  t, m = config.train, config.model
  model = transformers.LlamaForCausalLM.from_pretrained(
      os.path.join(directory, 'hf'), dtype=torch.float32, attn_implementation='sdpa').train()
  records = [peer_text(r) for r in synthetic_records(t.batch_size, config.data.seq_len,
                                                     m.vocab_size, t.seed)]
  common = dict(
      output_dir=os.path.join(directory, f'trl_{mode}'), use_cpu=True, bf16=False, report_to=[],
      gradient_checkpointing=False, per_device_train_batch_size=t.batch_size,
      max_length=config.data.seq_len, learning_rate=t.learning_rate, adam_beta1=t.b1,
      adam_beta2=t.b2, adam_epsilon=t.eps, weight_decay=t.weight_decay,
      max_grad_norm=max(t.grad_clip, 0.0), warmup_steps=t.warmup_steps,
      lr_scheduler_type='cosine', max_steps=t.steps, save_strategy='no', disable_tqdm=True,
      seed=t.seed)
  info = {}
  if mode == 'sft':
    dataset = datasets.Dataset.from_list(
        [{'prompt': r['prompt'], 'completion': r['chosen']} for r in records])
    trainer = trl.SFTTrainer(
        model=model, processing_class=peer_tokenizer(m.vocab_size), train_dataset=dataset,
        args=trl.SFTConfig(completion_only_loss=True, packing=False, padding_free=False,
                           **common))
  else:
    trainer = trl.DPOTrainer(
        model=model, processing_class=peer_tokenizer(m.vocab_size),
        train_dataset=datasets.Dataset.from_list(records),
        args=trl.DPOConfig(precompute_ref_log_probs=True, beta=config.post.beta,
                           loss_type=[config.post.loss_type], **common))
    info['ref_logps'] = [list(trainer.train_dataset[f'ref_{side}_logps']) for side in SIDES]
  # What Trainer.train does before its loop, on one process.
  trainer.create_optimizer()
  model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
  trainer.create_scheduler(num_training_steps=t.steps, optimizer=trainer.optimizer)
  trainer.current_gradient_accumulation_steps = 1
  inputs = next(iter(trainer.get_train_dataloader()))  # All the records, in one batch.

  def step():
    loss = trainer.training_step(model, inputs)
    if trainer.args.max_grad_norm > 0:
      trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return loss

  start = time.perf_counter()
  info['first_loss'] = float(step())
  info['first_step_s'] = time.perf_counter() - start
  for _ in range(warmup - 1):
    step()
  return step, dict(info, dtype='float32', threads=torch.get_num_threads(),
                    optimizer=str(trainer.args.optim.value),
                    batch_shape=list(inputs['input_ids'].shape),
                    params=sum(p.numel() for p in model.parameters()))


def trained_tokens(records: list[dict], mode: str) -> int:
  """Targets of the loss per step: each trained response and its EOS."""
  sides = SIDES if mode == 'dpo' else SIDES[:1]
  return sum(len(r[side]) + 1 for r in records for side in sides)


def measure(name: str, mode: str, args, directory: str) -> dict:
  """One mode of one config: both sides set up from the initial weights in `directory`, timed
  in alternation, compared."""
  config = post_config(name, mode, args.batch, args.seq_len, directory)
  t, seq_len = config.train, config.data.seq_len
  rows = t.batch_size * (2 if mode == 'dpo' else 1)
  records = synthetic_records(t.batch_size, seq_len, config.model.vocab_size, t.seed)
  shape = (name, mode, args.batch, args.seq_len, directory)
  workers = _start({'lm': (lm_setup, *shape, args.warmup),
                    'trl': (trl_setup, *shape, args.torch_threads, args.warmup)})
  try:
    timed = _measure(workers, args.steps, min(args.rounds, args.steps))
  finally:
    for worker in workers.values():
      worker.close()
  entry = {'batch_size': t.batch_size, 'seq_len': seq_len, 'rows': rows,
           'tokens_per_step': rows * seq_len, 'trained_tokens_per_step': trained_tokens(
               records, mode), 'learning_rate': t.learning_rate, 'model': config.model.to_dict()}
  for side, worker in workers.items():
    entry[side] = _summary(worker.info, timed[side], entry['tokens_per_step'])
  lm, peer = entry['lm'], entry['trl']
  entry['lm_over_trl'] = lm['tokens_per_s'] / peer['tokens_per_s']
  entry['first_loss_abs_diff'] = abs(lm['first_loss'] - peer['first_loss'])
  if mode == 'dpo':
    entry['ref_logp_max_abs_diff'] = float(np.max(np.abs(
        np.asarray(lm.pop('ref_logps')) - np.asarray(peer.pop('ref_logps')))))
  return entry


def _print(results: dict, args) -> None:
  print(f'\nSFT and DPO train steps, lm (JAX) vs TRL (PyTorch), same Llama shape, weights and '
        f'tokens, fp32, CPU; median of {args.steps} steps after {args.warmup} warmup; '
        'tok/s counts rows x seq_len')
  header = (f'{"config":<8} {"mode":<4} {"side":<4} {"rows x T":>9} {"params":>10} '
            f'{"step ms":>8} {"tok/s":>8} {"lm/TRL":>7} {"1st loss":>9} {"others":>6}')
  print(header + '\n' + '-' * len(header))
  for name, modes in results.items():
    for mode, entry in modes.items():
      for side in ('lm', 'trl'):
        r = entry[side]
        ratio = f'{entry["lm_over_trl"]:>6.2f}x' if side == 'lm' else f'{"":>7}'
        print(f'{name:<8} {mode:<4} {side:<4} {entry["rows"]:>4}x{entry["seq_len"]:<4} '
              f'{r["params"]:>10,} {r["step_s"] * 1e3:>8.1f} {r["tokens_per_s"]:>8,.0f} '
              f'{ratio} {r["first_loss"]:>9.5f} {r["others_cpu_share"]:>6.0%}')
      checks = f'first-step losses differ by {entry["first_loss_abs_diff"]:.1e}'
      if 'ref_logp_max_abs_diff' in entry:
        checks += (f', precomputed reference log-probs by at most '
                   f'{entry["ref_logp_max_abs_diff"]:.1e}')
      print(f'{"":<8} {mode:<4} {checks}; {entry["trained_tokens_per_step"]:,} trained tokens '
            f'per step; TRL batch {entry["trl"]["batch_shape"]}, {entry["trl"]["optimizer"]}, '
            f'torch threads: {entry["trl"]["threads"]}')
  print("others: the largest share of the CPUs other processes used while a side was timed; "
        'above ~10%, treat the numbers as disturbed and rerun.')


def _peer_missing() -> str | None:
  missing = [n for n in PEERS if importlib.util.find_spec(n) is None]
  return f'not installed: {", ".join(missing)}' if missing else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='tiny',
                      help='comma-separated configs/*.py whose (Llama) model is timed')
  parser.add_argument('--modes', default='sft,dpo', help=f'comma-separated, of {MODES}')
  parser.add_argument('--batch', type=int, default=0,
                      help='train.batch_size (DPO: pairs); 0: configs/post/MODE.py\'s')
  parser.add_argument('--seq_len', type=int, default=0,
                      help='data.seq_len; 0: configs/post/MODE.py\'s')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per side and mode')
  parser.add_argument('--rounds', type=int, default=5,
                      help='the timed steps alternate between the sides in this many rounds')
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed steps first (the first one compiles)')
  parser.add_argument('--torch_threads', type=int, default=len(os.sched_getaffinity(0)),
                      help='torch.set_num_threads on the TRL side (default: the cores available)')
  parser.add_argument('--smoke', action='store_true',
                      help=f'tiny sizes that finish in seconds: {SMOKE}')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results',
                                                    'post_training.json'))
  args = parser.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  modes = [m for m in args.modes.split(',') if m]
  if not modes or set(modes) - set(MODES):
    parser.error(f'--modes={args.modes!r}: expected a comma-separated subset of {MODES}')
  if min(args.warmup, args.steps, args.rounds, args.torch_threads) < 1 or min(args.batch,
                                                                                args.seq_len) < 0:
    parser.error('--warmup, --steps, --rounds and --torch_threads must be at least 1, --batch '
                 'and --seq_len at least 0')
  if args.seq_len and args.seq_len < 8:
    parser.error(f'--seq_len={args.seq_len}: at least 8 tokens, for a prompt and two responses')
  if why := _peer_missing():
    parser.error(f"the TRL side is {why} (pip install -e '.[bench]')")
  start = time.perf_counter()

  import jax  # pylint: disable=g-import-not-at-top
  from lm import flops  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')  # This process times nothing; the workers do.
  versions = _versions()
  versions.update({n: importlib.metadata.version(n) for n in ('trl', 'datasets', 'accelerate')})
  cpu = flops._cpu_model()  # pylint: disable=protected-access
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cpu': cpu, 'cores': os.cpu_count(),
                  'cores_available': len(os.sched_getaffinity(0)),
                  'platform': platform.platform(), 'load_avg_at_start': os.getloadavg()},
      'versions': versions, 'settings': vars(args), 'results': {},
  }
  for name in [n for n in args.configs.split(',') if n]:
    directory = tempfile.mkdtemp(prefix='bench_post_training_')
    try:
      save_initial_weights(post_config(name, 'sft', args.batch, args.seq_len, directory),
                           directory)
      report['results'][name] = {mode: measure(name, mode, args, directory) for mode in modes}
    finally:
      shutil.rmtree(directory, ignore_errors=True)
  _print(report['results'], args)
  tt.finish_report(report, args.out, start)


if __name__ == '__main__':
  main()
