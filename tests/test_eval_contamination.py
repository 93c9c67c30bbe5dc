"""lm/eval/contamination.py: n-gram overlap of lm-eval task documents with training data, over
local tasks (JSONL files this test writes; nothing is downloaded)."""

import json
import os
import re
import subprocess
import sys
import unicodedata

# Task data are local JSON files; the harness's datasets library must not go looking online.
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import eval_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm.eval import contamination as contamination_lib  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Question/answer pairs of more than 13 words each, no two sharing a 13-gram.
FACTS = [
    ('Which river flows through the old town before it reaches the harbour in the west?',
     'The slow brown river that the fishermen call the Winding Lady flows through it.'),
    ('What did the committee decide about the new library after the long spring meeting?',
     'They agreed to build it beside the railway station with money from the bakery tax.'),
    ('How many lanterns were hung along the bridge for the autumn festival last year?',
     'Exactly three hundred and twelve paper lanterns were hung, each painted by a child.'),
    ('Why did the lighthouse keeper stop ringing the bell every evening at six?',
     'The bell cracked during a storm and nobody in the village knew how to mend it.'),
    ('Where do the migrating geese rest when they cross the mountains each winter?',
     'They rest on the frozen lake below the pass, where the shepherds leave grain.'),
]
HINDI = [
    ('भारत की राजधानी कौन सी है और वहाँ कौन सी प्रसिद्ध इमारतें देखने को मिलती हैं?',
     'नई दिल्ली भारत की राजधानी है जहाँ लाल किला और कुतुब मीनार जैसी विशाल इमारतें हैं।'),
    ('गंगा नदी कहाँ से निकलती है और किन राज्यों से होकर समुद्र तक पहुँचती है?',
     'गंगा हिमालय के गंगोत्री हिमनद से निकलकर उत्तर प्रदेश बिहार और बंगाल से बहती है।'),
]
FILLER = ('Tomatoes grow best in warm soil with plenty of sun, and gardeners often tie the '
          'stems to wooden stakes so the heavy fruit does not break them in late summer.')


def _words(text: str) -> list[str]:
  return contamination_lib.normalize_words(text)


def _write_jsonl(path, records) -> str:
  """records: dicts, or strings written as {"text": ...}."""
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r if isinstance(r, dict) else {'text': r}, ensure_ascii=False) + '\n'
                 for r in records)
  return str(path)


@pytest.fixture(scope='module')
def tasks_dir(tmp_path_factory):
  """local_facts and local_hindi (question -> answer), and lm.eval's shared local tasks
  (local_mc, local_translate, local_rolling), with a group local_qa of the first two."""
  import yaml  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('contamination_tasks')
  eval_fixtures.write_tasks(str(directory))
  for name, pairs in (('facts', FACTS), ('hindi', HINDI)):
    data = _write_jsonl(directory / f'{name}.jsonl', [dict(question=q, answer=a) for q, a in pairs])
    spec = dict(task=f'local_{name}', dataset_path='json',
                dataset_kwargs=dict(data_files=dict(test=data)), test_split='test',
                output_type='generate_until', doc_to_text='{{question}}',
                doc_to_target='{{answer}}', generation_kwargs=dict(until=['\n']),
                metric_list=[dict(metric='exact_match')])
    with open(directory / f'{name}.yaml', 'w', encoding='utf-8') as f:
      yaml.safe_dump(spec, f, allow_unicode=True)
  with open(directory / 'qa_group.yaml', 'w') as f:
    yaml.safe_dump(dict(group='local_qa', task=['local_facts', 'local_hindi']), f)
  return str(directory)


# ---------------------------------------------------------------------------------------------
# Words and n-grams.


def test_normalize_words_folds_case_punctuation_and_width():
  assert _words('The QUICK, brown fox -- "jumped"!') == ['the', 'quick', 'brown', 'fox', 'jumped']
  assert _words('Answer:3 well-known') == ['answer', '3', 'well', 'known']
  assert _words('Straße') == _words('STRASSE')  # Case folding, not just lower().
  assert _words('\ufb01nd ２ soft\u00adhyphen') == ['find', '2', 'softhyphen']  # NFKC; Cf drops.
  assert _words('  \n\t ') == []


