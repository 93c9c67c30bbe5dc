import os

from lm import sample_texts


def test_a_local_copy_wins_and_the_split_holds_out_the_last_tenth(tmp_path, monkeypatch):
  local = tmp_path / 'hindi.txt'
  local.write_text('\n'.join(f'पंक्ति {i}' for i in range(20)), encoding='utf-8')
  monkeypatch.setenv('LM_HINDI_TEXT', str(local))
  text = sample_texts.text_or_stand_in('hindi', download=False)
  train, test = sample_texts.write_split(str(tmp_path), 'hindi', text, max_chars=10_000)
  assert open(train, encoding='utf-8').read().splitlines() == [f'पंक्ति {i}' for i in range(18)]
  assert open(test, encoding='utf-8').read().splitlines() == ['पंक्ति 18', 'पंक्ति 19']


def test_offline_without_a_copy_the_stand_ins_are_used(tmp_path, monkeypatch):
  monkeypatch.setattr(sample_texts, 'DATA_DIR', str(tmp_path))
  for language in ('english', 'hindi'):
    monkeypatch.delenv(f'LM_{language.upper()}_TEXT', raising=False)
    assert sample_texts.real_text(language, download=False) is None
  assert sample_texts.text_or_stand_in('hindi', download=False).startswith('भारत')
  english = sample_texts.text_or_stand_in('english', download=False)
  assert 'def ' in english and len(english) > 100_000  # The standard library's source.
  assert not os.listdir(tmp_path)
