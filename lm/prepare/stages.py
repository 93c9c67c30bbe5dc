"""The per-document stages: language, quality, PII, dedup removals, decontamination.

Each is a records.Stage: a datatrove step that records what it removed and why. The quality
stages run datatrove's own filters (GopherQualityFilter, GopherRepetitionFilter,
C4QualityFilter, C4BadWordsFilter), one instance per language, with lm.prepare.words' tokenizer
and stop words; their reasons ('gopher_short_doc', 'dup_line_frac', 'curly_bracket', ...) are
datatrove's.
"""

import ipaddress
import json
import os
import re

from datatrove.data import Document
from datatrove.pipeline.filters import base_filter
from datatrove.pipeline.filters import c4_filters
from datatrove.pipeline.filters import C4BadWordsFilter
from datatrove.pipeline.filters import C4QualityFilter
from datatrove.pipeline.filters import GopherQualityFilter
from datatrove.pipeline.filters import GopherRepetitionFilter
from datatrove.pipeline.formatters import pii as datatrove_pii
import ml_collections
import regex

from lm import sources
from lm.eval import contamination
from lm.prepare import config as config_lib
from lm.prepare import records
from lm.prepare import words

# C4 keeps a line only if it ends in terminal punctuation; datatrove's list (. ? ! " ') misses
# the danda and double danda that end Hindi sentences, which no English line ends with.
if '।' not in c4_filters.END_PUNCTUATION:
  c4_filters.END_PUNCTUATION = (*c4_filters.END_PUNCTUATION, '।', '॥')

UNKNOWN = 'und'  # The language of a document when language identification is off.


class Language(records.Stage):
  """Identifies each document's language with py3langid; keeps those in config.language.keep."""

  name = 'language'

  def __init__(self, folder: str, cfg: ml_collections.ConfigDict):
    super().__init__(folder)
    self.keep = frozenset(code.strip() for code in cfg.keep.split(',') if code.strip())
    self.min_score, self.sample_chars = cfg.min_score, cfg.sample_chars
    self._identifier = None

  def setup(self, rank: int) -> None:
    from py3langid import langid  # pylint: disable=g-import-not-at-top
    self._identifier = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE,
                                                                 norm_probs=True)

  def decide(self, doc: Document) -> tuple[bool, str | None]:
    language, score = self._identifier.classify(doc.text[:self.sample_chars])
    doc.metadata['language'], doc.metadata['language_score'] = language, round(float(score), 4)
    if language not in self.keep:
      return False, 'other_language'
    if score < self.min_score:
      return False, 'low_language_score'
    return True, None


class BadWords(C4BadWordsFilter):
  """C4's bad-word rule with the words read from a local file, not downloaded; a word is whole
  when no letter, mark or digit touches it (so a Devanagari word is not cut at a vowel sign)."""

  def __init__(self, path: str):
    super().__init__(fail_on_missing_language=False)
    with open(path, encoding='utf-8') as f:
      bad = sorted({line.strip().lower() for line in f if line.strip()}, key=len, reverse=True)
    if not bad:
      raise sources.DataError(f'config.quality.c4.bad_words_file={path!r} holds no words')
    self.pattern = regex.compile(r'(?<![\p{L}\p{M}\p{N}])(?:' + '|'.join(map(regex.escape, bad))
                                 + r')(?![\p{L}\p{M}\p{N}])')

  def _get_badwords(self, lang: str):
    return self.pattern


class Quality(records.Stage):
  """One datatrove filter per language (the document's, from the language stage)."""

  def __init__(self, folder: str, name: str, filters: dict[str, base_filter.BaseFilter]):
    super().__init__(folder, name)
    self.filters = filters

  def decide(self, doc: Document) -> tuple[bool, str | None]:
    language = doc.metadata.get('language', UNKNOWN)
    f = self.filters.get(language) or self.filters[UNKNOWN]
    return base_filter.get_filter_result(f.filter(doc))


