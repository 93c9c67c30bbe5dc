"""`python -m lm.prepare` end to end: decisions for every input document, the report, one and two
workers, a killed run resumed, and bad input reported in one line."""

import json
import os
import subprocess
import sys

import pytest

from lm import sources
from lm.prepare import config as config_lib
from lm.prepare import pipeline
from lm.prepare import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENGLISH = [
    'The river rose quickly after three days of heavy rain in the hills.',
    'Farmers moved their cattle to higher ground before the water reached the fields.',
    'The school on the edge of the village opened its doors to the families.',
    'Volunteers cooked rice and lentils for everyone who had to leave their homes.',
    'By the end of the week the water had gone down and people began to return.',
    'The old library in the town square has been restored after many years.',
    'Its wooden shelves were repaired by carpenters who learned the craft from their fathers.',
    'Children now come in the afternoon to read and to do their homework.',
    'The librarian says that the most popular books are stories about animals.',
    'On Saturdays a group of retired teachers reads aloud to the youngest visitors.',
    'A small bakery on the corner starts baking bread at four in the morning.',
    'The owner learned to bake from her grandmother, who ran the shop before her.',
    'Her bread is made with flour from a mill that is only a few miles away.',
    'People wait in a long line every morning, even when it is cold and dark.',
    'She says that good bread needs time, patience and a very hot oven.',
    'The city council voted to plant two thousand trees along the main roads.',
    'The trees will give shade in summer and help to keep the streets cool.',
    'Each neighbourhood can choose which kinds of trees it would like to have.',
    'Students from the local college will water the young trees during the first year.',
    'The council hopes that the plan will make the city a better place to live.',
    'The football team trained every evening for the final match of the season.',
    'Their coach told them to pass the ball quickly and to keep their shape.',
    'On the day of the match the stadium was full and the crowd was loud.',
    'The team scored a goal in the last minute and won the cup for the town.',
    'After the match the players thanked their families and the supporters.',
    'A new train line now connects the two largest cities in the region.',
    'The journey that used to take five hours now takes less than two.',
    'Many people use the train to travel to work and to visit their relatives.',
    'The trains are clean and quiet, and most of them leave on time.',
    'The company plans to add more trains in the morning and in the evening.',
]
HINDI = [
    'भारत एक विशाल देश है जिसमें अनेक भाषाएँ बोली जाती हैं।',
    'हिमालय पर्वत देश के उत्तर में स्थित है और बहुत ऊँचा है।',
    'गंगा नदी का पानी लाखों किसानों के खेतों को सींचता है।',
    'दिल्ली इस देश की राजधानी है और यहाँ संसद भवन भी है।',
    'बच्चे सुबह जल्दी उठकर विद्यालय जाते हैं और पढ़ाई करते हैं।',
    'गाँव के लोग शाम को चौपाल पर बैठकर बातें करते हैं।',
    'बारिश के मौसम में खेतों में धान की फसल बोई जाती है।',
    'मेरी दादी हर रात हमें पुरानी कहानियाँ सुनाती थीं।',
    'पुस्तकालय में हजारों किताबें हैं जिन्हें कोई भी पढ़ सकता है।',
    'रेलगाड़ी समय पर स्टेशन पहुँची और यात्री उतरने लगे।',
    'बाजार में आज सब्ज़ियों के दाम पिछले हफ्ते से कम थे।',
    'डॉक्टर ने कहा कि रोज़ व्यायाम करना सेहत के लिए अच्छा है।',
]
FRENCH = ("Le comité s'est réuni mardi pour discuter du nouveau budget des écoles. Les parents ont "
          'demandé plus de professeurs. La mairie a promis une réponse avant la fin du mois.')


