"""lm.eval compare: its rows are what harness.evaluate and perplexity.evaluate_source give each
checkpoint alone; the table, JSON and PNG; the CLI; bad input as one line. Local tasks and files
only (tests/eval_fixtures.py), HF_DATASETS_OFFLINE=1."""

import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest

import eval_fixtures
from lm.eval import compare as compare_lib
from lm.eval import harness
from lm.eval import perplexity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 2
MAX_DOCS = 3
ENGLISH = ['The cat sat on the mat and looked at the rain.', 'Good morning; the house is red.',
           'A quick brown fox jumps over the lazy dog.', 'This one is past max_docs.']
HINDI = ['मेरा नाम राम है और मैं दिल्ली में रहता हूँ।', 'आज मौसम बहुत अच्छा है।',
         'यह घर लाल है।', 'यह max_docs के बाद है।']


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('DISABLE_MULTIPROC', '1')


@pytest.fixture(scope='module', autouse=True)
def _one_task_index():
  """Every TaskManager here is one index per include_path: building the index of lm-eval's own
  task YAMLs takes ~15 s on two cores, and compare and evaluate each build one per call."""
  import lm_eval.tasks  # pylint: disable=g-import-not-at-top
  managers = {}
  real = lm_eval.tasks.TaskManager

  def shared(include_path=None, **kwargs):
    key = (str(include_path), repr(sorted(kwargs.items())))
    if key not in managers:
      managers[key] = real(include_path=include_path, **kwargs)
    return managers[key]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(lm_eval.tasks, 'TaskManager', shared)
    yield


@pytest.fixture(scope='module')
def other_llama(tiny_llama, tmp_path_factory):
  """A second tiny Llama, other random weights, the same tokenizer (copied, not retrained)."""
  directory = str(tmp_path_factory.mktemp('other_llama'))
  shutil.copyfile(tiny_llama.tokenizer, os.path.join(directory, 'spm.model'))
  return eval_fixtures.build_tiny_llama(directory, seed=1)


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """A two-source mixture, one of text files and one JSONL, in the config.data.mixture spelling."""
  directory = tmp_path_factory.mktemp('sources')
  (directory / 'en').mkdir()
  for i, text in enumerate(ENGLISH):
    (directory / 'en' / f'{i}.txt').write_text(text, encoding='utf-8')
  with open(directory / 'hi.jsonl', 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(dict(text=t), ensure_ascii=False) + '\n' for t in HINDI)
  return f'en=text:{directory}/en/*.txt@0.5; hi=jsonl:{directory}/hi.jsonl@0.5'


@pytest.fixture(scope='module')
def compared(tiny_llama, other_llama, local_tasks, sources):
  """compare() on base, other and base again, recording which models are alive at each load."""
  include, names = local_tasks
  alive_at_load, loaded = [], []

  class RecordingModel(harness.LMEvalModel):
    def __init__(self, **kwargs):
      alive_at_load.append([ref() is not None for ref in loaded])
      super().__init__(**kwargs)
      loaded.append(weakref.ref(self))

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(harness, 'LMEvalModel', RecordingModel)
    patch.setenv('HF_DATASETS_OFFLINE', '1')
    patch.setenv('DISABLE_MULTIPROC', '1')
    rows = compare_lib.compare(
        {'base': tiny_llama.lm, 'other': other_llama.lm, 'again': tiny_llama.lm},
        tasks=[names['mc'], names['rolling']], include_path=include, sources=sources,
        max_docs=MAX_DOCS, dtype='float32', limit=LIMIT)
  return rows, alive_at_load


def _alone(checkpoint, local_tasks, sources):
  include, names = local_tasks
  model = harness.LMEvalModel(checkpoint=checkpoint, dtype='float32')
  results = harness.evaluate(None, [names['mc'], names['rolling']], include_path=include,
                             model=model, limit=LIMIT)
  return results, perplexity.evaluate_source(model.scorer, sources, max_docs=MAX_DOCS)


