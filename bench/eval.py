"""lm-eval throughput on this machine: `--model lm` (lm/eval/harness.py) against lm-eval's own HF
backend (`--model hf`, HFLM on PyTorch) on the same model and the same tasks.

  pip install -e '.[bench]'   # torch==2.13.0 (CPU wheel) and transformers; lm-eval comes with lm
  python bench/eval.py [--questions 200] [--prompts 64] [--max_gen_toks 32] [--batch_size 32]
      [--d_model 256] [--layers 4] [--heads 8] [--kv_heads 4] [--d_ff 688] [--vocab 2000]
      [--repeats 3] [--skip_auto] [--workdir DIR]
  python bench/eval.py --smoke   # tiny sizes, seconds (tests/test_bench_eval.py runs it)

Nothing is downloaded. The model is a random LlamaForCausalLM of the given shape (fp32) with a
SentencePiece tokenizer trained on the Python standard library (lm.data source 'stdlib'): saved by
transformers, converted by lm.convert.hf_to_lm for the lm side and exported back by
lm.convert.lm_to_hf for the HF side, so both run the same weights and the same token ids (BOS
first). The byte-fallback pieces' output rows are zero, so greedy decoding emits text, whose
decoding both tokenizers agree on. The tasks are local lm-eval YAMLs over JSONL files written
here, built from standard-library docstrings:

  mc   multiple choice (output_type multiple_choice, acc / acc_norm): --questions contexts of
       1-6 sentences (tens to ~250 tokens), each with 4 candidate next sentences, the true one and
       three from other docstrings: 4 log-likelihood requests per question.
  gen  greedy generation (generate_until, until ["\\n\\n"], --max_gen_toks): --prompts docstring
       openings. A random model seldom stops early, so both sides generate about
       max_gen_toks tokens per request.

Each side runs through the harness's Python API (lm_eval.simple_evaluate with the model instance,
both tasks in one call), in its own process (so the frameworks' thread pools never compete): lm at
--batch_size and at batch_size=auto, HF at --batch_size, fp32 everywhere. A side's seconds for a
task are the time spent in its loglikelihood / generate_until method (the harness's tokenization
and request ordering included, model loading and task building not). Every side runs one first
pass (lm compiles there: first minus steady is its compile time), then --repeats timed passes
that alternate between the sides, so load from other processes falls on all alike; the steady
time is the fastest pass. requests/s = requests / steady seconds; lm/hf is the ratio the
project's goal is stated in (>= 2x for both tasks); tok/s counts the tokens of the completions
returned (re-encoded, so the same for the same text on both sides). Agreement: acc of both sides,
the largest difference between their per-request log-likelihoods, and how many greedy completions
match. Each side's own output (progress bars, warnings) goes to --workdir/KIND_BATCH.log.
"""

import argparse
import datetime
import multiprocessing
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench import train_throughput as tt  # pylint: disable=wrong-import-position

# train_throughput's machine-load and version helpers, private there.
# pylint: disable=protected-access

TASKS = ('bench_eval_mc', 'bench_eval_gen')
REQUEST_TYPES = {'bench_eval_mc': 'loglikelihood', 'bench_eval_gen': 'generate_until'}


# ---------------------------------------------------------------------------------------------
# The model and the tasks.

def build_models(directory: str, args) -> dict:
  """A random HF Llama of args' shape with a stdlib SentencePiece tokenizer, converted to lm
  ('lm') and exported back to HF ('hf'); as tests/eval_fixtures.py builds its tiny one."""
  # pylint: disable=g-import-not-at-top
  import torch
  import transformers
  from lm import convert, data as data_lib, tokenizer as tokenizer_lib
  spm_path = os.path.join(directory, 'spm.model')
  texts = data_lib.iter_documents('stdlib', max_chars=args.tokenizer_chars)
  tokenizer_lib.train_tokenizer(texts, args.vocab, spm_path, max_chars=args.tokenizer_chars,
                                seed=0)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
      intermediate_size=args.d_ff, max_position_embeddings=args.max_seq_len,
      bos_token_id=tokenizer_lib.BOS_ID, eos_token_id=tokenizer_lib.EOS_ID,
      tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  # Weights larger than the 0.02 init (std 1.2 / sqrt(d), tests/eval_fixtures.py's 0.15 at
  # d=64), so log-likelihoods are O(1) per token, differ between choices, and greedy decoding
  # seldom meets near-ties that rounding could flip between the two backends.
  #
  # The byte-fallback pieces' output rows are zero (logit 0, far below the largest of the others),
  # so greedy decoding emits text pieces: on invalid UTF-8 the two tokenizers' decoders differ
  # (SentencePiece writes U+FFFD per bad byte, HF's ByteFallback one per byte token of the run),
  # which would hide whether the two backends chose the same tokens.
  sp = tokenizer_lib.Tokenizer(spm_path)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 1.2 / args.d_model ** 0.5) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    model.lm_head.weight[torch.from_numpy(sp.byte_fallback_mask())] = 0.0
  source = os.path.join(directory, 'hf_source')
  model.save_pretrained(source, safe_serialization=True)
  shutil.copyfile(spm_path, os.path.join(source, 'tokenizer.model'))
  lm_dir, hf_dir = os.path.join(directory, 'lm'), os.path.join(directory, 'hf')
  convert.hf_to_lm(source, lm_dir)
  convert.lm_to_hf(lm_dir, hf_dir)  # tokenizer.model and the config transformers loads it by.
  return {'lm': lm_dir, 'hf': hf_dir, 'tokenizer': spm_path,
          'params': sum(p.numel() for p in model.parameters())}


