"""How an example becomes text: FLAN-style prompt templates and chat templates with roles.

A rendered example is a list of segments (text, trained). lm.post.data encodes each segment on
its own and lays them out as [BOS] + encode(segment 1) + encode(segment 2) + ... + [EOS]; the
loss covers the trained segments and the EOS. One prompt/response pair is [(prompt, False),
(response, True)], i.e. [BOS] + encode(prompt) + encode(response) + [EOS].

FLAN (Wei et al., 2022; Chung et al., 2022) phrases each task several ways: a template is a list
of (input, target) format strings over the example's fields, and each example is rendered with
one of them, picked by the seed and the example's index (so the same example always reads the
same way, and a resumed run sees what the first one saw).
"""

from collections.abc import Sequence
import dataclasses
import hashlib
import importlib

Segments = list[tuple[str, bool]]

# Name -> (input, target) format strings over an example's fields.
FLAN_TEMPLATES: dict[str, list[tuple[str, str]]] = {
    'instruction': [
        ('{prompt}', '{response}'),
        ('{prompt}\n\nAnswer:', '{response}'),
        ('### Instruction:\n{prompt}\n\n### Response:\n', '{response}'),
        ('Instruction: {prompt}\nOutput:', '{response}'),
    ],
    'qa': [
        ('{question}', '{answer}'),
        ('Question: {question}\nAnswer:', '{answer}'),
        ('Q: {question}\nA:', '{answer}'),
        ('Answer the following question.\n\n{question}', '{answer}'),
    ],
    'translate': [
        ('Translate to {target_language}:\n\n{source}', '{target}'),
        ('{source}\n\nTranslate this into {target_language}.', '{target}'),
        ('How do you say "{source}" in {target_language}?', '{target}'),
        ('{source_language}: {source}\n{target_language}:', '{target}'),
    ],
}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Role markup around each message. The assistant's prefix is context (not trained); its reply
  and the suffix after it are trained, so the model learns to close its own turn."""
  system: str  # Format of a system message, over {content}.
  user: str  # Format of a user message, over {content}.
  assistant_prefix: str
  assistant_suffix: str


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    'chatml': ChatTemplate('<|im_start|>system\n{content}<|im_end|>\n',
                           '<|im_start|>user\n{content}<|im_end|>\n',
                           '<|im_start|>assistant\n', '<|im_end|>\n'),
    'zephyr': ChatTemplate('<|system|>\n{content}\n', '<|user|>\n{content}\n', '<|assistant|>\n',
                           '\n'),
    'plain': ChatTemplate('{content}\n\n', 'User: {content}\n', 'Assistant: ', '\n'),
}
ROLES = ('system', 'user', 'assistant')


def flan_template(name: str) -> list[tuple[str, str]]:
  """FLAN_TEMPLATES[name], or the list a 'module:ATTRIBUTE' names; ValueError naming it if none."""
  if ':' in name:
    module, _, attribute = name.partition(':')
    try:
      pairs = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
      raise ValueError(f'config.post.template={name!r}: {e}') from None
  elif name in FLAN_TEMPLATES:
    pairs = FLAN_TEMPLATES[name]
  else:
    raise ValueError(f'config.post.template={name!r}: expected one of {sorted(FLAN_TEMPLATES)} or '
                     'MODULE:ATTRIBUTE naming a list of (input, target) format strings')
  if not pairs or not all(isinstance(p, Sequence) and len(p) == 2 for p in pairs):
    raise ValueError(f'config.post.template={name!r} is not a non-empty list of (input, target) '
                     'format strings')
  return [tuple(p) for p in pairs]


def pick(pairs: Sequence, seed: int, index: int):
  """The pair example `index` is rendered with: fixed by (seed, index), uniform over pairs."""
  digest = hashlib.blake2b(f'{seed}:{index}'.encode(), digest_size=8).digest()
  return pairs[int.from_bytes(digest, 'little') % len(pairs)]


def render_pair(record: dict, pair: tuple[str, str], where: str) -> Segments:
  """[(input, False), (target, True)] with the record's fields filled in."""
  try:
    return [(pair[0].format(**record), False), (pair[1].format(**record), True)]
  except (KeyError, IndexError) as e:
    raise ValueError(f'{where}: the template {pair!r} needs field {e} (found {sorted(record)})'
                     ) from None


def render_chat(messages, template: ChatTemplate, where: str) -> Segments:
  """A conversation ([{'role': ..., 'content': ...}, ...]) as segments: every assistant reply
  trained, everything else context. It must hold at least one assistant message."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f'{where}: messages must be a non-empty list of {{role, content}} objects')
  segments = []
  for i, message in enumerate(messages):
    if not (isinstance(message, dict) and message.get('role') in ROLES
            and isinstance(message.get('content'), str)):
      raise ValueError(f'{where}: message {i} is not {{"role": one of {ROLES}, "content": str}}: '
                       f'{message!r}')
    role, content = message['role'], message['content']
    if role == 'assistant':
      segments += [(template.assistant_prefix, False),
                   (content + template.assistant_suffix, True)]
    else:
      segments.append((getattr(template, role).format(content=content), False))
  if not any(trained for _, trained in segments):
    raise ValueError(f'{where}: the conversation has no assistant message to train on')
  return segments

