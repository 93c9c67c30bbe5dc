"""Needle in a haystack: can the model find one fact anywhere in a long context?

  python -m lm.eval needle --checkpoint DIR [--lengths 64,128,...] [--depths 0,0.25,0.5,0.75,1]
      [--trials 4] [--filler FILE] [--seed 0] [--batch_size auto] [--dtype auto]
      [--output_path DIR]

A needle ("The secret number is 58213.") is put at depth d (0: first, 1: last) of filler text,
followed by a question ("What is the secret number? The secret number is"); the model greedily
generates MAX_NEW_TOKENS tokens and is right when the needle's number appears in them as a
whole number. A length L is the context the model holds at the end: BOS, filler, needle and
question take exactly L - MAX_NEW_TOKENS tokens, the generation the rest, so L may be as long as
the model's max_length. Prompts are built in tokens: filler sentences are encoded one by one and
the first is cut at a token boundary (from its left, like an excerpt) to fill the length exactly;
the needle goes in at the sentence boundary (the filler's start or a sentence's end) nearest to
d times the filler's tokens, or at that token itself if no boundary lies within SNAP_TOKENS (as
in filler without sentence ends). Trial k draws its number and the order of the filler sentences
from (seed, k) alone, so every cell sees the same needles over the same text and cells differ
only in depth and length.

--output_path writes needle.png (accuracy heatmap: depth down, length across), needle.json (the
grid and every sample's prompt facts and generation) and needle.md (the table printed at the end).
"""

import dataclasses
import json
import os
import re
import sys

import numpy as np
import tqdm

from lm.eval import cli

NEEDLE = 'The secret number is {number}.'
QUESTION = 'What is the secret number? The secret number is'
NUM_DIGITS = 5
# Room for ' 58213.' in any tokenizer: a space, five digits (or fewer merged pieces) and slack.
MAX_NEW_TOKENS = NUM_DIGITS + 3
SNAP_TOKENS = 16  # The needle moves at most this far from its exact depth to a sentence boundary.
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SMALLEST_LENGTH = 64

# Built-in filler: plain statements with no digits and nothing about secrets or numbers, so the
# only number in a prompt is the needle's. Shuffled per trial and repeated as far as needed.
FILLER_SENTENCES = (
    'The river bends twice before it reaches the old stone bridge.',
    'Most of the village wakes early to bake bread for the market.',
    'A gentle wind moved through the tall grass behind the farmhouse.',
    'The library keeps its oldest maps in a cool room under the stairs.',
    'Children in the park were flying kites shaped like birds and fish.',
    'Every autumn the maple trees along the avenue turn a deep red.',
    'The baker insists that good dough needs patience more than skill.',
    'A small boat drifted slowly across the calm surface of the lake.',
    'The museum added a new wing for paintings of the northern coast.',
    'Rain fell all afternoon, and the streets shone under the lamps.',
    'Her grandmother taught her to knit scarves during the long winters.',
    'The train to the capital leaves from the platform beside the clock.',
    'Bees gathered around the lavender that grew along the garden wall.',
    'The old lighthouse has guided fishing boats home for generations.',
    'He packed a simple lunch of cheese, apples and fresh bread.',
    'The mountain trail is steep at first but levels out near the ridge.',
    'Owls call to each other in the forest long after the sun has set.',
    'The café on the corner serves strong coffee and warm pastries.',
    'A thin layer of frost covered the windows on the first cold morning.',
    'The choir rehearsed their songs in the chapel every Thursday evening.',
    'Sailors once read the stars to find their way across the open sea.',
    'The garden was full of tomatoes, beans and bright yellow squash.',
    'Snow muffled every sound in the valley until the world seemed asleep.',
    'The teacher read aloud from a book of stories about distant lands.',
    'Fresh paint made the little blue door stand out on the grey street.',
    'The orchard smelled of ripe pears at the end of the summer.',
    'A cat slept in a patch of sunlight on the wooden kitchen floor.',
    'The market square fills with music and laughter on festival days.',
    'Clouds gathered over the hills, promising a storm before nightfall.',
    'The carpenter smoothed the table until the grain shone like silk.',
    'Travelers rested at the inn before crossing the mountain pass.',
    'The pond was home to frogs, dragonflies and a family of ducks.',
    'An old clock ticked steadily in the hallway of the quiet house.',
    'The fishermen mended their nets while the gulls circled overhead.',
    'Wildflowers covered the meadow in shades of purple and white.',
    'The potter shaped the wet clay into a tall and graceful vase.',
    'Lanterns glowed along the canal as the evening crowds strolled by.',
    'The shepherd led his flock down from the high pastures in spring.',
    'A quiet reading room is the best place to spend a rainy day.',
    'The bridge was painted green so that it would match the trees.',
)