def test_rows_are_what_each_checkpoint_gets_alone(compared, tiny_llama, other_llama, local_tasks,
                                                  sources):
  rows, _ = compared
  assert set(rows) == {'local_mc/acc', 'local_mc/acc_norm', 'local_rolling/bits_per_byte',
                       'local_rolling/word_perplexity', 'en/bits_per_byte', 'hi/bits_per_byte'}
  for name, checkpoint in (('base', tiny_llama.lm), ('other', other_llama.lm)):
    results, scores = _alone(checkpoint, local_tasks, sources)
    for label, row in rows.items():
      if row['kind'] == 'task':
        metrics = results['results'][row['task']]
        assert row['values'][name] == metrics[f'{row["metric"]},none'], (label, name)
        stderr = metrics[f'{row["metric"]}_stderr,none']
        assert row['stderr'][name] == (None if stderr == 'N/A' else stderr), (label, name)
        assert row['higher_is_better'] == results['higher_is_better'][row['task']][row['metric']]
      else:
        assert row['values'][name] == scores[row['source']]['bits_per_byte'], (label, name)
        assert row['details'][name] == scores[row['source']], (label, name)
        assert row['details'][name]['documents'] == MAX_DOCS
        assert row['higher_is_better'] is False and row['stderr'][name] is None
  assert rows['local_mc/acc']['stderr']['base'] is not None  # The harness gives one for acc.


def test_the_same_checkpoint_twice_gives_the_same_row_and_another_one_differs(compared):
  rows, _ = compared
  for label, row in rows.items():
    assert row['values']['again'] == row['values']['base'], label
    assert row['stderr']['again'] == row['stderr']['base'], label
  for label in ('en/bits_per_byte', 'hi/bits_per_byte', 'local_rolling/bits_per_byte'):
    assert rows[label]['values']['other'] != rows[label]['values']['base'], label


def test_each_checkpoint_is_freed_before_the_next_loads(compared):
  _, alive_at_load = compared
  assert alive_at_load == [[], [False], [False, False]]


def test_the_best_follows_the_direction_and_ties_mark_none(compared):
  rows, _ = compared
  for label in ('en/bits_per_byte', 'hi/bits_per_byte'):
    values = rows[label]['values']
    lowest = min(values.values())
    assert rows[label]['best'] == [n for n, v in values.items() if v == lowest], label
  best = compare_lib.best_names
  assert best({'a': 0.5, 'b': 0.7, 'c': 0.7}, True) == ['b', 'c']
  assert best({'a': 0.5, 'b': 0.7, 'c': None}, False) == ['a']
  assert best({'a': 0.5, 'b': 0.5}, True) == []  # Nothing to single out.
  assert best({'a': 0.5, 'b': 0.7}, None) == []  # The harness gave no direction.


def test_the_table_marks_direction_best_and_stderr():
  def row(higher_is_better, values, stderr, best):
    return dict(higher_is_better=higher_is_better, values=dict(zip(('base', 'hindi'), values)),
                stderr=dict(zip(('base', 'hindi'), stderr)), best=best)

  rows = {'mc/acc': row(True, (0.25, 0.5), (0.125, 0.25), ['hindi']),
          'hi/bits_per_byte': row(False, (3.0, 1.23456), (None, None), ['hindi']),
          'x/ppl': row(None, (12345678.0, None), (None, None), [])}
  lines = compare_lib.format_table(rows).splitlines()
  assert lines[0] == '| metric | | base | hindi |'
  assert lines[2] == '| mc/acc | ↑ | 0.2500 ± 0.1250 | **0.5000 ± 0.2500** |'
  assert lines[3] == '| hi/bits_per_byte | ↓ | 3.0000 | **1.2346** |'
  assert lines[4] == '| x/ppl |  | 1.235e+07 | n/a |'