def docstring_sentences(min_sentences: int = 3) -> list[list[str]]:
  """Standard-library docstrings with at least min_sentences sentences, each a sentence list."""
  from lm import data as data_lib  # pylint: disable=g-import-not-at-top
  found = []
  for document in data_lib.iter_documents('stdlib', max_chars=20_000_000):
    for docstring in re.findall(r'"""(.*?)"""', document, re.S):
      sentences = [s for s in re.split(r'(?<=[.!?])\s+', ' '.join(docstring.split()))
                   if 20 <= len(s) <= 400]
      if len(sentences) >= min_sentences:
        found.append(sentences)
  return found


def make_rows(encode, questions: int, prompts: int, context_tokens: int, choice_tokens: int,
              seed: int = 0) -> tuple[list, list]:
  """(multiple-choice rows, generation rows) from stdlib docstrings. A question's context (no
  two alike) is a docstring's first 1-6 sentences, cut to at most context_tokens tokens (`encode`:
  text to ids) by dropping whole sentences from its front; the true next sentence is among 4
  choices of at most choice_tokens tokens, the others from other docstrings. A generation prompt
  is a docstring's first 1-3 sentences (at most context_tokens), its target the next one."""
  rng = random.Random(seed)
  docstrings = [[s for s in d if len(encode(s)) <= choice_tokens] for d in docstring_sentences()]
  docstrings = list({tuple(d): d for d in docstrings if len(d) >= 3}.values())
  if len(docstrings) < 4:
    raise ValueError(f'found {len(docstrings)} distinct standard-library docstrings of 3+ '
                     f'sentences of at most {choice_tokens} tokens; the task needs at least 4')

  def opening(sentences, most):
    k = rng.randint(1, min(most, len(sentences) - 1))
    start = 0
    while start < k - 1 and len(encode(' '.join(sentences[start:k]))) > context_tokens:
      start += 1
    return ' '.join(sentences[start:k]), sentences[k]

  mc, seen = [], set()
  for q in range(questions * 4):  # Distinct contexts (the stdlib repeats some docstrings).
    if len(mc) == questions:
      break
    sentences = docstrings[q % len(docstrings)]
    context, answer = opening(sentences, 6)
    if context in seen:
      continue
    seen.add(context)
    others = rng.sample([d for d in docstrings if d is not sentences], 3)
    choices = [answer] + [rng.choice(d) for d in others]
    order = list(range(4))
    rng.shuffle(order)
    mc.append(dict(context=context, choices=[choices[i] for i in order], answer=order.index(0)))
  if len(mc) < questions:
    raise ValueError(f'--questions={questions}: the standard library gave {len(mc)} distinct '
                     'contexts')
  gen = []
  for p in range(prompts):
    prompt, target = opening(docstrings[(7 * p + 3) % len(docstrings)], 3)
    gen.append(dict(prompt=prompt, target=' ' + target))
  return mc, gen