def test_normalize_words_keeps_devanagari_words_whole():
  text = 'भारत एक विशाल देश है। यहाँ हिन्दी, मराठी और कई भाषाएँ बोली जाती हैं।'
  assert _words(text) == ['भारत', 'एक', 'विशाल', 'देश', 'है', 'यहाँ', 'हिन्दी', 'मराठी', 'और',
                          'कई', 'भाषाएँ', 'बोली', 'जाती', 'हैं']
  assert re.findall(r'\w+', 'हिन्दी') != ['हिन्दी']  # Why words are not \w runs: matras split them.
  # NFKC leaves Devanagari as NFC does: precomposed and decomposed nukta letters are one word,
  # and the nukta is kept (ज़मीन is not जमीन).
  assert unicodedata.normalize('NFKC', text) == unicodedata.normalize('NFC', text)
  assert _words('\u095b\u092e\u0940\u0928') == _words('\u091c\u093c\u092e\u0940\u0928')
  assert _words('\u095b\u092e\u0940\u0928') != _words('\u091c\u092e\u0940\u0928')


def test_ngrams_counts_and_short_documents():
  words = [f'w{i}' for i in range(15)]
  grams = contamination_lib.ngrams(words, 13)
  assert len(grams) == 3 and all(0 <= g < 2**64 for g in grams)
  assert grams == contamination_lib.ngrams(list(words), 13)  # Pure: same words, same hashes.
  assert contamination_lib.ngrams(words[1:14], 13) < grams
  assert contamination_lib.ngrams(words[1:14] + ['x'], 13) & grams == \
      contamination_lib.ngrams(words[1:14], 13)
  assert len(contamination_lib.ngrams(words[:5], 13)) == 1  # A short text is one gram.
  assert contamination_lib.ngrams(words[:5], 13) != contamination_lib.ngrams(words[:6], 13)
  assert contamination_lib.ngrams([], 13) == set()
  assert len(contamination_lib.ngrams(['a', 'b', 'a', 'b'], 2)) == 2  # Distinct grams only.
  with pytest.raises(ValueError, match='n=0'):
    contamination_lib.ngrams(words, 0)


# ---------------------------------------------------------------------------------------------
# Overlap, on texts.


def test_contamination_finds_planted_overlaps_with_exact_counts():
  docs = {'facts': [f'{q} {a}' for q, a in FACTS]}
  words1, words3 = _words(docs['facts'][1]), _words(docs['facts'][3])
  span = ' '.join(words1[2:17]).upper()  # 15 words of doc 1, shouted: 3 shared 13-grams.
  training = [FILLER, f'{FILLER} {span} {FILLER}', FILLER,
              f'Copied: {docs["facts"][3]} and more.']  # All of doc 3.
  result = contamination_lib.contamination(docs, training)
  report = result['tasks']['facts']
  assert result['n'] == 13 and result['training_documents'] == 4
  assert report['documents'] == 5 and report['contaminated'] == [1, 3]
  assert report['contaminated_documents'] == 2 and report['contaminated_fraction'] == 0.4
  assert report['shared_ngrams'] == 3 + (len(words3) - 12)
  first, second = report['examples']
  assert first == dict(doc=1, shared_ngrams=3, ngrams=len(words1) - 12,
                       ngram=' '.join(words1[2:15]), training_document=1)
  assert second['doc'] == 3 and second['shared_ngrams'] == second['ngrams'] == len(words3) - 12
  assert second['training_document'] == 3 and second['ngram'] == ' '.join(words3[:13])


def test_contamination_of_disjoint_text_is_zero():
  docs = {'facts': [f'{q} {a}' for q, a in FACTS]}
  # Every word of doc 0 appears, but never 13 in a row.
  scrambled = ' '.join(reversed(_words(docs['facts'][0])))
  report = contamination_lib.contamination(docs, [FILLER, scrambled])['tasks']['facts']
  assert report['contaminated_documents'] == report['shared_ngrams'] == 0
  assert report['contaminated'] == report['examples'] == []


def test_contamination_span_shorter_than_n_is_not_enough():
  docs = {'facts': [f'{q} {a}' for q, a in FACTS]}
  twelve = ' '.join(_words(docs['facts'][2])[:12])
  assert contamination_lib.contamination(docs, [twelve + ' ' + FILLER], n=13)[
      'tasks']['facts']['contaminated'] == []
  assert contamination_lib.contamination(docs, [twelve + ' ' + FILLER], n=12)[
      'tasks']['facts']['contaminated'] == [2]


