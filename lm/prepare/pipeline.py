"""The passes of lm.prepare, each run by a datatrove executor (config.executor), and what they
leave in OUT.

  documents   read -> language -> gopher_quality -> gopher_repetition -> c4_quality
              [-> c4_bad_words] -> pii, kept documents to WORK/documents/RANK.jsonl
  signatures, buckets, clusters   (lm/prepare/dedup.py) who duplicates whom
  final       exact_dedup -> near_dedup [-> decontamination], to OUT/documents/LANGUAGE/RANK.jsonl
  [tokenizer] (lm/prepare/tokens.py) a SentencePiece model trained on the kept documents
  tokens      tokenize, to OUT/tokens/LANGUAGE/RANK-PART.array_record (lm/prepare/shards.py)

datatrove marks each task of each pass completed (WORK/logs/PASS/completions) and skips it when
the command runs again, and every file a task writes appears whole when the task ends, so a
killed run started again with the same --workdir finishes without repeating or losing output.
OUT/decisions.jsonl, OUT/tokens/manifest.json and OUT/report.json are then rebuilt from all
tasks' records.
"""

import contextlib
import functools
import glob
import heapq
import json
import os
import time

from absl import logging
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
import ml_collections

from lm import files
from lm import sources
from lm.prepare import config as config_lib
from lm.prepare import dedup
from lm.prepare import read
from lm.prepare import records
from lm.prepare import report as report_lib
from lm.prepare import stages
from lm.prepare import tokens

# Fields that may change between a killed run and its restart.
_RESTART_FIELDS = ('workers', 'executor', 'ray', 'slurm')


def prepare(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every pass not yet completed in `workdir`; returns the report (also OUT/report.json)."""
  config_lib.validate(config)
  inputs = config_lib.parse_inputs(config)
  read.check_readable(inputs)
  tk = config.tokenize
  if tk.enabled and tk.tokenizer:
    tokens.check_tokenizer(tk.tokenizer)
  tasks = config.tasks or config.workers
  work = os.path.join(workdir, 'work')
  _check_restart(config, work, tasks)
  folder = os.path.join(work, 'records')
  documents = os.path.join(work, 'documents')
  languages = tuple(config_lib.languages(config)) if config.language.enabled else (
      stages.UNKNOWN,)

  per_document = [read.SourceReader(inputs, config.text_field, config.id_field, folder)]
  if config.language.enabled:
    per_document.append(stages.Language(folder, config.language))
  per_document += stages.quality_stages(folder, config)
  if config.pii.enabled:
    per_document.append(stages.PII(folder, config.pii))
  passes = [('documents', per_document + [records.DocumentWriter(documents)], tasks)]

  dd = config.dedup
  removals = os.path.join(work, 'dedup', 'removals')
  final = [records.DocumentReader(documents)]
  if dd.exact or dd.near:
    index, signatures = (os.path.join(work, 'dedup', name) for name in ('index', 'signatures'))
    buckets = os.path.join(work, 'dedup', 'buckets') if dd.near else None
    signature = dedup.minhash_signature(dd, signatures) if dd.near else None
    passes.append(('signatures', [records.DocumentReader(documents),
                                  dedup.Signatures(index, signature, dd.exact)], tasks))
    if dd.near:
      from datatrove.pipeline.dedup import minhash  # pylint: disable=g-import-not-at-top
      passes.append(('buckets', [minhash.MinhashDedupBuckets(
          signatures, buckets, config=dedup.minhash_config(dd))], dd.bands))
    passes.append(('clusters', [dedup.Clusters(index=index, buckets=buckets, documents=documents,
                                               removals=removals, tasks=tasks, cfg=dd)], 1))
    final += [stages.Removals(folder, name, removals)
              for name, on in (('exact_dedup', dd.exact), ('near_dedup', dd.near)) if on]
  if config.decontamination.source:
    final.append(stages.Decontamination(folder, config.decontamination))
  kept = os.path.join(workdir, 'documents')
  final.append(records.DocumentWriter(kept, by_language=True, languages=languages))
  passes.append(('final', final, tasks))
  tokenizer = None
  if tk.enabled:
    tokenizer = tk.tokenizer or os.path.join(workdir, 'tokenizer', 'spm.model')
    if not tk.tokenizer:
      passes.append(('tokenizer', [tokens.TrainTokenizer(kept, tokenizer, tk)], 1))
    passes.append(('tokens', [tokens.KeptDocuments(kept),
                              tokens.Tokenize(folder, workdir, tokenizer, tk.shard_tokens)], tasks))

  stage_names = [s.name for _, steps, _ in passes for s in steps if isinstance(s, records.Stage)]
  finish = functools.partial(
      _finish, workdir=workdir, stage_names=stage_names, inputs=inputs, tasks=tasks,
      workers=config.workers, tokenizer=tokenizer)
  if config.executor == 'slurm':
    return _submit(passes, config, work, finish)
  wall = {}
  with _cluster(config):
    for name, pipeline, pass_tasks in passes:
      start = time.perf_counter()
      executor(config, name, pipeline, pass_tasks, os.path.join(work, 'logs', name)).run()
      _check_completed(name, pass_tasks, os.path.join(work, 'logs', name))
      wall[name] = time.perf_counter() - start
      logging.info('lm.prepare: pass %s done in %.1f s', name, wall[name])
      if name == 'documents':
        _check_not_empty(folder, inputs)
  return finish(wall_seconds=wall)


def executor(config: ml_collections.ConfigDict, name: str, pipeline: list, tasks: int,
             logging_dir: str, depends=None):
  """datatrove's executor of config.executor for one pass of `tasks` tasks."""
  workers = min(config.workers, tasks)
  if config.executor == 'local':
    return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir)
  if config.executor == 'ray':
    from datatrove.executor import RayPipelineExecutor  # pylint: disable=g-import-not-at-top
    return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                               cpus_per_task=config.ray.cpus_per_task,
                               mem_per_cpu_gb=config.ray.mem_per_cpu_gb)
  from datatrove.executor import SlurmPipelineExecutor  # pylint: disable=g-import-not-at-top
  s = config.slurm
  return SlurmPipelineExecutor(
      pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, depends=depends,
      time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
      mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos, job_name=f'{s.job_name}-{name}',
      env_command=s.env_command or None, sbatch_args=config_lib.sbatch_args(s.sbatch_args),
      with_srun=s.srun)


