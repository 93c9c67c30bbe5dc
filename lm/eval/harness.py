"""lm checkpoints as an lm-evaluation-harness model: `--model lm --model_args checkpoint=DIR`.

The harness owns tasks, prompts, few-shot sampling and metrics; this adapter only answers its
three request types with lm/eval/scoring.py's Scorer. Tokenization follows TemplateLM: context and
continuation are encoded whole and the continuation is the tail beyond the encoded context, with
BOS in front (an empty context is BOS alone). Model arguments:

  checkpoint=DIR     any lm checkpoint (a training workdir or step, an lm.convert / lm.vocab
                     output; LoRA adapters are merged on load)
  batch_size=N|auto  rows per batch (the harness's --batch_size when not given here)
  max_length=T       tokens the model sees at most (default: the model's max_seq_len)
  dtype=auto|float32|bfloat16   compute dtype of the matmuls
  mesh=DxFxT         data x fsdp x tensor mesh sizes, e.g. 8x1x1 (default: the run's own mesh)
  max_gen_toks=N     generation length when a task does not set one (256)
"""

import copy
import glob
import logging
import os
import sys
import time

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils
import tqdm

from lm import checkpoint as checkpoint_lib
from lm.eval import scoring

_HARNESS_ARGS = ('batch_size', 'max_batch_size', 'device')  # Passed by the harness itself.