def test_contamination_short_documents_match_exactly_only():
  docs = {'mc': ['Question: What is 1 plus 2?\nAnswer: 3',
                 'Question: What is 3 plus 4?\nAnswer: 7']}
  inside = contamination_lib.contamination(docs, [f'{FILLER} question what is 1 plus 2 answer 3'])
  exact = contamination_lib.contamination(docs, [FILLER, 'QUESTION: what is 1 plus 2? Answer: 3.'])
  assert inside['tasks']['mc']['short_documents'] == 2
  assert inside['tasks']['mc']['contaminated'] == []
  assert exact['tasks']['mc']['contaminated'] == [0]
  assert exact['tasks']['mc']['examples'][0]['ngram'] == 'question what is 1 plus 2 answer 3'


def test_contamination_finds_planted_hindi_overlap():
  docs = {'hindi': [f'{q} {a}' for q, a in HINDI]}
  words0 = _words(docs['hindi'][0])
  span = ' '.join(words0[-14:])  # The answer's last 14 words: 2 shared 13-grams.
  report = contamination_lib.contamination(docs, [f'कल बारिश हुई। {span} फिर धूप निकली।'])[
      'tasks']['hindi']
  assert report['contaminated'] == [0] and report['shared_ngrams'] == 2
  assert report['examples'][0]['ngram'] == ' '.join(words0[-14:-1])
  assert 'विशाल' in report['examples'][0]['ngram'].split()


def test_contamination_rejects_bad_arguments():
  with pytest.raises(ValueError, match='n=0'):
    contamination_lib.contamination({'t': ['a b c']}, ['a b c'], n=0)
  with pytest.raises(ValueError, match='training_texts is empty'):
    contamination_lib.contamination({'t': ['a b c']}, [])


# ---------------------------------------------------------------------------------------------
# Task documents, through lm-eval.


def test_task_documents_are_prompt_plus_gold_answer(tasks_dir):
  docs = contamination_lib.task_documents(['local_mc', 'local_qa', 'local_rolling'], tasks_dir,
                                          limit=3)
  # The group local_qa stands for its leaf tasks.
  assert list(docs) == ['local_mc', 'local_facts', 'local_hindi', 'local_rolling']
  assert [len(d) for d in docs.values()] == [3, 3, 2, 3]
  question, choices = eval_fixtures.MC_QUESTIONS[0]
  assert docs['local_mc'][0] == f'Question: {question}\nAnswer: {choices[0]}'  # The right choice.
  assert docs['local_facts'][1] == f'{FACTS[1][0]} {FACTS[1][1]}'
  assert docs['local_hindi'][0] == f'{HINDI[0][0]} {HINDI[0][1]}'
  assert _words(docs['local_rolling'][2]) == _words(eval_fixtures.DOCUMENTS[2])


def test_task_documents_missing_include_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere does not exist'):
    contamination_lib.task_documents(['local_mc'], str(tmp_path / 'nowhere'))


