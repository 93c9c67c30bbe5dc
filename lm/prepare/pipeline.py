"""The passes of lm.prepare, each a datatrove LocalPipelineExecutor, and what they leave in OUT.

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

import glob
import heapq
import json
import os
import time

from absl import logging
from datatrove.executor import LocalPipelineExecutor
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
_RESTART_FIELDS = ('workers',)


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
  if tk.enabled:
    tokenizer = tk.tokenizer or os.path.join(workdir, 'tokenizer', 'spm.model')
    if not tk.tokenizer:
      passes.append(('tokenizer', [tokens.TrainTokenizer(kept, tokenizer, tk)], 1))
    passes.append(('tokens', [tokens.KeptDocuments(kept),
                              tokens.Tokenize(folder, workdir, tokenizer, tk.shard_tokens)], tasks))

  stage_names = [s.name for _, steps, _ in passes for s in steps if isinstance(s, records.Stage)]
  wall = {}
  for name, pipeline, pass_tasks in passes:
    start = time.perf_counter()
    LocalPipelineExecutor(pipeline, tasks=pass_tasks, workers=min(config.workers, pass_tasks),
                          logging_dir=os.path.join(work, 'logs', name)).run()
    wall[name] = time.perf_counter() - start
    logging.info('lm.prepare: pass %s done in %.1f s', name, wall[name])
    if name == 'documents':
      _check_not_empty(folder, inputs)

  manifest = tokens.write_manifest(workdir, folder, os.path.join(work, 'logs', 'tokens'), tasks,
                                   tokenizer) if tk.enabled else None
  decisions = write_decisions(folder, stage_names, os.path.join(workdir, 'decisions.jsonl'))
  summary = report_lib.build(folder, stage_names, inputs=inputs, tasks=tasks,
                             workers=config.workers, wall_seconds=wall, decisions=decisions,
                             dedup_path=os.path.join(removals, 'clusters.json'),
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