@register_model('lm')
class LMEvalModel(TemplateLM):
  """An lm checkpoint answering the harness's loglikelihood, rolling and generation requests."""

  def __init__(self, checkpoint: str | None = None, batch_size='auto', max_length=None,
               dtype: str = 'auto', mesh: str = '', max_gen_toks: int = 256,
               max_batch_size=None, device=None, scorer: scoring.Scorer | None = None, **unknown):
    super().__init__()
    if unknown:
      raise ValueError(f'unknown --model_args for the lm model: {sorted(unknown)}; expected '
                       'checkpoint, batch_size, max_length, dtype, mesh, max_gen_toks')
    del max_batch_size, device  # JAX places the model on its devices; the mesh says how.
    if scorer is None:
      if not checkpoint:
        raise ValueError('the lm model needs --model_args checkpoint=DIR (an lm checkpoint)')
      scorer = scoring.Scorer.load(checkpoint, dtype=dtype, batch_size=batch_size,
                                   max_length=max_length, mesh_config=_mesh_config(mesh))
    self.scorer = scorer
    self.checkpoint = checkpoint
    self._max_gen_toks = int(max_gen_toks)
    self._rank, self._world_size = 0, 1

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    """The harness passes its own batch_size (default 1); one in --model_args wins over it."""
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    from lm_eval import utils  # pylint: disable=g-import-not-at-top
    return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

  # Properties the harness reads.
  @property
  def eot_token_id(self) -> int:
    return self.scorer.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.scorer.tokenizer.bos_id

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  @property
  def tokenizer_name(self) -> str:
    return self.scorer.tokenizer.path.replace('/', '__')

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    raise ValueError(f'--apply_chat_template: the checkpoint {self.checkpoint} has no chat '
                     'template (lm checkpoints carry none yet); evaluate without it')

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
    """SentencePiece ids; BOS in front unless add_special_tokens=False (TemplateLM passes False
    for a continuation scored after an empty context)."""
    ids = self.scorer.tokenizer.encode(string)
    return ids if add_special_tokens is False else [self.prefix_token_id] + ids

  def tok_decode(self, tokens) -> str:
    return self.scorer.tokenizer.decode(tokens)

  # The three request types.
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    results = self.scorer.loglikelihood(
        [(context, continuation) for _, context, continuation in requests],
        description='loglikelihood requests')
    for (key, _, _), result in zip(requests, results):
      self.cache_hook.add_partial('loglikelihood', key, result)
    self.scorer.log_truncation()
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    strings = [request.args[0] for request in requests]
    totals = self.scorer.rolling_loglikelihood(
        [self.tok_encode(s, add_special_tokens=False) for s in strings],
        description='loglikelihood_rolling requests')
    for string, total in zip(strings, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', (string,), total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False):
    """Requests grouped by their generation arguments, each group decoded in batches with the
    KV cache; `until` strings (and EOS) end a completion."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
    outputs = [None] * len(requests)
    for indices in tqdm.tqdm(groups.values(), desc='generate_until groups', leave=False,
                             disable=disable_tqdm or len(groups) == 1):
      kwargs = model_utils.normalize_gen_kwargs(
          copy.deepcopy(requests[indices[0]].args[1]), self._max_gen_toks)
      until = model_utils.handle_stop_sequences(kwargs.pop('until', None), eos=None)
      max_new_tokens = kwargs.pop('max_gen_toks')
      if max_new_tokens >= self.max_length:
        raise ValueError(f'a task asks for max_gen_toks={max_new_tokens} new tokens, but the '
                         f'model sees at most max_length={self.max_length} tokens')
      temperature = float(kwargs.pop('temperature', 0.0) or 0.0)
      temperature = temperature if kwargs.pop('do_sample', False) else 0.0
      texts = self.scorer.generate(
          [self.tok_encode(requests[i].args[0]) for i in indices], max_new_tokens=max_new_tokens,
          until=until, temperature=temperature, top_k=int(kwargs.pop('top_k', 0) or 0),
          top_p=float(kwargs.pop('top_p', 1.0) or 1.0), seed=int(kwargs.pop('seed', 0) or 0),
          description='generate_until requests')
      if kwargs:
        logging.warning('generation arguments lm does not use: %s', sorted(kwargs))
      for i, text in zip(indices, texts):
        outputs[i] = text
        self.cache_hook.add_partial('generate_until', requests[i].args, text)
    self.scorer.log_truncation()
    return outputs


def evaluate(checkpoint: str | None, tasks: list[str], *, include_path: str | None = None,
             model: LMEvalModel | None = None, task_manager=None, log_samples: bool = False,
             **kwargs) -> dict:
  """The harness's results dict for `tasks` (names, including those under include_path) on a
  checkpoint (or an already loaded `model`); kwargs go to lm_eval.simple_evaluate (num_fewshot,
  limit, ...). task_manager: one made by `task_manager(include_path)`, to index tasks once for
  several evaluations (indexing every task the harness knows takes seconds)."""
  import lm_eval  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('DISABLE_MULTIPROC', '1')
  manager = task_manager or make_task_manager(include_path)
  check_tasks(tasks, manager)
  model = model or LMEvalModel(checkpoint)
  return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager,
                                 log_samples=log_samples, **kwargs)


def make_task_manager(include_path: str | None = None):
  """lm-eval's index of its tasks and those under include_path (a folder of task YAMLs)."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  if include_path is not None and not os.path.exists(include_path):
    raise FileNotFoundError(f'include_path {include_path} does not exist (a folder of task YAMLs)')
  return TaskManager(include_path=include_path)


def check_tasks(tasks, manager) -> None:
  """ValueError naming the tasks `manager` does not know."""
  missing = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
  if missing:
    raise ValueError(f'unknown task(s) {missing}: not among the harness\'s tasks nor those under '
                     '--include_path (python -m lm.eval ls tasks lists them)')


def harness_argv(argv: list[str]) -> list[str]:
  """argv with `--model lm` and `--batch_size auto` unless they are given."""
  argv = list(argv)
  flags = {a.split('=')[0] for a in argv}
  if argv and argv[0] in ('run', 'ls', 'validate'):
    command, argv = [argv[0]], argv[1:]
  else:
    command = ['run'] if argv else []
  if command == ['run']:
    if not flags & {'--model', '-M'}:
      argv = ['--model', 'lm'] + argv
    if not flags & {'--batch_size', '-b'}:
      argv += ['--batch_size', 'auto']
  return command + argv


def main(argv: list[str]) -> None:
  """lm-eval's command line (`python -m lm.eval ...`), errors as one line, plus results.md."""
  from lm_eval._cli import HarnessCLI  # pylint: disable=g-import-not-at-top
  from lm_eval.utils import setup_logging  # pylint: disable=g-import-not-at-top
  # The harness's bootstrap forks worker processes, which JAX's threads make unsafe.
  os.environ.setdefault('DISABLE_MULTIPROC', '1')
  argv = harness_argv(argv)
  _check_include_path(argv)
  setup_logging()
  sys.argv = ['python -m lm.eval'] + argv
  parser = HarnessCLI()
  args = parser.parse_args()
  started = time.time()
  try:
    parser.execute(args)
  except (ValueError, FileNotFoundError, checkpoint_lib.CheckpointError) as e:
    sys.exit(f'error: {e}')
  output_path = getattr(args, 'output_path', None)
  if output_path:
    for path in write_tables(output_path, since=started):
      print(f'wrote {path}')


def _check_include_path(argv: list[str]) -> None:
  """A missing --include_path is one line here; the harness would only say the tasks are unknown."""
  if '--include_path' in argv[:-1]:
    path = argv[argv.index('--include_path') + 1]
    if not os.path.exists(path):
      sys.exit(f'error: --include_path {path} does not exist (a folder of task YAML files)')


def write_tables(output_path: str, since: float = 0.0) -> list[str]:
  """results_*.md (the harness's table, markdown) beside each results JSON written since."""
  import json  # pylint: disable=g-import-not-at-top
  from lm_eval.utils import make_table  # pylint: disable=g-import-not-at-top
  written = []
  pattern = os.path.join(output_path, '**', 'results_*.json')
  for path in glob.glob(pattern, recursive=True) + glob.glob(output_path):
    if not path.endswith('.json') or os.path.getmtime(path) < since:
      continue
    with open(path) as f:
      results = json.load(f)
    if 'results' not in results:
      continue
    table = make_table(results) + ('\n' + make_table(results, 'groups')
                                   if results.get('groups') else '')
    out = path[:-len('.json')] + '.md'
    with open(out, 'w') as f:
      f.write(table)
    written.append(out)
  return written


def _mesh_config(mesh: str):
  """'DATAxFSDPxTENSOR' (e.g. '2x4x1'; one may be -1) as a config.mesh; '' keeps the run's."""
  if not mesh:
    return None
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  sizes = str(mesh).split('x')
  if len(sizes) != 3 or not all(s.lstrip('-').isdigit() for s in sizes):
    raise ValueError(f'mesh={mesh!r}: expected DATAxFSDPxTENSOR sizes, e.g. 8x1x1 or 2x2x2')
  config = config_lib.base_config().mesh
  config.data, config.fsdp, config.tensor = map(int, sizes)
  return config
