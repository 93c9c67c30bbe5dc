"""The compression table: each way lm shrinks or adapts a trained model, side by side with the
dense fp32 model it starts from, in one run.

  python bench/compression.py [--configs tiny] [--steps 300] [--tune_steps 100]
      [--eval_chars 400000] [--workdir /tmp/lm-compression] [--out bench/results/compression.json]
  python bench/compression.py --smoke   # a minute, 2-layer models: the numbers mean nothing

For each config (configs/NAME.py, fp32) it trains the dense model for --steps, then makes:
  dense +N steps       the control for the rows that fine-tune: --tune_steps more of plain
                       training from the dense model
  int8, int4           lm.quantize: per output channel; groups of 128, 64 or 32 inputs (the
                       largest every weight divides into)
  qat int4             --tune_steps of quantization-aware training from the dense model
                       (config.qat, the same bits and groups), then lm.quantize
  magnitude 50%, 2:4,  lm.prune (Wanda calibrated on 32k tokens of config.data.source)
  wanda 50%
  2:4 + distill        the 2:4 model trained --tune_steps toward the dense one (mode 'distill',
                       config.prune.masks keeping the pattern, alpha 0.5, temperature 2)
  student (half)       d_model and d_ff halved, distilled from the dense model for --steps
  lora r8              --tune_steps of LoRA (rank 8, all projections) from the dense model
  adapter r16          --tune_steps of Houlsby adapters (config.peft.kind='adapter', width 16)
  prompt 16            --tune_steps of prompt tuning (16 soft-prompt tokens; rows 16 shorter)
Each row: parameters trained (by the run that made it) and kept (non-zero, or stored), weight
bytes as loaded for serving (quantized weights stay quantized), its checkpoint directory's bytes
on disk, lm.memory's plan of the training step (for rows that train), training tokens/s, and
scoring tokens/s and held-out bits per byte / token perplexity from lm.eval ppl's code path
(lm.eval.perplexity on a Scorer) over documents of config.data.source past the first
data.max_chars characters, which training never reads. The deltas are against the dense row
(compare the fine-tuned rows with 'dense +N steps', which trained as long).
Writes --out (JSON) and a PNG beside it (bits-per-byte delta and weight bytes per row).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench import train_throughput as tt  # pylint: disable=wrong-import-position

SMOKE_MODEL = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   d_ff=128, max_seq_len=64)
SMOKE = dict(steps=30, tune_steps=10, eval_chars=20_000)


def base_config(name: str, args):
  """configs/NAME.py in fp32 for --steps (the smoke model and data with --smoke)."""
  config = tt.load_config(name)
  config.model.dtype = 'float32'
  if args.smoke:
    config.model.update(SMOKE_MODEL)
    config.data.update(seq_len=64, max_chars=300_000, tokenizer_train_chars=300_000)
    config.train.update(batch_size=8, eval_batches=2)
  config.train.update(steps=args.steps, warmup_steps=min(config.train.warmup_steps,
                                                         args.steps // 10),
                      eval_every=args.steps, checkpoint_every=args.steps, log_every=10)
  return config


def tuned(config, steps: int, **train):
  """config shortened to `steps` of fine-tuning (warmup a tenth)."""
  config = config.copy_and_resolve_references()
  config.train.update(steps=steps, warmup_steps=max(1, steps // 10), eval_every=steps,
                      checkpoint_every=steps, **train)
  return config


def held_out_documents(config, eval_chars: int) -> list[str]:
  """Documents of config.data.source after its first data.max_chars characters."""
  from lm import data as data_lib  # pylint: disable=g-import-not-at-top
  d, seen, out = config.data, 0, []
  for doc in data_lib.iter_documents(d.source, d.text_field, drop_duplicates=True,
                                     where='bench'):
    if seen < d.max_chars:
      seen += len(doc)
      continue  # Training reads these (the one across the boundary too).
    out.append(doc)
    if sum(map(len, out)) >= eval_chars:
      break
  if not out:
    raise SystemExit(f'{d.source} has nothing past data.max_chars={d.max_chars} to hold out')
  return out


def _disk_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory)
             for f in files)


def measure(checkpoint: str, documents: list[str]) -> dict:
  """Weight bytes as served, parameters kept, checkpoint bytes, scoring tokens/s, bpb, ppl."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lm import quantize  # pylint: disable=g-import-not-at-top
  from lm.eval import perplexity, scoring  # pylint: disable=g-import-not-at-top
  scorer = scoring.Scorer.load(checkpoint, dtype='float32', progress=False)
  leaves = jax.tree.leaves(scorer.params)
  floats = quantize.dequantize(scorer.params)
  kept = sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(floats))
  perplexity.perplexity(scorer, documents[:2])  # Compile the shapes.
  start = time.perf_counter()
  result = perplexity.perplexity(scorer, documents)
  seconds = time.perf_counter() - start
  return {'params_kept': kept, 'weight_bytes': quantize.num_bytes(leaves),
          'checkpoint_bytes': _disk_bytes(os.path.join(checkpoint, 'checkpoints')),
          'score_tokens_per_sec': result['tokens'] / seconds,
          'bits_per_byte': result['bits_per_byte'],
          'token_perplexity': result['token_perplexity'], 'eval_tokens': result['tokens']}


