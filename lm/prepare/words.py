"""Words and sentences for the quality filters and MinHash, the same rule for every script.

datatrove picks a word tokenizer per language (spaCy for English, indic-nlp for Hindi), each a
package of its own and, for NLTK's, data downloaded at run time. The Gopher and C4 rules only
need words, punctuation marks and sentence ends, so one tokenizer serves all languages here: a
word is a run of letters, marks and digits (Devanagari vowel signs and viramas are marks, Mn and
Mc, so a word is not cut at each matra, as a plain \\w split would), with inner apostrophes kept
("don't"); every other visible character is a token of its own, as spaCy makes punctuation.
Sentences end at . ! ? and the danda (। and ॥).
"""

import regex
from datatrove.utils import word_tokenizers

_TOKEN = regex.compile(r"[\p{L}\p{M}\p{N}]+(?:['’][\p{L}\p{M}\p{N}]+)*|\S")
_SENTENCE_END = regex.compile(r'(?<=[.!?।॥]["\'”’)\]]*)\s+')

# The default stop words of Gopher's rule (config.quality.gopher.stop_words): Gopher's English
# list, and the most frequent Hindi function words. Language codes are py3langid's (ISO 639-1).
STOP_WORDS = {
    'en': ('the', 'be', 'to', 'of', 'and', 'that', 'have', 'with'),
    'hi': ('है', 'के', 'में', 'की', 'और', 'का', 'को', 'से', 'हैं', 'पर', 'यह', 'कि', 'ने', 'भी',
           'एक', 'तो', 'था', 'नहीं'),
}


class WordTokenizer(word_tokenizers.WordTokenizer):
  """What datatrove's filters and MinHash call to split text (passed as their `language`)."""

  def __init__(self, language: str = ''):
    super().__init__(language)

  def word_tokenize(self, text: str) -> list[str]:
    return _TOKEN.findall(text)

  def sent_tokenize(self, text: str) -> list[str]:
    return [s for s in (s.strip() for s in _SENTENCE_END.split(text)) if s]

  def span_tokenize(self, text: str) -> list[tuple[int, int]]:
    return list(word_tokenizers.simple_span_tokenize(text, self.sent_tokenize(text)))

  # datatrove caches splits by (text, language): instances with the same language are one key.
  def __eq__(self, other):
    return isinstance(other, WordTokenizer) and other.language == self.language

  def __hash__(self):
    return hash(('lm.prepare.words', self.language))


def count(text: str) -> int:
  """Words as the report counts them: whitespace-separated, in every script (cheap)."""
  return len(text.split())