# ---------------------------------------------------------------------------------------------
# Command line.


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_DATASETS_OFFLINE='1')
  return subprocess.run([sys.executable, '-m', 'lm.eval', 'contamination', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300, check=False)


def test_cli_writes_json_and_markdown_and_prints_the_table(tasks_dir, tmp_path):
  facts1 = _words(f'{FACTS[1][0]} {FACTS[1][1]}')
  hindi1 = _words(f'{HINDI[1][0]} {HINDI[1][1]}')
  source = _write_jsonl(tmp_path / 'train.jsonl', [
      FILLER, ' '.join(facts1[:14]), f'{FILLER} {" ".join(hindi1[3:20])}', FILLER])
  out = tmp_path / 'out'
  run = _run_cli('--tasks', 'local_facts,local_hindi', '--include_path', tasks_dir,
                 '--source', f'jsonl:{source}', '--output_path', str(out))
  assert run.returncode == 0, run.stderr
  with open(out / 'contamination.json', encoding='utf-8') as f:
    result = json.load(f)
  assert result['source'] == f'jsonl:{source}' and result['training_documents'] == 4
  facts, hindi = result['tasks']['local_facts'], result['tasks']['local_hindi']
  assert (facts['contaminated'], facts['shared_ngrams']) == ([1], 2)
  assert (hindi['contaminated'], hindi['shared_ngrams']) == ([1], 5)
  assert hindi['examples'][0]['ngram'] == ' '.join(hindi1[3:16])
  table = (out / 'contamination.md').read_text(encoding='utf-8')
  assert '| local_facts | 5 | 1 | 20.0% | 2 | 0 | 1 |' in table
  assert '| local_hindi | 2 | 1 | 50.0% | 5 | 0 | 1 |' in table
  assert ' '.join(hindi1[3:16]) in table
  assert table in run.stdout and f'wrote {out / "contamination.json"}' in run.stdout


def test_cli_max_docs_and_limit(tasks_dir, tmp_path):
  facts1 = _words(f'{FACTS[1][0]} {FACTS[1][1]}')
  source = _write_jsonl(tmp_path / 'train.jsonl', [FILLER, ' '.join(facts1)])
  contamination_lib.main(['--tasks', 'local_facts', '--include_path', tasks_dir, '--source',
                          f'jsonl:{source}', '--max_docs', '1',
                          '--output_path', str(tmp_path / 'a')])
  with open(tmp_path / 'a' / 'contamination.json') as f:
    capped = json.load(f)
  assert capped['training_documents'] == 1 and capped['tasks']['local_facts']['contaminated'] == []
  contamination_lib.main(['--tasks', 'local_facts', '--include_path', tasks_dir, '--source',
                          f'jsonl:{source}', '--limit', '1', '--output_path', str(tmp_path / 'b')])
  with open(tmp_path / 'b' / 'contamination.json') as f:
    limited = json.load(f)
  assert limited['tasks']['local_facts']['documents'] == 1  # Doc 1, the contaminated one, is cut.
  assert limited['tasks']['local_facts']['contaminated'] == []


def test_cli_error_is_one_line_on_stderr_without_traceback(tmp_path):
  run = _run_cli('--tasks', 'local_facts', '--source', f'jsonl:{tmp_path}/missing/*.jsonl')
  assert run.returncode == 1 and run.stdout == ''
  assert run.stderr == f"error: --source='jsonl:{tmp_path}/missing/*.jsonl': no files match " \
      f"'{tmp_path}/missing/*.jsonl'.\n"


def test_unknown_task_is_named(tmp_path):
  """Slow (about 10 s of CPU): only lm-eval's whole task index can tell that a task is unknown."""
  source = _write_jsonl(tmp_path / 'train.jsonl', [FILLER])
  with pytest.raises(SystemExit) as exit_info:
    contamination_lib.main(['--tasks', 'local_facts,no_such_task_xyz', '--source',
                            f'jsonl:{source}'])
  assert exit_info.value.code.startswith(
      "error: unknown task(s) ['local_facts', 'no_such_task_xyz']: not among the harness's tasks")


@pytest.mark.parametrize('flags, message', [
    ({'--n': '0'}, 'error: --n 0: expected a positive number'),
    ({'--max_docs': '-1'}, 'error: --max_docs -1: expected a positive number'),
    ({'--n': 'three'}, "error: argument --n: invalid int value: 'three'"),
    ({'--tasks': ' , '}, "error: --tasks ' , ' names no task"),
    ({'--include_path': 'NOWHERE'}, 'error: --include_path NOWHERE does not exist'),
    ({'--source': 'jsonl:MISSING'}, "error: --source='jsonl:MISSING': no files match 'MISSING'"),
    ({'--source': 'csv:x'}, "error: --source='csv:x' is not a valid source"),
    ({}, "error: --source='jsonl:EMPTY' holds no text"),  # Read after the tasks load.
])
def test_cli_bad_input_is_one_line(tasks_dir, tmp_path, flags, message):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('{"text": "  "}\n\n')
  paths = dict(NOWHERE=str(tmp_path / 'nowhere'), MISSING=str(tmp_path / 'missing' / '*.jsonl'),
               EMPTY=str(empty))

  def fill(text: str) -> str:
    for name, path in paths.items():
      text = text.replace(name, path)
    return text

  flags = {'--tasks': 'local_facts', '--include_path': tasks_dir, '--source': 'jsonl:EMPTY',
           **flags}
  with pytest.raises(SystemExit) as exit_info:  # What Python prints to stderr, as is.
    contamination_lib.main([fill(part) for flag in flags.items() for part in flag])
  assert isinstance(exit_info.value.code, str) and '\n' not in exit_info.value.code
  assert exit_info.value.code.startswith(fill(message)), exit_info.value.code