def train(config, workdir: str) -> dict:
  """Trains config into workdir (afresh); its parameters trained, tokens/s and memory plan."""
  from lm import memory  # pylint: disable=g-import-not-at-top
  from lm import model as model_lib  # pylint: disable=g-import-not-at-top
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  shutil.rmtree(workdir, ignore_errors=True)
  state, metrics = train_lib.train(config, workdir)
  trained = train_lib.split_trained(state.params, train_lib.setup(config).trained)[0]
  return {'params_trained': model_lib.count_params(trained),
          'train_tokens_per_sec': metrics.get('tokens_per_sec'),
          'train_memory_plan_bytes': memory.estimate(config).total,
          'train_eval_loss': metrics.get('eval_loss')}


def _int4_group(checkpoint: str) -> int:
  """The largest of 128, 64, 32 that every quantized weight's inputs divide into."""
  from lm import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from lm import quantize  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  shapes = checkpoint_lib.params_shapes(checkpoint)
  for group in (128, 64, 32):
    try:
      jax.eval_shape(lambda p, g=group: quantize.quantize(p, 4, g), shapes)
      return group
    except ValueError:
      continue
  return 0


def bench_config(name: str, args) -> dict:
  from lm import prune, quantize  # pylint: disable=g-import-not-at-top
  root = os.path.join(args.workdir, name)
  config = base_config(name, args)
  documents = held_out_documents(config, args.eval_chars)
  rows, made = {}, {}

  def row(label, checkpoint, **extra):
    rows[label] = {**extra, **measure(checkpoint, documents)}
    print(f'  {label:<16} bpb {rows[label]["bits_per_byte"]:.4f}', flush=True)

  dense = os.path.join(root, 'dense')
  made['dense'] = train(config, dense)
  row('dense fp32', dense, **made['dense'])
  control = tuned(config, args.tune_steps)  # The rows below that train get this many more steps.
  control.init_from = dense
  out = os.path.join(root, 'dense_tuned')
  row(f'dense +{args.tune_steps} steps', out, **train(control, out))
  group = _int4_group(dense)
  for label, bits, size in (('int8', 8, 0), (f'int4 g{group}', 4, group)):
    out = os.path.join(root, label.replace(' ', '_'))
    shutil.rmtree(out, ignore_errors=True)
    quantize.quantize_checkpoint(dense, out, bits=bits, group_size=size)
    row(label, out, params_trained=0)
  qat_dir = os.path.join(root, 'qat')
  qat = tuned(config, args.tune_steps)
  qat.init_from = dense
  qat.qat.update(bits=4, group_size=group)
  made['qat'] = train(qat, qat_dir)
  out = os.path.join(root, 'qat_int4')
  shutil.rmtree(out, ignore_errors=True)
  quantize.quantize_checkpoint(qat_dir, out, bits=4, group_size=group)
  row(f'qat int4 g{group}', out, **made['qat'])
  pruned = {}
  for label, method, kwargs in (
      ('magnitude 50%', 'magnitude', dict(sparsity=0.5)), ('2:4', 'nm', dict(n=2, m=4)),
      ('wanda 50%', 'wanda', dict(sparsity=0.5, calibration=config.data.source,
                                  calibration_tokens=32_768))):
    out = pruned[method] = os.path.join(root, method)
    shutil.rmtree(out, ignore_errors=True)
    prune.prune_checkpoint(dense, out, method, **kwargs)
    row(label, out, params_trained=0)
  recovery = tuned(config, args.tune_steps)
  recovery.update(mode='distill', init_from=pruned['nm'])
  recovery.distill.update(teacher=dense, alpha=0.5, temperature=2.0)
  recovery.prune.masks = os.path.join(pruned['nm'], 'masks.npz')
  out = os.path.join(root, 'nm_distilled')
  row('2:4 + distill', out, **train(recovery, out))
  student = config.copy_and_resolve_references()
  student.model.update(d_model=config.model.d_model // 2, d_ff=config.model.d_ff // 2)
  student.mode = 'distill'
  student.distill.update(teacher=dense, alpha=0.5, temperature=2.0)
  out = os.path.join(root, 'student')
  row('student (half)', out, **train(student, out))
  lora = tuned(config, args.tune_steps, trainable='lora')
  lora.init_from = dense
  lora.lora.update(rank=8, targets='all')
  out = os.path.join(root, 'lora')
  row('lora r8', out, **train(lora, out))
  adapter = tuned(config, args.tune_steps, trainable='adapter')
  adapter.init_from = dense
  adapter.peft.update(kind='adapter', adapter_dim=16)
  out = os.path.join(root, 'adapter')
  row('adapter r16', out, **train(adapter, out))
  prompt = tuned(config, args.tune_steps, trainable='prompt')
  prompt.init_from = dense
  prompt.peft.update(kind='prompt', prompt_tokens=16)
  prompt.data.seq_len = config.data.seq_len - 16  # The soft prompt takes 16 of max_seq_len.
  out = os.path.join(root, 'prompt')
  row('prompt 16', out, **train(prompt, out))
  base = rows['dense fp32']
  for values in rows.values():
    values['bits_per_byte_delta'] = values['bits_per_byte'] - base['bits_per_byte']
    values['weight_bytes_ratio'] = values['weight_bytes'] / base['weight_bytes']
  return {'held_out_documents': len(documents), 'rows': rows}


def print_table(name: str, result: dict) -> None:
  print(f'\n{name}: held-out bits per byte over {result["held_out_documents"]} documents')
  print(f'{"method":<18}{"trained":>10}{"kept":>10}{"weights MB":>11}{"ckpt MB":>9}'
        f'{"plan MB":>9}{"train tok/s":>12}{"score tok/s":>12}{"bpb":>8}{"delta":>8}')
  for label, r in result['rows'].items():
    plan = r.get('train_memory_plan_bytes')
    train_tps = r.get('train_tokens_per_sec')
    print(f'{label:<18}{r["params_trained"]:>10,}{r["params_kept"]:>10,}'
          f'{r["weight_bytes"] / 1e6:>11.2f}{r["checkpoint_bytes"] / 1e6:>9.2f}'
          f'{(plan / 1e6 if plan else float("nan")):>9.1f}'
          f'{(train_tps or float("nan")):>12,.0f}{r["score_tokens_per_sec"]:>12,.0f}'
          f'{r["bits_per_byte"]:>8.4f}{r["bits_per_byte_delta"]:>+8.4f}')


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(report['results'])
  fig, axes = plt.subplots(len(names), 2, figsize=(12, 3.6 * len(names)), squeeze=False)
  for (ax_bpb, ax_bytes), name in zip(axes, names):
    rows = report['results'][name]['rows']
    labels = list(rows)
    ax_bpb.barh(labels, [rows[k]['bits_per_byte_delta'] for k in labels], color='tab:red')
    ax_bpb.set_title(f'{name}: held-out bits per byte - dense fp32')
    ax_bpb.axvline(0, color='black', linewidth=0.8)
    ax_bytes.barh(labels, [rows[k]['weight_bytes_ratio'] for k in labels], color='tab:blue')
    ax_bytes.set_title(f'{name}: weight bytes / dense fp32')
    for ax in (ax_bpb, ax_bytes):
      ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='tiny', help='comma-separated configs/NAME.py')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--tune_steps', type=int, default=100)
  parser.add_argument('--eval_chars', type=int, default=400_000)
  parser.add_argument('--workdir', default='/tmp/lm-compression')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results',
                                                    'compression.json'))
  parser.add_argument('--smoke', action='store_true')
  args = parser.parse_args()
  if args.smoke:
    for field, value in SMOKE.items():
      setattr(args, field, value)
  import jax  # pylint: disable=g-import-not-at-top
  report = {'date': datetime.datetime.now().isoformat(timespec='seconds'),
            'machine': platform.processor() or platform.machine(), 'cores': os.cpu_count(),
            'backend': jax.default_backend(), 'smoke': args.smoke, 'steps': args.steps,
            'tune_steps': args.tune_steps, 'results': {}}
  for name in args.configs.split(','):
    print(f'{name}:', flush=True)
    report['results'][name] = bench_config(name, args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=2)
  png = os.path.splitext(args.out)[0] + '.png'
  plot(report, png)
  for name, result in report['results'].items():
    print_table(name, result)
  print(f'\nwrote {args.out} and {png}')


if __name__ == '__main__':
  main()
