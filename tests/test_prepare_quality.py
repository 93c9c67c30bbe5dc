"""lm.prepare's per-document stages on constructed documents: each Gopher and C4 rule on both
sides of its threshold, Devanagari words and sentences, PII scrubbing, language identification."""

import collections
import json
import os

import pytest

from datatrove.data import Document
from lm.prepare import config as config_lib
from lm.prepare import stages
from lm.prepare import words


def _config(**overrides):
  config = config_lib.base_config()
  for dotted, value in overrides.items():
    *parents, field = dotted.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[field] = value
  return config


def _quality(tmp_path, name, **overrides):
  found = {s.name: s for s in stages.quality_stages(str(tmp_path), _config(**overrides))}
  return found[name]


def _decide(stage, text, language='en'):
  doc = Document(text=text, id='doc', metadata=dict(language=language, order=[0, 0]))
  kept, reason = stage.decide(doc)
  return (kept, reason), doc.text


def _word(i, length=4):
  """A distinct lowercase word of `length` letters, for documents that pass every other rule."""
  letters = 'bcdfghjklmnpqrstvwxz'
  out = ''
  for _ in range(length):
    out, i = out + letters[i % 20], i // 20 + 7 * len(out) + 1
  return out


def _prose(n, length=4, lengths=()):
  """'the and' and n - 2 more words, of `length` letters (or the given lengths)."""
  lengths = list(lengths) or [length] * (n - 2)
  return ' '.join(['the', 'and'] + [_word(i, k) for i, k in enumerate(lengths)])


KEPT = (True, None)


# ---------------------------------------------------------------------------------------------
# Words.


def test_words_keep_devanagari_vowel_signs_and_split_punctuation():
  tokenizer = words.WordTokenizer('hi')
  assert tokenizer.word_tokenize('किताबें पढ़ो। Don\'t stop... #tag') == [
      'किताबें', 'पढ़ो', '।', "Don't", 'stop', '.', '.', '.', '#', 'tag']
  assert tokenizer.sent_tokenize('राम घर गया। सीता आई॥ Is it? Yes. end') == [
      'राम घर गया।', 'सीता आई॥', 'Is it?', 'Yes.', 'end']


# ---------------------------------------------------------------------------------------------
# Gopher quality.


def test_gopher_document_length(tmp_path):
  stage = _quality(tmp_path, 'gopher_quality', **{'quality.gopher.max_doc_words': 60})
  assert _decide(stage, _prose(50))[0] == KEPT
  assert _decide(stage, _prose(49))[0] == (False, 'gopher_short_doc')
  assert _decide(stage, _prose(60))[0] == KEPT
  assert _decide(stage, _prose(61))[0] == (False, 'gopher_long_doc')


def test_gopher_mean_word_length(tmp_path):
  stage = _quality(tmp_path, 'gopher_quality')
  # 50 words: 'the', 'and' and 48 more; mean 150/50 = 3 keeps, 149/50 does not.
  assert _decide(stage, _prose(50, lengths=[3] * 48))[0] == KEPT
  assert _decide(stage, _prose(50, lengths=[2] + [3] * 47))[0] == (
      False, 'gopher_below_avg_threshold')
  # 6 + 14 * 11 + 34 * 10 = 500 characters: mean 10 keeps, 501 / 50 does not.
  assert _decide(stage, _prose(50, lengths=[11] * 14 + [10] * 34))[0] == KEPT
  assert _decide(stage, _prose(50, lengths=[11] * 15 + [10] * 33))[0] == (
      False, 'gopher_above_avg_threshold')


@pytest.mark.parametrize('symbol, reason', [('#', 'gopher_too_many_hashes'),
                                            ('…', 'gopher_too_many_ellipsis')])
def test_gopher_symbol_to_word_ratio(tmp_path, symbol, reason):
  stage = _quality(tmp_path, 'gopher_quality')
  # Symbols are words of their own: 10 of 100 words keeps (ratio 0.1), 11 of 100 does not.
  assert _decide(stage, f' {symbol} ' * 10 + _prose(90))[0] == KEPT
  assert _decide(stage, f' {symbol} ' * 11 + _prose(89))[0] == (False, reason)