@dataclasses.dataclass
class Prompt:
  """One needle prompt in tokens and where its needle went."""
  tokens: list[int]  # BOS, filler with the needle inside, question.
  needle_start: int  # Index in `tokens` of the needle's first token.
  filler_tokens: int  # Filler tokens around the needle (the depth is measured over these).

  @property
  def depth(self) -> float:
    """Filler tokens before the needle over all filler tokens: the depth actually used."""
    return (self.needle_start - 1) / self.filler_tokens if self.filler_tokens else 0.0


def filler_sentences(text: str) -> list[str]:
  """Sentences of `text` (cut after . ! ? or at blank lines), whitespace collapsed."""
  pieces = re.split(r'(?<=[.!?])\s+|\n\s*\n', text)
  return [' '.join(p.split()) for p in pieces if p.strip()]


def build_prompt(tokenizer, sentences_ids: list[list[int]], length: int, depth: float,
                 number: str, rng: np.random.Generator) -> Prompt:
  """A prompt of exactly length - MAX_NEW_TOKENS tokens with the needle at `depth`.

  sentences_ids: each filler sentence encoded on its own; they are drawn in rng's permutations,
  one after another, until the filler is long enough, and the first one loses tokens from its
  left, so that every later sentence, the last included, is whole. The needle goes at the start
  of the filler or after a whole sentence, whichever is nearest to depth times the filler tokens.
  """
  needle_ids = tokenizer.encode(NEEDLE.format(number=number))
  question_ids = tokenizer.encode(QUESTION)
  budget = length - MAX_NEW_TOKENS - 1 - len(needle_ids) - len(question_ids)
  if budget < 0:
    raise ValueError(f'length {length} is too short: BOS, the needle ({len(needle_ids)} tokens), '
                     f'the question ({len(question_ids)}) and {MAX_NEW_TOKENS} generated tokens '
                     f'need {length - budget}')
  filler, ends = [], []
  while len(filler) < budget:
    for i in rng.permutation(len(sentences_ids)):
      filler += sentences_ids[i]
      ends.append(len(filler))
      if len(filler) >= budget:
        break
  cut = len(filler) - budget  # From the left: the haystack reads as an excerpt of longer text.
  filler = filler[cut:]
  boundaries = [0] + [end - cut for end in ends if end > cut]
  target = depth * budget
  at = min(boundaries, key=lambda b: (abs(b - target), b))
  if abs(at - target) > SNAP_TOKENS:
    at = round(target)
  tokens = [tokenizer.bos_id] + filler[:at] + needle_ids + filler[at:] + question_ids
  return Prompt(tokens=tokens, needle_start=1 + at, filler_tokens=budget)


def is_correct(number: str, generated: str) -> bool:
  """Whether the number appears in the generation, not as part of a longer run of digits."""
  return re.search(rf'(?<!\d){re.escape(number)}(?!\d)', generated) is not None


def shortest_length(tokenizer, numbers: list[str]) -> int:
  """The least length that holds BOS, each needle, the question and the generated tokens."""
  needle = max(len(tokenizer.encode(NEEDLE.format(number=n))) for n in numbers)
  return 1 + needle + len(tokenizer.encode(QUESTION)) + MAX_NEW_TOKENS


def default_lengths(max_length: int, shortest: int = 0) -> list[int]:
  """64, 128, 256, ... up to max_length, and max_length itself if it is not among them; those
  under `shortest` (what the tokenizer needs for needle and question) left out."""
  lengths = []
  length = SMALLEST_LENGTH
  while length <= max_length:
    lengths.append(length)
    length *= 2
  if not lengths or lengths[-1] != max_length:
    lengths.append(max_length)
  return [L for L in lengths if L >= shortest]