def test_outputs_round_trip_and_the_png_reads_back(compared, tmp_path):
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  rows, _ = compared
  paths = compare_lib.write_outputs(rows, str(tmp_path), sources='en=...', limit=LIMIT)
  assert [os.path.basename(p) for p in paths] == ['compare.md', 'compare.json', 'compare.png']
  with open(paths[1], encoding='utf-8') as f:
    assert json.load(f) == dict(settings=dict(sources='en=...', limit=LIMIT), rows=rows)
  table = (tmp_path / 'compare.md').read_text(encoding='utf-8')
  assert all(f'| {label} |' in table for label in rows)
  with open(paths[2], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  image = matplotlib.image.imread(paths[2])
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _cli(*args):
  env = dict(os.environ, HF_DATASETS_OFFLINE='1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'lm.eval', 'compare', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_writes_the_table_json_and_chart(compared, tiny_llama, other_llama, sources,
                                              tmp_path):
  """Sources only: with tasks, the subprocess would build lm-eval's task index three times."""
  out = tmp_path / 'out'
  result = _cli('--checkpoints', f'{tiny_llama.lm},{other_llama.lm}', '--names', 'base,other',
                '--sources', sources, '--max_docs', str(MAX_DOCS), '--dtype', 'float32',
                '--output_path', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['compare.json', 'compare.md', 'compare.png']
  with open(out / 'compare.json', encoding='utf-8') as f:
    report = json.load(f)
  assert report['settings']['checkpoints'] == {'base': tiny_llama.lm, 'other': other_llama.lm}
  assert set(report['rows']) == {'en/bits_per_byte', 'hi/bits_per_byte'}
  rows, _ = compared
  for label, row in report['rows'].items():
    for name in ('base', 'other'):
      assert row['values'][name] == pytest.approx(rows[label]['values'][name], rel=1e-6)
  assert '| en/bits_per_byte | ↓ |' in result.stdout
  assert (out / 'compare.md').read_text(encoding='utf-8') in result.stdout


def test_main_passes_the_task_flags_through(compared, tiny_llama, other_llama, local_tasks,
                                            tmp_path, capsys):
  include, names = local_tasks
  compare_lib.main(['--checkpoints', f'{other_llama.lm},{tiny_llama.lm}', '--tasks', names['mc'],
                    '--include_path', include, '--limit', str(LIMIT), '--num_fewshot', '0',
                    '--dtype', 'float32', '--output_path', str(tmp_path)])
  with open(tmp_path / 'compare.json', encoding='utf-8') as f:
    report = json.load(f)
  # Default names are the shortest path tails that differ: here the fixtures' folders.
  other, base = (os.path.relpath(p, os.path.dirname(os.path.dirname(p)))
                 for p in (other_llama.lm, tiny_llama.lm))
  assert list(report['settings']['checkpoints']) == [other, base]
  assert report['settings']['limit'] == LIMIT and report['settings']['num_fewshot'] == 0
  rows, _ = compared
  assert set(report['rows']) == {'local_mc/acc', 'local_mc/acc_norm'}
  for label, row in report['rows'].items():
    assert row['values'] == {other: rows[label]['values']['other'],
                             base: rows[label]['values']['base']}, label
  assert 'wrote' in capsys.readouterr().out


def _error(argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    compare_lib.main(argv)
  message = exit_info.value.code
  assert isinstance(message, str) and message.startswith('error: ') and '\n' not in message
  return message


def test_bad_input_is_a_one_line_error(tiny_llama, other_llama, local_tasks, sources, tmp_path):
  include, names = local_tasks
  both = f'{tiny_llama.lm},{other_llama.lm}'
  out = ['--output_path', str(tmp_path / 'out')]
  mc = ['--tasks', names['mc'], '--include_path', include]
  assert 'two or more' in _error(['--checkpoints', tiny_llama.lm, *mc, *out])
  assert '1 names' in _error(['--checkpoints', both, '--names', 'base', *mc, *out])
  assert 'repeats' in _error(['--checkpoints', both, '--names', 'a,a', *mc, *out])
  assert '--tasks' in _error(['--checkpoints', both, *out])
  assert 'output_path' in _error(['--checkpoints', both, *mc])
  nowhere = str(tmp_path / 'nowhere')
  assert f'{nowhere} does not exist' in _error(['--checkpoints', f'{tiny_llama.lm},{nowhere}',
                                                *mc, *out])
  assert f'include_path {nowhere} does not exist' in _error(
      ['--checkpoints', both, '--tasks', names['mc'], '--include_path', nowhere, *out])
  no_tokenizer = eval_fixtures.without_tokenizer(tiny_llama.lm, str(tmp_path / 'no_tokenizer'))
  assert 'has no tokenizer' in _error(['--checkpoints', f'{tiny_llama.lm},{no_tokenizer}',
                                       *mc, *out])
  assert 'no_such_task' in _error(['--checkpoints', both, '--tasks', 'no_such_task',
                                   '--include_path', include, *out])
  assert 'nowhere' in _error(['--checkpoints', both, '--sources', f'hi=text:{nowhere}/*.txt@1',
                              *out])
  assert not (tmp_path / 'out').exists()