def test_gopher_bullet_and_ellipsis_lines(tmp_path):
  stage = _quality(tmp_path, 'gopher_quality')
  lines = _prose(100).split(' ')
  lines = [' '.join(lines[i:i + 5]) for i in range(0, 100, 5)]  # 20 lines.

  def bulleted(k):
    return '\n'.join(('- ' if i < k else '') + line for i, line in enumerate(lines))

  def ellipsed(k):
    return '\n'.join(line + (' …' if i < k else '') for i, line in enumerate(lines))

  assert _decide(stage, bulleted(18))[0] == KEPT  # 18 / 20 = 0.9.
  assert _decide(stage, bulleted(19))[0] == (False, 'gopher_too_many_bullets')
  assert _decide(stage, ellipsed(6))[0] == KEPT  # 6 / 20 = 0.3.
  assert _decide(stage, ellipsed(7))[0] == (False, 'gopher_too_many_end_ellipsis')


def test_gopher_words_with_letters(tmp_path):
  stage = _quality(tmp_path, 'gopher_quality')
  numbers = lambda k: ' '.join(str(1000 + i) for i in range(k))
  assert _decide(stage, _prose(80) + ' ' + numbers(20))[0] == KEPT  # 80 / 100 = 0.8.
  assert _decide(stage, _prose(79) + ' ' + numbers(21))[0] == (
      False, 'gopher_below_alpha_threshold')


def test_gopher_stop_words_per_language(tmp_path):
  stage = _quality(tmp_path, 'gopher_quality')
  body = ' '.join(_word(i) for i in range(60))
  assert _decide(stage, 'the and ' + body)[0] == KEPT
  assert _decide(stage, 'the the ' + body)[0] == (False, 'gopher_enough_stop_words')
  hindi = ' '.join(['किताब', 'पुस्तक', 'विद्यालय'] * 20)
  assert _decide(stage, 'वह घर है और ' + hindi, 'hi')[0] == KEPT
  assert _decide(stage, 'वह घर है ' + hindi, 'hi')[0] == (False, 'gopher_enough_stop_words')
  # English stop words do not make a Hindi document.
  assert _decide(stage, 'the and ' + hindi, 'hi')[0] == (False, 'gopher_enough_stop_words')


# ---------------------------------------------------------------------------------------------
# Gopher repetition.

_OFF = {'quality.repetition.dup_line_frac': 0, 'quality.repetition.dup_para_frac': 0,
        'quality.repetition.dup_line_char_frac': 0, 'quality.repetition.dup_para_char_frac': 0,
        'quality.repetition.top_n_grams': '', 'quality.repetition.dup_n_grams': ''}


def _repetition(tmp_path, **on):
  return _quality(tmp_path, 'gopher_repetition', **{**_OFF, **on})


@pytest.mark.parametrize('separator, field, reason', [
    ('\n', 'dup_line_frac', 'dup_line_frac'), ('\n\n', 'dup_para_frac', 'dup_para_frac')])
def test_repeated_lines_and_paragraphs(tmp_path, separator, field, reason):
  stage = _repetition(tmp_path, **{f'quality.repetition.{field}': 0.3})
  distinct = [_prose(8) + f' {_word(100 + i)}' for i in range(10)]
  # 3 of 10 repeat an earlier one (0.3) keeps; 4 of 10 does not.
  assert _decide(stage, separator.join(distinct[:7] + [distinct[0]] * 3))[0] == KEPT
  assert _decide(stage, separator.join(distinct[:6] + [distinct[0]] * 4))[0] == (False, reason)


def test_repeated_line_characters(tmp_path):
  stage = _repetition(tmp_path, **{'quality.repetition.dup_line_char_frac': 0.2})
  # Lines of 20, 20, 28 and 29 characters and 3 newlines: the repeat is 20 / 100 = 0.2.
  a, b, c = 'a' * 20, 'b' * 28, 'c' * 29
  assert _decide(stage, '\n'.join([a, a, b, c]))[0] == KEPT
  a = 'a' * 21  # 21 / 102 > 0.2.
  assert _decide(stage, '\n'.join([a, a, b, c]))[0] == (False, 'dup_line_char_frac')