def needle_grid(scorer, lengths: list[int] | None, depths: list[float], trials: int, seed: int,
                filler_text: str) -> dict:
  """Retrieval accuracy per (depth, length): accuracy[i][j] is depths[i] at lengths[j].

  scorer: anything with .tokenizer (encode, decode, bos_id), .max_length and
  .generate(prompts, *, max_new_tokens, until, temperature) -> texts, as lm.eval.scoring.Scorer.
  lengths: None for default_lengths. The dict also holds every sample (its number, prompt
  length, needle position and depth, the generation and whether it was right) and the settings:
  it is the needle.json as written.
  """
  tokenizer = scorer.tokenizer
  _check_depths(depths, trials)
  numbers = [_needle_number(seed, k) for k in range(trials)]
  shortest = shortest_length(tokenizer, numbers)
  if lengths is None:
    lengths = default_lengths(scorer.max_length, shortest)
  _check_lengths(lengths, scorer.max_length, shortest)
  sentences = filler_sentences(filler_text)
  sentences_ids = [ids for ids in map(tokenizer.encode, sentences) if ids]
  if not sentences_ids:
    raise ValueError('the filler text has no sentences to fill the haystack with')
  correct = np.zeros((len(depths), len(lengths)), int)
  samples = []
  with tqdm.tqdm(total=len(lengths) * len(depths) * trials, desc='needle', unit='prompt') as bar:
    for j, length in enumerate(lengths):
      cells = [(i, k) for i in range(len(depths)) for k in range(trials)]
      prompts = [build_prompt(tokenizer, sentences_ids, length, depths[i], numbers[k],
                              _filler_rng(seed, k)) for i, k in cells]
      texts = scorer.generate([p.tokens for p in prompts], max_new_tokens=MAX_NEW_TOKENS,
                              until=('\n',), temperature=0.0)
      for (i, k), prompt, text in zip(cells, prompts, texts):
        right = is_correct(numbers[k], text)
        correct[i, j] += right
        samples.append(dict(length=length, depth=depths[i], trial=k, number=numbers[k],
                            prompt_tokens=len(prompt.tokens), needle_start=prompt.needle_start,
                            needle_depth=round(prompt.depth, 4), generated=text, correct=right))
      bar.set_postfix(length=length, accuracy=f'{correct[:, j].sum() / len(cells):.2f}',
                      refresh=False)
      bar.update(len(prompts))
  return dict(lengths=list(lengths), depths=list(depths), trials=trials, seed=seed,
              needle=NEEDLE, question=QUESTION, max_new_tokens=MAX_NEW_TOKENS,
              accuracy=(correct / trials).tolist(), mean_accuracy=float(correct.mean() / trials),
              samples=samples)


def _check_lengths(lengths, max_length: int, shortest: int) -> None:
  if not lengths and shortest > max_length:
    raise ValueError(f'no length fits: the model\'s max_length={max_length} is under the '
                     f'{shortest} tokens that BOS, needle, question and answer take')
  if not lengths:
    raise ValueError('lengths must not be empty')
  too_long = [L for L in lengths if L > max_length]
  if too_long:
    raise ValueError(f'lengths {too_long} exceed the model\'s max_length={max_length} (a length '
                     f'holds the prompt and the {MAX_NEW_TOKENS} generated tokens)')
  too_short = [L for L in lengths if L < shortest]
  if too_short:
    raise ValueError(f'lengths {too_short} are too short: this tokenizer needs {shortest} tokens '
                     f'for BOS, the needle, the question and {MAX_NEW_TOKENS} generated tokens')


def _check_depths(depths, trials: int) -> None:
  if not depths:
    raise ValueError('depths must not be empty')
  outside = [d for d in depths if not 0.0 <= d <= 1.0]
  if outside:
    raise ValueError(f'depths {outside} are outside [0, 1] (0: the needle first, 1: last)')
  if trials < 1:
    raise ValueError(f'trials={trials}: expected at least 1')


def _needle_number(seed: int, trial: int) -> str:
  rng = np.random.default_rng([seed, trial, 0])
  return str(rng.integers(10 ** (NUM_DIGITS - 1), 10 ** NUM_DIGITS))


def _filler_rng(seed: int, trial: int) -> np.random.Generator:
  """The same filler sentences, in the same order, for a trial in every cell."""
  return np.random.default_rng([seed, trial, 1])


def markdown_table(grid: dict) -> str:
  """Accuracy per depth (rows) and length (columns), with each length's mean below."""
  accuracy = np.asarray(grid['accuracy'])
  header = '| depth \\ length | ' + ' | '.join(map(str, grid['lengths'])) + ' |'
  rule = '| --- |' + ' ---: |' * len(grid['lengths'])
  rows = [f'| {d:.2f} | ' + ' | '.join(f'{a:.2f}' for a in row) + ' |'
          for d, row in zip(grid['depths'], accuracy)]
  mean = '| mean | ' + ' | '.join(f'{a:.2f}' for a in accuracy.mean(0)) + ' |'
  return '\n'.join([header, rule, *rows, mean]) + '\n'