def write_tasks(directory: str, mc_rows: list, gen_rows: list, max_gen_toks: int) -> None:
  """The two tasks (TASKS) as lm-eval YAMLs over JSONL files in `directory`."""
  import json  # pylint: disable=g-import-not-at-top
  import yaml  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)

  def task(name, rows, **fields):
    data = os.path.join(directory, f'{name}.jsonl')
    with open(data, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
    spec = dict(task=name, dataset_path='json', dataset_kwargs=dict(data_files=dict(test=data)),
                test_split='test', **fields)
    with open(os.path.join(directory, f'{name}.yaml'), 'w') as f:
      yaml.safe_dump(spec, f)

  task(TASKS[0], mc_rows, output_type='multiple_choice', doc_to_text='{{context}}',
       doc_to_choice='{{choices}}', doc_to_target='{{answer}}',
       metric_list=[dict(metric='acc'), dict(metric='acc_norm')])
  task(TASKS[1], gen_rows, output_type='generate_until', doc_to_text='{{prompt}}',
       doc_to_target='{{target}}', target_delimiter='',
       generation_kwargs=dict(until=['\n\n'], max_gen_toks=max_gen_toks, do_sample=False),
       metric_list=[dict(metric='exact_match')])


# ---------------------------------------------------------------------------------------------
# One backend in its own process.

def _load_backend(kind: str, checkpoint: str, batch_size):
  if kind == 'lm':
    from lm.eval.harness import LMEvalModel  # pylint: disable=g-import-not-at-top
    return LMEvalModel(checkpoint=checkpoint, batch_size=batch_size, dtype='float32')
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top
  return HFLM(pretrained=checkpoint, device='cpu', batch_size=batch_size, dtype='float32')


def _timed(method, seconds: dict, name: str):
  """method, adding its wall time to seconds[name] on each call."""
  def call(*args, **kwargs):
    start = time.perf_counter()
    try:
      return method(*args, **kwargs)
    finally:
      seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
  return call


def _outputs(results: dict) -> dict:
  """Per task: its metrics and, per document in doc_id order, the responses (log-likelihoods of
  the choices, or the generated text)."""
  out = {}
  for task in TASKS:
    samples = sorted(results['samples'][task], key=lambda s: s['doc_id'])
    if REQUEST_TYPES[task] == 'loglikelihood':
      responses = [[float(r[0][0]) for r in s['resps']] for s in samples]
    else:
      responses = [s['resps'][0][0] for s in samples]
    metrics = {k.split(',')[0]: v for k, v in results['results'][task].items()
               if isinstance(v, (int, float)) and not k.endswith('_stderr,none')}
    out[task] = {'metrics': metrics, 'responses': responses}
  return out


def _evaluate(model, task_manager) -> dict:
  """One simple_evaluate pass over TASKS: the seconds in each request method and the outputs."""
  import lm_eval  # pylint: disable=g-import-not-at-top
  seconds = {}
  originals = {}
  names = ['loglikelihood', 'generate_until', '_loglikelihood_tokens']
  for name in names:
    originals[name] = getattr(model, name)
    setattr(model, name, _timed(originals[name], seconds, name))
  start = time.perf_counter()
  try:
    results = lm_eval.simple_evaluate(
        model=model, tasks=list(TASKS), task_manager=task_manager,
        log_samples=True, bootstrap_iters=0, verbosity='ERROR')
  finally:
    for name in names:
      setattr(model, name, originals[name])
  return {'seconds': seconds, 'evaluate_s': time.perf_counter() - start, **_outputs(results)}


def _serve(conn, kind: str, batch_size, log: str) -> None:
  """Worker process: imports the harness at once, loads the backend when the main process sends
  (checkpoint, include_path), then runs one evaluation pass per request. Its output (the
  harness's progress bars and warnings) goes to the file `log`."""
  os.environ.update(HF_DATASETS_OFFLINE='1', DISABLE_MULTIPROC='1',
                    TRANSFORMERS_VERBOSITY='error', TOKENIZERS_PARALLELISM='false')
  with open(log, 'w') as f:
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
  try:
    from lm_eval import evaluator  # pylint: disable=g-import-not-at-top
    from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
    if kind == 'lm':
      import lm.eval.harness  # pylint: disable=g-import-not-at-top,unused-import
    else:
      import lm_eval.models.huggingface  # pylint: disable=g-import-not-at-top,unused-import
    # The environment report simple_evaluate adds (pip list and more, ~1 s a pass, untimed).
    evaluator.add_env_info = lambda results: None
    checkpoint, include_path = conn.recv()
    start = time.perf_counter()
    model = _load_backend(kind, checkpoint, batch_size)
    info = {'load_s': time.perf_counter() - start}
    # Our tasks only: indexing the harness's own thousands of YAMLs takes ~10 s.
    task_manager = TaskManager(include_path=include_path, include_defaults=False)
    if kind == 'hf':
      import torch  # pylint: disable=g-import-not-at-top
      info['torch_threads'] = torch.get_num_threads()
    conn.send(info)
    while conn.recv():
      busy, own, wall = tt._machine_busy_s(), time.process_time(), time.perf_counter()
      result = _evaluate(model, task_manager)
      wall = time.perf_counter() - wall
      others = tt._machine_busy_s() - busy - (time.process_time() - own)
      result['others_cpu_share'] = max(others, 0.0) / (wall * os.cpu_count())
      conn.send(result)
  except Exception:  # pylint: disable=broad-except
    conn.send(RuntimeError(f'{kind} backend (batch_size={batch_size}) failed (its output: {log}):'
                           f'\n{traceback.format_exc()}'))


class _Backend:
  """An lm-eval model in its own process, which starts importing the harness at once; load()
  hands it the model, evaluate() runs one pass over the tasks there."""

  def __init__(self, kind: str, batch_size, log: str):
    context = multiprocessing.get_context('spawn')
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_serve, args=(child, kind, batch_size, log),
                                    daemon=True)
    self._process.start()
    self._info = None

  def load(self, checkpoint: str, include_path: str) -> None:
    self._conn.send((checkpoint, include_path))

  @property
  def info(self) -> dict:
    if self._info is None:
      self._info = self._receive()
    return self._info

  def _receive(self):
    message = self._conn.recv()
    if isinstance(message, Exception):
      raise message
    return message

  def evaluate(self) -> dict:
    self.info  # pylint: disable=pointless-statement
    self._conn.send(True)
    return self._receive()

  def close(self) -> None:
    if self._process.is_alive():
      try:
        self._conn.send(False)
      except OSError:
        pass
      self._process.join(timeout=60)
    if self._process.is_alive():
      self._process.kill()


