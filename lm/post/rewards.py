"""Programmatic rewards for mode='ppo' and 'grpo' (config.post.reward_function=
'lm.post.rewards:NAME'): scores that need no reward model, so the offline configs and the
tests have a preference to learn. Each is called as TRL calls its reward functions,
fn(prompts=[str], completions=[str], **record_fields) -> [float], one score per completion.
"""

import keyword
import re

_WORD = re.compile(r'[A-Za-z_]+')
_KEYWORDS = frozenset(keyword.kwlist)


def keyword_density(prompts, completions, **_):
  """The share of a completion's words that are Python keywords (0 for no words): a style
  preference a model of Python code can learn within a few dozen steps."""
  del prompts
  scores = []
  for text in completions:
    words = _WORD.findall(text)
    scores.append(sum(w in _KEYWORDS for w in words) / len(words) if words else 0.0)
  return scores


def vowel_share(prompts, completions, **_):
  """The share of a completion's letters that are vowels (0 for no letters)."""
  del prompts
  scores = []
  for text in completions:
    letters = [c for c in text.lower() if c.isalpha()]
    scores.append(sum(c in 'aeiou' for c in letters) / len(letters) if letters else 0.0)
  return scores