def quality_stages(folder: str, config: ml_collections.ConfigDict) -> list[Quality]:
  """gopher_quality, gopher_repetition, c4_quality and c4_bad_words, as switched on."""
  languages = config_lib.languages(config) if config.language.enabled else []
  q, stages = config.quality, []
  stop_words = {language: [w.strip() for w in listed.split(',') if w.strip()]
                for language, listed in q.gopher.stop_words.items()}
  every_stop_word = sorted({w for ws in stop_words.values() for w in ws})

  def per_language(make) -> dict[str, base_filter.BaseFilter]:
    return {language: make(language, words.WordTokenizer(language))
            for language in [*languages, UNKNOWN]}

  if q.gopher.enabled:
    g = q.gopher
    stages.append(Quality(folder, 'gopher_quality', per_language(
        lambda language, tokenizer: GopherQualityFilter(
            min_doc_words=g.min_doc_words, max_doc_words=g.max_doc_words,
            min_avg_word_length=g.min_avg_word_length, max_avg_word_length=g.max_avg_word_length,
            max_symbol_word_ratio=g.max_symbol_word_ratio,
            max_bullet_lines_ratio=g.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=g.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=g.min_alpha_words_ratio, min_stop_words=g.min_stop_words,
            stop_words=stop_words.get(language, every_stop_word),
            language=tokenizer))))
  if q.repetition.enabled:
    r = q.repetition
    top = config_lib.n_gram_fractions(r.top_n_grams, 'quality.repetition.top_n_grams')
    dup = config_lib.n_gram_fractions(r.dup_n_grams, 'quality.repetition.dup_n_grams')
    stages.append(Quality(folder, 'gopher_repetition', per_language(
        lambda language, tokenizer: GopherRepetitionFilter(
            dup_line_frac=r.dup_line_frac, dup_para_frac=r.dup_para_frac,
            dup_line_char_frac=r.dup_line_char_frac, dup_para_char_frac=r.dup_para_char_frac,
            top_n_grams=top, dup_n_grams=dup, language=tokenizer))))
  if q.c4.enabled:
    c4 = q.c4
    stages.append(Quality(folder, 'c4_quality', per_language(
        lambda language, tokenizer: C4QualityFilter(
            split_paragraph=True, remove_citations=c4.remove_citations,
            filter_no_terminal_punct=c4.terminal_punctuation,
            min_num_sentences=c4.min_num_sentences, min_words_per_line=c4.min_words_per_line,
            max_word_length=c4.max_word_length, filter_lorem_ipsum=c4.lorem_ipsum,
            filter_javascript=c4.javascript, filter_curly_bracket=c4.curly_bracket,
            filter_policy=c4.policy, language=tokenizer))))
    if c4.bad_words_file:
      bad_words = BadWords(c4.bad_words_file)
      stages.append(Quality(folder, 'c4_bad_words', {UNKNOWN: bad_words}))
  return stages


# ---------------------------------------------------------------------------------------------
# PII.

# Digits in groups of 2 to 5, optionally after +COUNTRY and an (AREA) code.
# Groups may be separated by '.', '-' or up to three spaces (non-breaking ones too), not newlines.
_SEPARATOR = r'(?:[.-]|[^\S\n]{1,3})'
_PHONE = re.compile(rf'(?<![\w+])(?:\+[0-9]{{1,3}}{_SEPARATOR}?)?(?:\([0-9]{{1,5}}\){_SEPARATOR}?)?'
                    rf'[0-9]{{2,12}}(?:{_SEPARATOR}[0-9]{{2,5}}){{0,4}}(?![\w])')
_DOTTED_QUAD = re.compile(r'[0-9]{1,3}(?:\.[0-9]{1,3}){3}')


def is_phone_number(match: str) -> bool:
  """10 to 15 digits, written as a phone number is: +COUNTRY ..., (AREA) ..., groups joined by
  '-' or '.', groups of mixed length joined by spaces ('98765 43210', not a list of years like
  '2019 2020 2021'), or a bare 10-digit mobile number starting with 6 to 9."""
  digits = re.sub(r'[^0-9]', '', match)
  if not 10 <= len(digits) <= 15 or _DOTTED_QUAD.fullmatch(match):
    return False  # A dotted quad is an IPv4 address (the IP rule's), not a phone number.
  if match.startswith('+') or '(' in match or re.search(r'[0-9][.-][0-9]', match):
    return True
  groups = match.split()
  if len(groups) > 1:
    return {len(g) for g in groups} != {4}
  return len(digits) == 10 and digits[0] in '6789'