def test_top_and_repeated_n_grams(tmp_path):
  text = _prose(40) + ' ' + 'red fox ' * 6 + ' '.join(_word(500 + i) for i in range(20))
  tokens = words.WordTokenizer().word_tokenize(text)
  grams = collections.Counter(' '.join(g) for g in zip(tokens, tokens[1:]))
  gram, count = grams.most_common(1)[0]
  fraction = len(gram) * count / len(text)
  assert gram == 'red fox' and count == 6
  assert _decide(_repetition(tmp_path, **{'quality.repetition.top_n_grams': f'2:{fraction}'}),
                 text)[0] == KEPT
  assert _decide(_repetition(tmp_path, **{
      'quality.repetition.top_n_grams': f'2:{fraction - 1e-9}'}), text)[0] == (False, 'top_2_gram')
  # In 'red fox' x 6, the 5-grams from the 3rd and the 8th word repeat those from the 1st and 2nd:
  # 2 x 15 characters (datatrove joins a repeated n-gram's words without spaces, and skips past
  # it).
  repeated = 30 / len(text)
  assert _decide(_repetition(tmp_path, **{'quality.repetition.dup_n_grams': f'5:{repeated}'}),
                 text)[0] == KEPT
  assert _decide(_repetition(tmp_path, **{
      'quality.repetition.dup_n_grams': f'5:{repeated - 1e-9}'}), text)[0] == (
          False, 'duplicated_5_n_grams')


# ---------------------------------------------------------------------------------------------
# C4.


def _sentences(k, language='en'):
  if language == 'hi':
    return [f'राम आज {i} घर गया।' for i in range(k)]
  return [f'This is sentence number {i}.' for i in range(k)]


def test_c4_sentences_and_terminal_punctuation(tmp_path):
  stage = _quality(tmp_path, 'c4_quality')
  assert _decide(stage, '\n'.join(_sentences(5)))[0] == KEPT
  assert _decide(stage, '\n'.join(_sentences(4)))[0] == (False, 'too_few_sentences')
  assert _decide(stage, ' '.join(_sentences(5)))[0] == KEPT  # Five sentences on one line.
  # A line without terminal punctuation, or ending in an ellipsis, is removed; the rest stays.
  verdict, text = _decide(stage, '\n'.join(_sentences(5) + ['A line with no end',
                                                            'A line that trails off...']))
  assert verdict == KEPT and text == '\n'.join(_sentences(5))
  assert _decide(stage, '\n'.join(_sentences(4) + ['A line with no end']))[0] == (
      False, 'too_few_sentences')
  # Hindi ends sentences with the danda.
  assert _decide(stage, '\n'.join(_sentences(5, 'hi')), 'hi') == (KEPT,
                                                                 '\n'.join(_sentences(5, 'hi')))
  assert _decide(stage, '\n'.join(_sentences(4, 'hi')), 'hi')[0] == (False, 'too_few_sentences')


def test_c4_line_rules(tmp_path):
  stage = _quality(tmp_path, 'c4_quality', **{'quality.c4.max_word_length': 12})
  five = _sentences(5)
  for line, kept_line in [('Three words here.', True), ('Two words.', False),
                          ('This has twelvelettr words.', True),
                          ('This has thirteenlettr words.', False),
                          ('Enable JavaScript to see it.', False),
                          ('Read our privacy policy today.', False),
                          ('A cited claim[1] stays here.', 'A cited claim stays here.')]:
    verdict, text = _decide(stage, '\n'.join(five + [line]))
    assert verdict == KEPT, line
    expected = line if kept_line is True else kept_line
    assert text == '\n'.join(five + ([expected] if kept_line else [])), line


def test_c4_document_rules(tmp_path):
  stage = _quality(tmp_path, 'c4_quality')
  five = _sentences(5)
  assert _decide(stage, '\n'.join(five + ['Lorem ipsum dolor sit amet.']))[0] == (
      False, 'lorem_ipsum')
  assert _decide(stage, '\n'.join(five + ['It returns {x} for each x.']))[0] == (
      False, 'curly_bracket')
  off = _quality(tmp_path, 'c4_quality', **{'quality.c4.lorem_ipsum': False,
                                            'quality.c4.curly_bracket': False})
  assert _decide(off, '\n'.join(five + ['It returns {x}, lorem ipsum.']))[0] == KEPT