def _write_corpus(directory):
  """web.jsonl (English, Hindi and the cases each stage removes), two text files and evaluation
  data; returns ({id: (stage, reason)} expected, the config)."""
  en = [' '.join(ENGLISH[i:i + 5]) for i in range(0, 30, 5)]
  hi = [' '.join(HINDI[i:i + 4]) for i in range(0, 12, 4)]
  web = [dict(id='en0', text=en[0]), dict(id='en1', text=en[1] + ' Mail jane@example.com now.'),
         dict(text=en[2]), dict(id='hi0', text=hi[0]), dict(id='hi1', text=hi[1]),
         dict(id='empty', text=' \n '), dict(id='fr', text=FRENCH),
         dict(id='short', text='The weather was cold, so the children stayed at home with books.'),
         dict(id='lorem', text=en[3] + '\nLorem ipsum dolor sit amet, consectetur.'),
         dict(id='copy', text=en[0].replace(' ', '  ').replace('.', '!')), dict(id='contaminated', text=en[4])]
  with open(os.path.join(directory, 'web.jsonl'), 'wb') as f:
    for record in web:
      f.write(json.dumps(record, ensure_ascii=False).encode() + b'\n\n')
    first, rest = en[5].split('. ', 1)
    f.write(b'{"id": "bad-bytes", "text": "' + first.encode() + b'. \xff\xfe ' + rest.encode()
            + b'"}\n')
  os.makedirs(os.path.join(directory, 'books'))
  with open(os.path.join(directory, 'books', 'hi2.txt'), 'w', encoding='utf-8') as f:
    f.write(hi[2])
  with open(os.path.join(directory, 'books', 'near.txt'), 'w', encoding='utf-8') as f:
    f.write('Indeed, ' + en[1])  # A near duplicate of en1.
  with open(os.path.join(directory, 'eval.jsonl'), 'w', encoding='utf-8') as f:
    f.write(json.dumps(dict(text=' '.join(en[4].split()[3:20]))) + '\n')
  expected = {
      'en0': (None, None), 'en1': (None, None), f'{directory}/web.jsonl:5': (None, None),
      'hi0': (None, None), 'hi1': (None, None), 'empty': ('read', 'empty'),
      'fr': ('language', 'other_language'), 'short': ('gopher_quality', 'gopher_short_doc'),
      'lorem': ('c4_quality', 'lorem_ipsum'), 'copy': ('exact_dedup', 'exact_duplicate: of en0'),
      'contaminated': ('decontamination', 'shared_13_grams'), 'bad-bytes': (None, None),
      f'{directory}/books/hi2.txt': (None, None),
      f'{directory}/books/near.txt': ('near_dedup', 'near_duplicate'),
  }
  overrides = {'inputs': f'web=jsonl:{directory}/web.jsonl; books=text:{directory}/books/*.txt',
               'quality.gopher.min_doc_words': 20, 'quality.c4.min_num_sentences': 3,
               'decontamination.source': f'jsonl:{directory}/eval.jsonl',
               'tokenize.enabled': False}  # Too little text to train a tokenizer on.
  return expected, overrides


def _config(overrides):
  config = config_lib.base_config()
  for dotted, value in overrides.items():
    *parents, field = dotted.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[field] = value
  return config


def _outputs(out):
  """decisions.jsonl, the kept documents (sorted by input order) and the report's counts."""
  decisions = open(os.path.join(out, 'decisions.jsonl'), encoding='utf-8').read()
  documents = []
  for language in sorted(os.listdir(os.path.join(out, 'documents'))):
    for name in sorted(os.listdir(os.path.join(out, 'documents', language))):
      with open(os.path.join(out, 'documents', language, name), encoding='utf-8') as f:
        documents += [json.loads(line) for line in f]
  documents.sort(key=lambda d: d['metadata']['order'])
  report = json.load(open(os.path.join(out, 'report.json'), encoding='utf-8'))
  for key in ('wall_seconds', 'end_to_end', 'tasks', 'workers'):
    report.pop(key)
  for stage in report['stages']:
    for key in ('seconds', 'documents_per_second', 'mb_per_second'):
      stage.pop(key)
  return decisions, documents, report


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """The corpus, prepared in this process with one worker."""
  directory = str(tmp_path_factory.mktemp('corpus'))
  expected, overrides = _write_corpus(directory)
  out = os.path.join(directory, 'out')
  pipeline.prepare(_config(overrides), out)
  return directory, expected, overrides, out


def test_every_document_gets_a_decision(prepared):
  directory, expected, _, out = prepared
  decisions = [json.loads(line) for line in open(os.path.join(out, 'decisions.jsonl'))]
  assert [d['id'] for d in decisions] == list(expected)  # Input order; ids assigned.
  for d in decisions:
    stage, reason = expected[d['id']]
    assert d['kept'] == (stage is None) and d['stage'] == stage, d
    assert (d['reason'] or '').split(':')[0] == (reason or '').split(':')[0], d
    if stage == 'exact_dedup':
      assert d['reason'] == reason
  _, documents, report = _outputs(out)
  kept = {d['id']: d for d in documents}
  assert set(kept) == {i for i, (stage, _) in expected.items() if stage is None}
  assert kept['en1']['text'].endswith('Mail <EMAIL> now.')
  assert '. \ufffd\ufffd ' in kept['bad-bytes']['text']
  assert {d['metadata']['language'] for d in documents} == {'en', 'hi'}
  assert sorted(os.listdir(os.path.join(out, 'documents'))) == ['en', 'hi']
  assert report['read'] == dict(non_utf8_documents=1, assigned_ids=3)
  assert report['documents_in'] == len(expected) and report['documents_out'] == len(kept)
  stage = {s['name']: s for s in report['stages']}
  assert list(stage) == ['read', 'language', 'gopher_quality', 'gopher_repetition',
                         'c4_quality', 'pii', 'exact_dedup', 'near_dedup', 'decontamination']
  assert stage['language']['removed']['other_language']['languages'] == {'fr': 1}
  assert stage['pii']['counters'] == dict(emails=1, documents_with_pii=1)
  assert stage['near_dedup']['removed']['near_duplicate']['documents'] == 1
  assert stage['c4_quality']['languages']['hi']['documents_out'] == 3
  for s in report['stages']:  # Each stage passes on what the next one takes in.
    following = report['stages'][report['stages'].index(s) + 1:]
    if following:
      assert s['documents_out'] == following[0]['documents_in'], s['name']
      assert s['words_out'] == following[0]['words_in'], s['name']
  assert os.path.getsize(os.path.join(out, 'report.png')) > 10_000
  assert directory