# ---------------------------------------------------------------------------------------------
# The report.

def _side_summary(first: dict, passes: list[dict], requests: dict, generated_tokens) -> dict:
  """Per task: first-pass and steady (fastest timed pass) seconds and requests/s."""
  summary = {'others_cpu_share': max(p['others_cpu_share'] for p in passes),
             'first_others_cpu_share': first['others_cpu_share'],
             'evaluate_s': min(p['evaluate_s'] for p in passes)}
  for task, method in REQUEST_TYPES.items():
    steady = min(p['seconds'][method] for p in passes)
    entry = {'requests': requests[task], 'first_s': first['seconds'][method], 'steady_s': steady,
             'pass_s': [p['seconds'][method] for p in passes],
             'requests_per_s': requests[task] / steady,
             'compile_s': max(first['seconds'][method] - steady, 0.0)}
    if method == 'loglikelihood':
      tokenized = min(p['seconds'][method] - p['seconds']['_loglikelihood_tokens'] for p in passes)
      entry['tokenization_s'] = tokenized  # TemplateLM encoding the (context, continuation)s.
    else:
      entry['generated_tokens'] = generated_tokens(first[task]['responses'])
      entry['tokens_per_s'] = entry['generated_tokens'] / steady
    summary[task] = entry
  return summary


def _agreement(lm: dict, hf: dict) -> dict:
  """How close lm's answers are to HF's: log-likelihoods, accuracies, greedy completions."""
  mc, gen = TASKS
  lm_ll = [x for doc in lm[mc]['responses'] for x in doc]
  hf_ll = [x for doc in hf[mc]['responses'] for x in doc]
  same_pick = sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
                  for a, b in zip(lm[mc]['responses'], hf[mc]['responses']))
  lm_text, hf_text = lm[gen]['responses'], hf[gen]['responses']

  def common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

  return {
      'acc_lm': lm[mc]['metrics'].get('acc'), 'acc_hf': hf[mc]['metrics'].get('acc'),
      'acc_norm_lm': lm[mc]['metrics'].get('acc_norm'),
      'acc_norm_hf': hf[mc]['metrics'].get('acc_norm'),
      'max_abs_loglikelihood_diff': max(abs(a - b) for a, b in zip(lm_ll, hf_ll)),
      'mean_abs_loglikelihood': sum(map(abs, hf_ll)) / len(hf_ll),
      'same_choice': same_pick / len(lm[mc]['responses']),
      'identical_generations': sum(a == b for a, b in zip(lm_text, hf_text)) / len(lm_text),
      'common_prefix_chars': sum(common_prefix(a, b) for a, b in zip(lm_text, hf_text))
                             / max(1, sum(max(len(a), len(b)) for a, b in zip(lm_text, hf_text))),
  }


