"""The config of `python -m lm.prepare`: every field, its default and meaning, and its checks.

configs/prepare/*.py start from `base_config()`; `--config.quality.gopher.min_doc_words=20`
overrides any field. The defaults suit Hindi and English web text.
"""

import importlib.util
import re

import ml_collections

from lm import sources
from lm.prepare import words


class ConfigError(ValueError):
  """A config field holds a value lm.prepare cannot run with; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # ---------------------------------------------------------------------------------------------
  # Input: one source, in the spelling of config.data.source ('text:GLOB' one document per file,
  # 'jsonl:GLOB' one per line, 'tfds:NAME[:SPLIT]', 'stdlib'), or several named ones.
  config.source = ''
  # Several sources instead of config.source: 'NAME=SOURCE; NAME=SOURCE', e.g.
  # 'web_hi=jsonl:/data/hi/*.jsonl; web_en=jsonl:/data/en/*.jsonl'. Names label the report.
  config.inputs = ''
  config.text_field = 'text'  # Field holding the text in jsonl records and TFDS examples.
  # Field holding a document's id. A document without one gets its location as id
  # ('PATH:LINE', a text file's path, 'tfds:NAME example I'), counted in the report.
  config.id_field = 'id'

  # ---------------------------------------------------------------------------------------------
  # Engine: datatrove's pipeline executors. 'local': worker processes on this machine; 'ray':
  # Ray tasks on the cluster at config.ray.address (or a Ray instance started here); 'slurm':
  # one job array per pass, each depending on the one before, submitted with sbatch (the command
  # returns once they are queued; OUT/report.json appears when the last job ends). On a
  # cluster, --workdir must be a filesystem that every node shares.
  config.executor = 'local'
  config.workers = 1  # Tasks running at once (local: processes; ray, slurm: tasks or jobs).
  # Shards of the input, each a task that datatrove runs, records as completed and skips when
  # a killed run is started again. 0: one per worker. Outputs do not depend on it.
  config.tasks = 0
  config.ray = ray = ml_collections.ConfigDict()
  ray.address = ''  # A running cluster ('auto', 'ray://HOST:10001'); empty: start one here.
  ray.cpus_per_task = 1
  ray.mem_per_cpu_gb = 2.0
  config.slurm = slurm = ml_collections.ConfigDict()
  slurm.partition = ''  # Required for executor='slurm'.
  slurm.time = '24:00:00'  # Each job's time limit.
  slurm.cpus_per_task = 1
  slurm.mem_per_cpu_gb = 2
  slurm.qos = 'normal'
  slurm.job_name = 'lm-prepare'  # Each pass's jobs are named JOB_NAME-PASS.
  # Run in each job before the task, e.g. 'source /path/to/venv/bin/activate'.
  slurm.env_command = ''
  # More #SBATCH directives, 'KEY=VALUE; KEY=VALUE' (e.g. 'account=myproject; constraint=cpu').
  slurm.sbatch_args = ''
  slurm.srun = True  # Start each task under srun inside its job (datatrove's default).

  # ---------------------------------------------------------------------------------------------
  # 1. Language identification with py3langid (its model ships in the package).
  config.language = lang = ml_collections.ConfigDict()
  lang.enabled = True
  # Languages kept (ISO 639-1, comma-separated); each gets its own output folder and stop words.
  lang.keep = 'en,hi'
  # Least probability of the top language (normalised over py3langid's 140 languages) to keep.
  lang.min_score = 0.5
  lang.sample_chars = 4000  # Characters from a document's start that decide its language.

  # ---------------------------------------------------------------------------------------------
  # 2. Heuristic quality filters: datatrove's Gopher and C4 filters, with lm.prepare.words'
  # Devanagari-aware words and sentences and per-language stop words. A threshold of 0 turns
  # its rule off.
  config.quality = q = ml_collections.ConfigDict()
  q.gopher = g = ml_collections.ConfigDict()
  g.enabled = True
  g.min_doc_words = 50  # Fewer words (punctuation marks not counted): dropped.
  g.max_doc_words = 100_000  # More words: dropped.
  g.min_avg_word_length = 3  # Mean characters per word below this: dropped.
  g.max_avg_word_length = 10  # Or above this.
  g.max_symbol_word_ratio = 0.1  # '#' per word, or ellipses ('...', '…') per word, above this.
  g.max_bullet_lines_ratio = 0.9  # Share of lines starting with a bullet ('•', '-') above this.
  g.max_ellipsis_lines_ratio = 0.3  # Share of lines ending with an ellipsis above this.
  g.min_alpha_words_ratio = 0.8  # Share of words with a letter below this.
  g.min_stop_words = 2  # Distinct stop words of the document's language, at least.
  # Stop words per language, comma-separated (a language without a list uses all lists' words).
  g.stop_words = ml_collections.ConfigDict(
      {language: ','.join(stop_words) for language, stop_words in words.STOP_WORDS.items()})
  q.repetition = r = ml_collections.ConfigDict()
  r.enabled = True
  r.dup_line_frac = 0.3  # Share of lines that repeat an earlier line, above this: dropped.
  r.dup_para_frac = 0.3  # Share of paragraphs (split at blank lines) that repeat one.
  r.dup_line_char_frac = 0.2  # Share of characters in repeated lines.
  r.dup_para_char_frac = 0.2  # Share of characters in repeated paragraphs.
  # 'N:FRACTION,...': the most frequent word N-gram covers more than FRACTION of the characters
  # ('': off).
  r.top_n_grams = '2:0.2,3:0.18,4:0.16'
  # 'N:FRACTION,...': repeated word N-grams cover more than FRACTION of the characters.
  r.dup_n_grams = '5:0.15,6:0.14,7:0.13,8:0.12,9:0.11,10:0.1'
  q.c4 = c4 = ml_collections.ConfigDict()
  c4.enabled = True
  # Line rules: a line is removed from the document (not the document dropped) when it ...
  c4.terminal_punctuation = True  # ... does not end in . ? ! " ' । or ॥ (or ends in '...');
  c4.min_words_per_line = 3  # ... has fewer words (-1: off);
  c4.max_word_length = 1000  # ... has a longer word (-1: off);
  c4.javascript = True  # ... mentions javascript;
  c4.policy = True  # ... mentions terms of use, privacy or cookie policies.
  c4.remove_citations = True  # Remove Wikipedia-style citation marks ('[1]', '[edit]').
  # Document rules: dropped when, after the line rules, fewer sentences remain (-1: off), ...
  c4.min_num_sentences = 5
  c4.lorem_ipsum = True  # ... or a kept line holds 'lorem ipsum', ...
  c4.curly_bracket = True  # ... or a kept line holds '{' (code rather than prose).
  # A file of bad words, one per line (e.g. a list of LDNOOBW's); a document holding one of them
  # as a whole word is dropped. Empty: no bad-word rule (nothing is downloaded).
  c4.bad_words_file = ''

  # ---------------------------------------------------------------------------------------------
  # 3. PII scrubbing: matches are replaced with the placeholders, and counted.
  config.pii = pii = ml_collections.ConfigDict()
  pii.enabled = True
  pii.emails = True
  pii.phones = True  # 10 to 15 digits: '+91 98765 43210', '(555) 123-4567', '555-123-4567'.
  pii.ips = True  # IPv4 addresses.
  pii.only_public_ips = True  # Leave private, loopback and reserved addresses (10.0.0.1, ...).
  # FineWeb (datatrove's PIIFormatter) writes plausible example addresses instead of tags.
  pii.email_placeholder = '<EMAIL>'
  pii.phone_placeholder = '<PHONE>'
  pii.ip_placeholder = '<IP>'

  # ---------------------------------------------------------------------------------------------
  # 4. Deduplication, keeping the first document (in input order) of each group.
  config.dedup = dd = ml_collections.ConfigDict()
  # Exact: documents whose words (lm.eval.contamination.normalize_words: NFKC, case-folded,
  # punctuation removed) are the same.
  dd.exact = True
  # Near: MinHash signatures and LSH buckets (datatrove's), candidate pairs confirmed by the exact
  # Jaccard similarity of their word n-gram sets; groups are the connected pairs.
  dd.near = True
  dd.ngram_size = 5  # Words per shingle.
  dd.bands = 20  # LSH bands; permutations = bands * rows.
  dd.rows = 5  # Hashes per band: a pair of Jaccard s is a candidate with 1 - (1 - s^rows)^bands.
  dd.threshold = 0.8  # Least Jaccard similarity of a near-duplicate pair.
  dd.seed = 1  # Of the MinHash permutations.

  # ---------------------------------------------------------------------------------------------
  # 5. Decontamination: documents sharing a word n-gram with evaluation data (the definition of
  # `python -m lm.eval contamination`).
  config.decontamination = dc = ml_collections.ConfigDict()
  # Evaluation documents, as a source ('jsonl:tasks/*.jsonl', 'text:...'). Empty: stage off.
  dc.source = ''
  dc.text_field = 'text'  # Field holding the text in its jsonl records.
  dc.n = 13  # Words per n-gram (13, as GPT-3 and lm-eval).
  dc.action = 'drop'  # 'drop' the document, or 'flag' it (kept, counted, marked in metadata).

  # ---------------------------------------------------------------------------------------------
  # 6. Tokenization: the kept documents as token ids in ArrayRecord shards that training reads
  # directly, with config.data.source='prepared:OUT' (lm/prepare/shards.py describes them):
  # OUT/tokens/LANGUAGE/TASK-PART.array_record, one record per document (its token ids, id and
  # language), and OUT/tokens/manifest.json (the tokenizer and its SHA-256, counts, checksums).
  config.tokenize = tk = ml_collections.ConfigDict()
  tk.enabled = True
  # The SentencePiece .model file to tokenize with; training must tokenize with the same one (its
  # data.tokenizer, or data.tokenizer empty to take the shards' own). Empty: train one on the kept
  # documents as training trains one on its corpus when data.tokenizer is empty (Llama-2's
  # recipe, lm.tokenizer.train_tokenizer), into OUT/tokenizer/spm.model.
  tk.tokenizer = ''
  # Pieces of that trained tokenizer. A model trained on the shards needs model.vocab_size equal to
  # it or to it rounded up to a multiple of 128; 8192 is model.vocab_size's default.
  tk.vocab_size = 8192
  tk.train_chars = 20_000_000  # Characters sampled from the kept documents to train it (0: all).
  tk.seed = 0  # Seeds that sample.
  # A task starts another shard of a language once a shard holds this many tokens (0: one shard
  # per task and language).
  tk.shard_tokens = 100_000_000
  return config


def parse_inputs(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """[(name, source)] of config.source or config.inputs; reads no files."""
  if bool(config.source) == bool(config.inputs):
    raise ConfigError('set exactly one of config.source (one source, e.g. '
                      "'jsonl:/data/web/*.jsonl') and config.inputs ('NAME=SOURCE; ...'); got "
                      f'source={config.source!r}, inputs={config.inputs!r}')
  if config.source:
    sources.check_source(config.source, f'config.source={config.source!r}')
    return [('input', config.source)]
  inputs = []
  for entry in (e.strip() for e in config.inputs.split(';')):
    if not entry:
      continue
    name, equals, source = (part.strip() for part in entry.partition('='))
    if not equals or not re.fullmatch(r'[A-Za-z0-9_]+', name) or name in dict(inputs):
      raise ConfigError(f'config.inputs={config.inputs!r}: entry {entry!r} is not NAME=SOURCE '
                        'with a new name of letters, digits and _')
    sources.check_source(source, f'config.inputs entry {entry!r} has source={source!r}, which')
    inputs.append((name, source))
  if not inputs:
    raise ConfigError(f'config.inputs={config.inputs!r} holds no entries')
  return inputs


def n_gram_fractions(text: str, field: str) -> tuple[tuple[int, float], ...]:
  """'2:0.2,3:0.18' -> ((2, 0.2), (3, 0.18)); '' -> () (the rule off)."""
  try:
    pairs = tuple((int(n), float(f)) for n, f in (p.split(':') for p in text.split(',') if p))
  except ValueError:
    pairs = None
  if pairs is None or any(n < 1 or not 0 <= f <= 1 for n, f in pairs):
    raise ConfigError(f'config.{field}={text!r}: expected N:FRACTION,... e.g. 2:0.2,3:0.18')
  return pairs


EXECUTORS = ('local', 'ray', 'slurm')


def sbatch_args(text: str) -> dict[str, str]:
  """'account=proj; constraint=cpu' -> {'account': 'proj', 'constraint': 'cpu'}; a bare KEY is
  a flag (value '')."""
  out = {}
  for entry in (e.strip() for e in text.split(';')):
    if not entry:
      continue
    key, _, value = entry.partition('=')
    key = key.strip().lstrip('-')
    if not key or ' ' in key:
      raise ConfigError(f'config.slurm.sbatch_args={text!r}: expected KEY=VALUE; KEY=VALUE, '
                        f'e.g. account=myproject; constraint=cpu (bad entry {entry!r})')
    out[key] = value.strip()
  return out


def languages(config: ml_collections.ConfigDict) -> list[str]:
  return [code.strip() for code in config.language.keep.split(',') if code.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field lm.prepare cannot run with; reads no files."""
  parse_inputs(config)
  if config.workers < 1:
    raise ConfigError(f'config.workers={config.workers}: expected at least 1')
  if config.executor not in EXECUTORS:
    raise ConfigError(f'config.executor={config.executor!r}: expected one of {EXECUTORS}')
  if config.executor == 'ray' and importlib.util.find_spec('ray') is None:
    raise ConfigError("config.executor='ray' needs Ray: pip install 'ray>=2.50'")
  if config.executor == 'slurm':
    if not config.slurm.partition:
      raise ConfigError("config.executor='slurm' needs config.slurm.partition, the partition "
                        'its jobs are submitted to')
    sbatch_args(config.slurm.sbatch_args)
  for section in ('ray', 'slurm'):
    for field in ('cpus_per_task', 'mem_per_cpu_gb'):
      if config[section][field] <= 0:
        raise ConfigError(f'config.{section}.{field}={config[section][field]}: expected more '
                          'than 0')
  if config.tasks < 0:
    raise ConfigError(f'config.tasks={config.tasks}: expected 0 (one per worker) or more')
  if config.language.enabled:
    if not languages(config):
      raise ConfigError(f'config.language.keep={config.language.keep!r} names no language')
    if importlib.util.find_spec('py3langid') is None:
      raise ConfigError('config.language.enabled needs the py3langid package, which ships its '
                        "model: pip install -e '.[prepare]' (or set config.language.enabled=False)")
  n_gram_fractions(config.quality.repetition.top_n_grams, 'quality.repetition.top_n_grams')
  n_gram_fractions(config.quality.repetition.dup_n_grams, 'quality.repetition.dup_n_grams')
  d = config.dedup
  for field in ('ngram_size', 'bands', 'rows'):
    if d[field] < 1:
      raise ConfigError(f'config.dedup.{field}={d[field]}: expected at least 1')
  if not 0 < d.threshold <= 1:
    raise ConfigError(f'config.dedup.threshold={d.threshold}: expected a Jaccard similarity in '
                      '(0, 1]')
  if config.decontamination.action not in ('drop', 'flag'):
    raise ConfigError(f'config.decontamination.action={config.decontamination.action!r}: '
                      "expected 'drop' or 'flag'")
  if config.decontamination.source:
    sources.check_source(config.decontamination.source,
                         f'config.decontamination.source={config.decontamination.source!r}')
  if config.decontamination.n < 1:
    raise ConfigError(f'config.decontamination.n={config.decontamination.n}: expected >= 1')
  tk = config.tokenize
  if tk.enabled and not tk.tokenizer and tk.vocab_size < 1:
    raise ConfigError(f'config.tokenize.vocab_size={tk.vocab_size}: expected at least 1 (or a '
                      'config.tokenize.tokenizer)')
  for field in ('train_chars', 'shard_tokens'):
    if tk[field] < 0:
      raise ConfigError(f'config.tokenize.{field}={tk[field]}: expected 0 or more')
