import collections

import pytest

from lm.post import templates

PAIRS = [('Q: {question}\nA:', '{answer}'), ('{question}', '{answer}')]


def test_a_pair_renders_the_record_as_untrained_input_and_trained_target():
  record = {'question': 'Capital of France?', 'answer': ' Paris'}
  assert templates.render_pair(record, PAIRS[0], 'x') == [
      ('Q: Capital of France?\nA:', False), (' Paris', True)]
  with pytest.raises(ValueError, match=r"f.jsonl:3: the template .* needs field 'answer' "
                     r"\(found \['question'\]\)"):
    templates.render_pair({'question': 'q'}, PAIRS[0], 'f.jsonl:3')


def test_the_pick_is_fixed_by_seed_and_index_and_covers_every_phrasing():
  pairs = templates.FLAN_TEMPLATES['qa']
  picks = [templates.pick(pairs, 0, i) for i in range(400)]
  assert picks == [templates.pick(pairs, 0, i) for i in range(400)]
  counts = collections.Counter(picks)
  assert set(counts) == set(pairs) and min(counts.values()) > 60  # ~100 each.
  assert picks != [templates.pick(pairs, 1, i) for i in range(400)]


def test_named_and_importable_templates():
  assert templates.flan_template('translate') == templates.FLAN_TEMPLATES['translate']
  assert templates.flan_template('test_post_templates:PAIRS') == PAIRS
  with pytest.raises(ValueError, match="'nope': expected one of"):
    templates.flan_template('nope')
  with pytest.raises(ValueError, match='no_such_module'):
    templates.flan_template('no_such_module:X')


def test_a_conversation_trains_every_assistant_reply_and_its_turn_end():
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
              {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Bye'},
              {'role': 'assistant', 'content': 'Bye.'}]
  segments = templates.render_chat(messages, templates.CHAT_TEMPLATES['chatml'], 'x')
  assert segments == [
      ('<|im_start|>system\nBe brief.<|im_end|>\n', False),
      ('<|im_start|>user\nHi<|im_end|>\n', False), ('<|im_start|>assistant\n', False),
      ('Hello.<|im_end|>\n', True), ('<|im_start|>user\nBye<|im_end|>\n', False),
      ('<|im_start|>assistant\n', False), ('Bye.<|im_end|>\n', True)]
  chat = templates.CHAT_TEMPLATES['plain']
  with pytest.raises(ValueError, match='no assistant message'):
    templates.render_chat([{'role': 'user', 'content': 'Hi'}], chat, 'x')
  with pytest.raises(ValueError, match='message 0 is not'):
    templates.render_chat([{'role': 'robot', 'content': 'Hi'}], chat, 'x')
  with pytest.raises(ValueError, match='non-empty list'):
    templates.render_chat('Hi', chat, 'x')