def _print_report(report: dict) -> None:
  m, r = report['model'], report['results']
  print(f'\n{m["params"] / 1e6:.1f}M-parameter Llama (d_model {m["d_model"]}, {m["layers"]} '
        f'layers, {m["heads"]}/{m["kv_heads"]} heads, d_ff {m["d_ff"]}, vocab {m["vocab"]}, '
        f'max_seq_len {m["max_seq_len"]}), fp32, {report["machine"]["cores"]} cores; steady = '
        f'fastest of {report["repeats"]} passes after a first one')
  header = (f'{"backend":<14} {"task":<5} {"requests":>8} {"first s":>8} {"steady s":>9} '
            f'{"req/s":>8} {"tok/s":>7} {"lm/hf":>6} {"others":>6}')
  print(header)
  print('-' * len(header))
  for side, summary in r.items():
    for task in TASKS:
      e = summary[task]
      ratio = report['ratios'].get(side, {}).get(task)
      tokens = f'{e["tokens_per_s"]:>7,.0f}' if 'tokens_per_s' in e else f'{"-":>7}'
      print(f'{side:<14} {task.split("_")[-1]:<5} {e["requests"]:>8} {e["first_s"]:>8.2f} '
            f'{e["steady_s"]:>9.2f} {e["requests_per_s"]:>8.1f} {tokens} '
            f'{f"{ratio:.2f}x" if ratio else "-":>6} {summary["others_cpu_share"]:>6.0%}')
  print('lm/hf: requests/s against the HF backend at the same task. first: the first pass (lm '
        'compiles there). others: the most of the CPUs other processes took in a timed pass; above '
        '~10%, rerun.')
  a = report['agreement']
  print(f'agreement: acc lm {a["acc_lm"]:.3f} / hf {a["acc_hf"]:.3f}, acc_norm lm '
        f'{a["acc_norm_lm"]:.3f} / hf {a["acc_norm_hf"]:.3f}; max |log-likelihood diff| '
        f'{a["max_abs_loglikelihood_diff"]:.2e} (mean |log-likelihood| '
        f'{a["mean_abs_loglikelihood"]:.1f}); same choice {a["same_choice"]:.1%}; identical '
        f'greedy completions {a["identical_generations"]:.1%} (common prefix '
        f'{a["common_prefix_chars"]:.1%} of characters)')