class PII(records.Stage):
  """Replaces emails, phone numbers and IP addresses with placeholders; never drops."""

  name = 'pii'

  def __init__(self, folder: str, cfg: ml_collections.ConfigDict):
    super().__init__(folder)
    self.cfg = cfg.to_dict()
    formatter = datatrove_pii.PIIFormatter()  # Its email and IPv4 patterns.
    self.email, self.ip = formatter.emails_replacer.regex, formatter.ip_replacer.regex
    self._found = {}

  def _replace(self, kind: str, pattern: re.Pattern, text: str, valid, placeholder: str) -> str:
    def replace(match):
      if not valid(match.group(0)):
        return match.group(0)
      self._found[kind] = self._found.get(kind, 0) + 1
      return placeholder
    return pattern.sub(replace, text)

  def decide(self, doc: Document) -> tuple[bool, str | None]:
    c, text, self._found = self.cfg, doc.text, {}
    if c['emails']:
      text = self._replace('emails', self.email, text, lambda m: True, c['email_placeholder'])
    if c['phones']:
      text = self._replace('phones', _PHONE, text, is_phone_number, c['phone_placeholder'])
    if c['ips']:
      text = self._replace('ips', self.ip, text, self._is_ip, c['ip_placeholder'])
    doc.text = text
    return True, None

  def _is_ip(self, match: str) -> bool:
    try:
      address = ipaddress.ip_address(match)
    except ValueError:
      return False
    return address.is_global or not self.cfg['only_public_ips']

  def count(self, record: records.Recorder, doc: Document) -> None:
    for kind, n in self._found.items():
      record.count(kind, n)
    record.count('documents_with_pii', bool(self._found))


# ---------------------------------------------------------------------------------------------
# Removals decided by the dedup pass, and decontamination.


class Removals(records.Stage):
  """Drops the documents that REMOVALS/NAME/RANK.jsonl lists ({order, reason}), as the dedup
  clustering decided them."""

  def __init__(self, folder: str, name: str, removals: str):
    super().__init__(folder, name)
    self.removals, self._reasons = removals, {}

  def setup(self, rank: int) -> None:
    path = os.path.join(self.removals, self.name, f'{rank:05d}.jsonl')
    with open(path, encoding='utf-8') as f:
      self._reasons = {tuple(r['order']): r['reason'] for r in map(json.loads, f)}

  def decide(self, doc: Document) -> tuple[bool, str | None]:
    reason = self._reasons.get(tuple(doc.metadata['order']))
    return reason is None, reason


class Decontamination(records.Stage):
  """Drops (or flags) documents sharing a word n-gram with the evaluation documents, by
  lm.eval.contamination's definition (normalize_words, ngrams)."""

  name = 'decontamination'

  def __init__(self, folder: str, cfg: ml_collections.ConfigDict):
    super().__init__(folder)
    self.source, self.text_field, self.n, self.action = (cfg.source, cfg.text_field, cfg.n,
                                                         cfg.action)
    self._wanted = frozenset()
    self._shared = 0

  def setup(self, rank: int) -> None:
    wanted = set()
    for text in sources.iter_documents(self.source, self.text_field,
                                       where=f'config.decontamination.source={self.source!r}'):
      wanted |= contamination.ngrams(contamination.normalize_words(text), self.n)
    self._wanted = frozenset(wanted)

  def decide(self, doc: Document) -> tuple[bool, str | None]:
    self._shared = len(contamination.ngrams(contamination.normalize_words(doc.text), self.n)
                       & self._wanted)
    if not self._shared:
      return True, None
    if self.action == 'flag':
      doc.metadata['contaminated_ngrams'] = self._shared
      return True, None
    return False, f'shared_{self.n}_grams'

  def count(self, record: records.Recorder, doc: Document) -> None:
    record.count('contaminated_documents', bool(self._shared))