@contextlib.contextmanager
def _cluster(config: ml_collections.ConfigDict):
  """For executor='ray': joins config.ray.address, or starts a Ray instance here (stopped
  after), unless Ray is already initialised."""
  if config.executor != 'ray':
    yield
    return
  import ray  # pylint: disable=g-import-not-at-top
  if ray.is_initialized():
    yield
    return
  if config.ray.address:
    ray.init(address=config.ray.address, log_to_driver=False)
  else:
    ray.init(num_cpus=config.workers * config.ray.cpus_per_task, include_dashboard=False,
             log_to_driver=False)
  try:
    yield
  finally:
    ray.shutdown()


def _check_completed(name: str, tasks: int, logging_dir: str) -> None:
  """Raises RuntimeError when a pass ended with tasks not completed (a cluster executor reports
  failed tasks in its logs rather than raising)."""
  done = os.path.join(logging_dir, 'completions')
  missing = [r for r in range(tasks) if not os.path.exists(os.path.join(done, f'{r:05d}'))]
  if missing:
    raise RuntimeError(
        f'lm.prepare: pass {name} ended with {len(missing)} of {tasks} tasks not completed '
        f'(ranks {missing[:10]}); their logs are in {logging_dir}/logs. Run the same command '
        'again to retry them')


def _submit(passes: list, config: ml_collections.ConfigDict, work: str, finish) -> dict:
  """executor='slurm': one job array per pass, each after the one before, and a last one-task
  job that writes the report. Returns {'submitted': {pass: job id}}."""
  passes = passes + [('report', [_Finish(finish)], 1)]
  last, jobs = None, {}
  for name, pipeline, pass_tasks in passes:
    last = executor(config, name, pipeline, pass_tasks, os.path.join(work, 'logs', name),
                    depends=last)
    last.launch_job()
    jobs[name] = last.job_id
  logging.info('lm.prepare: submitted %s; %s appears when the last job ends', jobs,
               os.path.join(os.path.dirname(work), 'report.json'))
  return {'submitted': jobs}