SMOKE = dict(questions=8, prompts=4, max_gen_toks=8, batch_size=4, d_model=64, layers=2, heads=4,
             kv_heads=2, d_ff=96, vocab=400, max_seq_len=128, context_tokens=40,
             choice_tokens=20, tokenizer_chars=100_000, repeats=1, skip_auto=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--questions', type=int, default=200, help='multiple-choice questions (x4 '
                      'log-likelihood requests)')
  parser.add_argument('--prompts', type=int, default=64, help='generation requests')
  parser.add_argument('--max_gen_toks', type=int, default=32, help='tokens generated at most')
  parser.add_argument('--batch_size', type=int, default=32, help='rows per batch, both backends')
  parser.add_argument('--skip_auto', action='store_true', help="skip lm at batch_size='auto'")
  parser.add_argument('--d_model', type=int, default=256)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--kv_heads', type=int, default=4)
  parser.add_argument('--d_ff', type=int, default=688)
  parser.add_argument('--vocab', type=int, default=2000, help='SentencePiece pieces = model rows')
  parser.add_argument('--max_seq_len', type=int, default=512)
  parser.add_argument('--context_tokens', type=int, default=240,
                      help='longest multiple-choice context / generation prompt, in tokens')
  parser.add_argument('--choice_tokens', type=int, default=48,
                      help='longest multiple-choice choice, in tokens')
  parser.add_argument('--tokenizer_chars', type=int, default=1_000_000,
                      help='stdlib characters the tokenizer is trained on')
  parser.add_argument('--repeats', type=int, default=3,
                      help='timed passes per backend after the first')
  parser.add_argument('--smoke', action='store_true',
                      help=f'tiny sizes that finish in seconds: {SMOKE}')
  parser.add_argument('--workdir', default=None, help='keep the model and tasks here '
                      '(default: a temporary folder, removed at the end)')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results', 'eval.json'))
  args = parser.parse_args(argv)
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  if args.repeats < 1 or args.questions < 1 or args.prompts < 1 or args.batch_size < 1:
    parser.error('--repeats, --questions, --prompts and --batch_size must be at least 1')
  if args.max_gen_toks >= args.max_seq_len:
    parser.error(f'--max_gen_toks={args.max_gen_toks} must be below --max_seq_len')

  directory = args.workdir or tempfile.mkdtemp(prefix='bench_eval_')
  os.makedirs(directory, exist_ok=True)
  started = time.perf_counter()
  sides = {f'lm b={args.batch_size}': ('lm', args.batch_size), 'lm b=auto': ('lm', 'auto'),
           f'hf b={args.batch_size}': ('hf', args.batch_size)}
  if args.skip_auto:
    del sides['lm b=auto']
  backends, first, passes = {}, {}, {name: [] for name in sides}
  try:
    for name, (kind, batch_size) in sides.items():  # They import while the model is built.
      log = os.path.join(directory, f'{kind}_{batch_size}.log')
      backends[name] = _Backend(kind, batch_size, log)
    models = build_models(os.path.join(directory, 'model'), args)
    from lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    sp = tokenizer_lib.Tokenizer(models['tokenizer'])
    mc_rows, gen_rows = make_rows(sp.encode, args.questions, args.prompts, args.context_tokens,
                                  args.choice_tokens)
    include_path = os.path.join(directory, 'tasks')
    write_tasks(include_path, mc_rows, gen_rows, args.max_gen_toks)
    setup_s = time.perf_counter() - started
    for name, (kind, _) in sides.items():  # And load at once,
      backends[name].load(models[kind], include_path)
    for name in sides:  # but all have loaded before any runs.
      backends[name].info  # pylint: disable=pointless-statement
    for name in sides:
      first[name] = backends[name].evaluate()
    for r in range(args.repeats):
      for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
        passes[name].append(backends[name].evaluate())
  finally:
    for backend in backends.values():
      backend.close()
  requests = {TASKS[0]: sum(len(r['choices']) for r in mc_rows), TASKS[1]: len(gen_rows)}

  def generated_tokens(texts):  # Re-encoded: the same count for the same text on both sides.
    return sum(len(sp.encode(t)) for t in texts)

  results = {name: {**backends[name].info,
                    **_side_summary(first[name], passes[name], requests, generated_tokens)}
             for name in sides}
  hf_name = f'hf b={args.batch_size}'
  ratios = {name: {task: results[name][task]['requests_per_s']
                   / results[hf_name][task]['requests_per_s'] for task in TASKS}
            for name in sides if name != hf_name}
  import jax  # pylint: disable=g-import-not-at-top
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cores': os.cpu_count(), 'platform': platform.platform(),
                  'jax_backend': jax.default_backend(), 'load_avg_at_end': os.getloadavg()},
      'versions': {**tt._versions(), 'lm_eval': _version('lm_eval')},
      'lm_source': _source_state(),
      'model': {k: getattr(args, k) for k in ('d_model', 'layers', 'heads', 'kv_heads', 'd_ff',
                                               'vocab', 'max_seq_len')} | {
                                                   'params': models['params']},
      'tasks': {'questions': args.questions, 'choices': 4, 'prompts': args.prompts,
                'max_gen_toks': args.max_gen_toks},
      'batch_size': args.batch_size, 'repeats': args.repeats, 'setup_s': setup_s,
      'results': results, 'ratios': ratios,
      'agreement': _agreement(first[f'lm b={args.batch_size}'], first[hf_name]),
      'wall_s': time.perf_counter() - started,
  }
  _print_report(report)
  tt.write_report(report, args.out)
  if not args.workdir:
    shutil.rmtree(directory, ignore_errors=True)
  return report


def _source_state() -> dict:
  """The commit this checkout is at, and which files under lm/ differ from it (the numbers
  belong to the code as it was)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  def git(*argv):
    try:
      return subprocess.run(['git', *argv], cwd=_ROOT, capture_output=True, text=True,
                            timeout=30).stdout.rstrip('\n')
    except (OSError, subprocess.SubprocessError):
      return ''

  return {'commit': git('rev-parse', 'HEAD').strip(),
          'changed': [line[3:] for line in git('status', '--porcelain', 'lm').splitlines()]}


def _version(name: str):
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return importlib.metadata.version(name.replace('_', '-'))
  except importlib.metadata.PackageNotFoundError:
    return None


if __name__ == '__main__':
  main()