def plot_heatmap(grid: dict, path: str, title: str = 'needle in a haystack') -> str:
  """A PNG of the accuracy grid: depth down, length across, each cell's accuracy written in."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  accuracy = np.asarray(grid['accuracy'])
  lengths, depths = grid['lengths'], grid['depths']
  fig = Figure(figsize=(2.8 + 0.8 * len(lengths), 1.4 + 0.5 * len(depths)))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(accuracy, cmap='RdYlGn', vmin=0.0, vmax=1.0, aspect='auto')
  for i in range(len(depths)):
    for j in range(len(lengths)):
      ax.text(j, i, f'{accuracy[i, j]:.2f}', ha='center', va='center', fontsize=9)
  ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
  ax.set_yticks(range(len(depths)), [f'{d:g}' for d in depths])
  ax.set_xlabel('context length (tokens)')
  ax.set_ylabel('needle depth (0: first, 1: last)')
  ax.set_title(f'{title}: mean accuracy {accuracy.mean():.2f}')
  fig.colorbar(image, ax=ax, label='accuracy')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def write_outputs(grid: dict, output_path: str, title: str) -> list[str]:
  """needle.png, needle.json and needle.md in output_path (made if missing); their paths."""
  os.makedirs(output_path, exist_ok=True)
  paths = [os.path.join(output_path, f'needle.{ext}') for ext in ('png', 'json', 'md')]
  plot_heatmap(grid, paths[0], title)
  with open(paths[1], 'w') as f:
    json.dump(grid, f, indent=1)
  with open(paths[2], 'w') as f:
    f.write(markdown_table(grid))
  return paths


# ---------------------------------------------------------------------------------------------
# Command line.

def _parse_list(flag: str, text: str, kind) -> list:
  try:
    return [kind(x) for x in text.split(',') if x.strip()]
  except ValueError:
    sys.exit(f'error: {flag} {text!r}: expected comma-separated numbers, e.g. '
             f'{"64,128,256" if kind is int else "0,0.5,1"}')


def main(argv: list[str]) -> None:
  parser = cli.Parser(prog='python -m lm.eval needle', description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='any lm checkpoint directory')
  parser.add_argument('--lengths', default='',
                      help='context lengths in tokens (default: 64, 128, ... up to max_seq_len)')
  parser.add_argument('--depths', default=','.join(map(str, DEFAULT_DEPTHS)),
                      help='needle depths in [0, 1]')
  parser.add_argument('--trials', type=int, default=4, help='needles per cell')
  parser.add_argument('--filler', default='', help='a text file to use as the haystack')
  parser.add_argument('--seed', type=int, default=0)
  cli.add_model_flags(parser)
  parser.add_argument('--output_path', default='',
                      help='folder for needle.png, needle.json and needle.md')
  args = parser.parse_args(argv)
  lengths = _parse_list('--lengths', args.lengths, int)
  depths = _parse_list('--depths', args.depths, float)
  try:
    _check_depths(depths, args.trials)  # Before the minutes a large checkpoint takes to load.
  except ValueError as e:
    sys.exit(f'error: {e}')
  filler_text = ' '.join(FILLER_SENTENCES)
  if args.filler:
    if not os.path.isfile(args.filler):
      sys.exit(f'error: --filler {args.filler} does not exist (a text file of filler sentences)')
    with open(args.filler, encoding='utf-8', errors='replace') as f:
      filler_text = f.read()
    if not filler_sentences(filler_text):
      sys.exit(f'error: --filler {args.filler} holds no text to fill the haystack with')
  from lm import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from lm.eval import scoring  # pylint: disable=g-import-not-at-top
  try:
    scorer = scoring.Scorer.load(args.checkpoint, dtype=args.dtype, batch_size=args.batch_size,
                                 max_length=args.max_length, progress=False)
    grid = needle_grid(scorer, lengths or None, depths, args.trials, args.seed, filler_text)
  except (ValueError, FileNotFoundError, checkpoint_lib.CheckpointError) as e:
    sys.exit(f'error: {e}')
  scorer.log_truncation()
  grid.update(checkpoint=args.checkpoint, filler=args.filler or 'built-in')
  print(markdown_table(grid), end='')
  print(f'mean accuracy {grid["mean_accuracy"]:.3f}')
  if args.output_path:
    title = os.path.basename(os.path.normpath(args.checkpoint))
    for path in write_outputs(grid, args.output_path, title):
      print(f'wrote {path}')