class _Finish(PipelineStep):
  """The report job of a Slurm run: `finish` once every pass has completed."""
  name = 'report'
  type = 'lm.prepare'

  def __init__(self, finish):
    super().__init__()
    self.finish = finish

  def run(self, data, rank: int = 0, world_size: int = 1):
    del data, rank, world_size
    self.finish(wall_seconds={})
    return iter(())


def _finish(*, workdir: str, stage_names: list[str], inputs, tasks: int, workers: int,
            tokenizer: str | None, wall_seconds: dict) -> dict:
  """OUT/tokens/manifest.json, OUT/decisions.jsonl, OUT/report.json and report.png, from every
  task's records; returns the report."""
  work = os.path.join(workdir, 'work')
  folder = os.path.join(work, 'records')
  _check_not_empty(folder, inputs)
  manifest = tokens.write_manifest(workdir, folder, os.path.join(work, 'logs', 'tokens'), tasks,
                                   tokenizer) if tokenizer else None
  decisions = write_decisions(folder, stage_names, os.path.join(workdir, 'decisions.jsonl'))
  summary = report_lib.build(folder, stage_names, inputs=inputs, tasks=tasks,
                             workers=workers, wall_seconds=wall_seconds, decisions=decisions,
                             dedup_path=os.path.join(work, 'dedup', 'removals', 'clusters.json'),
                             manifest=manifest)
  files.write_atomically(os.path.join(workdir, 'report.json'),
                         lambda f: json.dump(summary, f, indent=1, ensure_ascii=False),
                         encoding='utf-8')
  report_lib.plot(summary, os.path.join(workdir, 'report.png'))
  return summary


def _check_restart(config: ml_collections.ConfigDict, work: str, tasks: int) -> None:
  """Saves the config in a new WORK; in an old one, requires the config it was started with."""
  path = os.path.join(work, 'config.json')
  saved = dict(config.to_dict(), tasks=tasks)
  for field in _RESTART_FIELDS:
    saved.pop(field)
  if not os.path.exists(path):
    files.write_atomically(path, lambda f: json.dump(saved, f, indent=1, ensure_ascii=False),
                           encoding='utf-8')
    return
  with open(path, encoding='utf-8') as f:
    before = json.load(f)
  if before != saved:
    changed = sorted(_differences(before, saved))
    raise config_lib.ConfigError(
        f'{os.path.dirname(work)} holds a run started with another config (fields {changed} '
        'differ, config.tasks counted as the tasks it ran with); restart it with that config, or '
        'choose a new --workdir')


def _differences(a: dict, b: dict, prefix: str = '') -> set[str]:
  out = set()
  for key in set(a) | set(b):
    if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
      out |= _differences(a[key], b[key], f'{prefix}{key}.')
    elif a.get(key) != b.get(key):
      out.add(prefix + key)
  return out


def _check_not_empty(folder: str, inputs: list[tuple[str, str]]) -> None:
  totals = report_lib.stage_totals(folder, 'read')
  if totals['documents_out'] == 0:
    raise sources.DataError(
        f'the input {", ".join(f"{n}={s!r}" for n, s in inputs)} holds no text: '
        f'{totals["documents_in"]} documents, all empty')


def write_decisions(folder: str, stage_names: list[str], path: str) -> dict[str, int]:
  """OUT/decisions.jsonl: for every input document in input order, {id, kept, stage, reason},
  stage and reason those of the stage that removed it (null when kept). Returns counts."""
  removed = {}  # order -> (stage, reason)
  for stage in stage_names:
    for drops in sorted(glob.glob(os.path.join(folder, stage, '?????.jsonl'))):
      with open(drops, encoding='utf-8') as f:
        for line in f:
          r = json.loads(line)
          removed.setdefault(tuple(r['order']), (stage, r['reason']))

  def ids(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        order, doc_id = json.loads(line)
        yield tuple(order), doc_id

  streams = [ids(p) for p in sorted(glob.glob(os.path.join(folder, 'read', '?????.ids.jsonl')))]
  counts = dict(documents=0, kept=0)

  def write(f):
    for order, doc_id in heapq.merge(*streams):
      stage, reason = removed.get(order, (None, None))
      counts['documents'] += 1
      counts['kept'] += stage is None
      f.write(json.dumps(dict(id=doc_id, kept=stage is None, stage=stage, reason=reason),
                         ensure_ascii=False) + '\n')

  files.write_atomically(path, write, encoding='utf-8')
  return counts