def test_cli_with_two_workers_writes_the_same(prepared, tmp_path):
  _, _, overrides, out = prepared
  args = [f'--config.{key}={value}' for key, value in overrides.items()]
  result = subprocess.run(
      [sys.executable, '-m', 'lm.prepare', '--config',
       os.path.join(ROOT, 'configs', 'prepare', 'default.py'), '--workdir', str(tmp_path / 'out'),
       '--config.workers=2', *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'kept 7 of 14 documents' in result.stdout
  assert json.load(open(tmp_path / 'out' / 'report.json'))['tasks'] == 2
  assert _outputs(str(tmp_path / 'out')) == _outputs(out)


def test_a_killed_run_resumes(prepared, tmp_path, monkeypatch):
  _, _, overrides, out = prepared
  config = _config({**overrides, 'tasks': 2})
  decide = stages.PII.decide

  def killed(self, doc):
    if doc.metadata['order'] == [0, 1]:  # en1, in task 1 of 2.
      raise KeyboardInterrupt('killed')
    return decide(self, doc)

  monkeypatch.setattr(stages.PII, 'decide', killed)
  with pytest.raises(KeyboardInterrupt):
    pipeline.prepare(config, str(tmp_path / 'out'))
  completions = tmp_path / 'out' / 'work' / 'logs' / 'documents' / 'completions'
  assert os.listdir(completions) == ['00000']
  assert not (tmp_path / 'out' / 'work' / 'records' / 'pii' / '00001.json').exists()
  finished = os.path.getmtime(tmp_path / 'out' / 'work' / 'records' / 'read' / '00000.json')

  monkeypatch.setattr(stages.PII, 'decide', decide)
  pipeline.prepare(config, str(tmp_path / 'out'))
  assert os.path.getmtime(tmp_path / 'out' / 'work' / 'records' / 'read' / '00000.json') == (
      finished)  # Task 0 was not run again.
  assert _outputs(str(tmp_path / 'out')) == _outputs(out)
  config.dedup.threshold = 0.7
  with pytest.raises(config_lib.ConfigError, match=r"another config \(fields \['dedup.threshold'\]"):
    pipeline.prepare(config, str(tmp_path / 'out'))


def test_bad_input_is_one_clear_error(tmp_path, monkeypatch):
  blank = tmp_path / 'blank.jsonl'
  blank.write_text('{"text": "  "}\n{"text": ""}\n')
  config = config_lib.base_config()
  config.language.enabled = False
  config.source = f'jsonl:{blank}'
  with pytest.raises(sources.DataError, match='holds no text: 2 documents, all empty'):
    pipeline.prepare(config, str(tmp_path / 'a'))
  config.source = f'jsonl:{tmp_path}/missing/*.jsonl'
  with pytest.raises(sources.DataError, match='no files match'):
    pipeline.prepare(config, str(tmp_path / 'b'))
  (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\n{"body": "no text"}\n')
  config.source = f'jsonl:{tmp_path}/bad.jsonl'
  with pytest.raises(sources.DataError, match=r'bad.jsonl:2: no string field text_field=.text.'):
    pipeline.prepare(config, str(tmp_path / 'c'))
  config.source, config.inputs = 'stdlib', 'a=stdlib'
  with pytest.raises(config_lib.ConfigError, match='set exactly one of config.source'):
    pipeline.prepare(config, str(tmp_path / 'd'))
  config.inputs, config.language.enabled = '', True
  real_find_spec = config_lib.importlib.util.find_spec
  monkeypatch.setattr(config_lib.importlib.util, 'find_spec',
                      lambda name: None if name == 'py3langid' else real_find_spec(name))
  with pytest.raises(config_lib.ConfigError, match=r"py3langid package.*pip install -e '.\[prepare\]'"):
    config_lib.validate(config)


def test_cli_names_a_misspelled_field(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'lm.prepare', '--config',
       os.path.join(ROOT, 'configs', 'prepare', 'default.py'), '--workdir', str(tmp_path),
       '--config.source=stdlib', '--config.quality.gopher.min_words=3'],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: no such config field')