def test_c4_bad_words_from_a_file(tmp_path):
  path = tmp_path / 'bad.txt'
  path.write_text('darn\nकुत्ता\n', encoding='utf-8')
  stage = _quality(tmp_path, 'c4_bad_words', **{'quality.c4.bad_words_file': str(path)})
  assert _decide(stage, 'Well, darn it.')[0] == (False, 'document_removed_with_badwords')
  assert _decide(stage, 'Darn.')[0] == (False, 'document_removed_with_badwords')
  assert _decide(stage, 'The darned thing.')[0] == KEPT  # Whole words only.
  assert _decide(stage, 'वह कुत्ता है।', 'hi')[0] == (False, 'document_removed_with_badwords')
  assert _decide(stage, 'वह कुत्ते हैं।', 'hi')[0] == KEPT  # A vowel sign continues the word.


# ---------------------------------------------------------------------------------------------
# PII.


def _scrub(tmp_path, texts, **overrides):
  stage = stages.PII(str(tmp_path), _config(**overrides).pii)
  docs = [Document(text=t, id=str(i), metadata=dict(order=[0, i])) for i, t in enumerate(texts)]
  out = [doc.text for doc in stage.run(iter(docs))]
  with open(os.path.join(tmp_path, 'pii', '00000.json')) as f:
    return out, json.load(f)['counters']


def test_pii_placeholders_and_counts(tmp_path):
  texts, counts = _scrub(tmp_path, [
      'Write to jane.doe@example.com or +91 98765 43210.',
      'Call (555) 123-4567 or 555.123.4567 or 9876543210; server 185.201.134.67, router '
      '192.168.1.1.',
      'Years 2019 2020 2021, pin 123456, date 2024-01-15, 12345678901234567 digits.',
  ])
  assert texts == [
      'Write to <EMAIL> or <PHONE>.',
      'Call <PHONE> or <PHONE> or <PHONE>; server <IP>, router 192.168.1.1.',
      'Years 2019 2020 2021, pin 123456, date 2024-01-15, 12345678901234567 digits.']
  assert counts == dict(emails=1, phones=4, ips=1, documents_with_pii=2)


@pytest.mark.parametrize('number, is_phone', [
    ('+1 202 555 0143', True), ('98765 43210', True), ('022-2345-6789', True),
    ('123456789', False),  # 9 digits.
    ('1234567890', False),  # A bare 10-digit run that no mobile number starts with.
    ('2019 2020 2021', False), ('+12 3456 7890 1234 5678', False),  # Years; 18 digits.
    ('185.201.134.67', False),  # A dotted quad: an IPv4 address, left to the IP rule.
    ('+91  98765  43210', True), ('+91\u00a098765\u00a043210', True)])  # Wider spaces.
def test_phone_numbers(number, is_phone):
  assert stages.is_phone_number(number) == is_phone


def test_pii_switches(tmp_path):
  text = 'mail a@b.org from 8.8.8.8 or 10.0.0.1'
  assert _scrub(tmp_path, [text], **{'pii.emails': False})[0] == [
      'mail a@b.org from <IP> or 10.0.0.1']
  assert _scrub(tmp_path, [text], **{'pii.only_public_ips': False})[0] == [
      'mail <EMAIL> from <IP> or <IP>']


# ---------------------------------------------------------------------------------------------
# Language.


def test_language_keeps_hindi_and_english(tmp_path):
  stage = stages.Language(str(tmp_path), _config().language)
  stage.setup(0)
  cases = {'The committee met on Tuesday to discuss the new budget for the schools.': 'en',
           'समिति ने मंगलवार को स्कूलों के नए बजट पर चर्चा करने के लिए बैठक की।': 'hi',
           'Le comité s\'est réuni mardi pour discuter du nouveau budget des écoles.': 'fr'}
  for text, language in cases.items():
    doc = Document(text=text, id='d', metadata=dict(order=[0, 0]))
    kept, reason = stage.decide(doc)
    assert doc.metadata['language'] == language
    assert (kept, reason) == ((True, None) if language != 'fr' else (False, 'other_language'))
  strict = stages.Language(str(tmp_path), _config(**{'language.min_score': 1.0}).language)
  strict.setup(0)
  doc = Document(text='ok then', id='d', metadata=dict(order=[0, 0]))
  assert strict.decide(doc) in ((False, 'low_language_score'), (False, 'other_language'))
