"""SentencePiece tools: train models Llama-2 style, extend one with a new language, measure them.

  python -m lm.tokenizer train --input FILE... --vocab_size N --out PREFIX [--model_type unigram]
  python -m lm.tokenizer merge --base BASE.model --add NEW.model --out MERGED.model [--check FILE]
  python -m lm.tokenizer fertility --model NAME=FILE.model... --text LANG=FILE... [--out DIR]

A merged model's checkpoint grows its embeddings with `python -m lm.vocab extend-checkpoint`
(`python -m lm.tokenizer extend-checkpoint`, its old spelling, still runs it). Models are trained
with lm.tokenizer.LLAMA2_TRAINER_OPTIONS, so that one trained here can be merged with Llama's
tokenizer; the data pipeline's own runtime (Tokenizer, train_tokenizer) is lm/tokenizer.py.
"""

import argparse
from collections.abc import Iterator, Sequence
import io
import json
import os
import sys
import tempfile

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from lm import files as files_lib
from lm import tokenizer as tokenizer_lib


def train_model(inputs: Sequence[str], vocab_size: int, out_prefix: str, *,
                input_format: str = 'text', seed: int = 0, **options) -> dict:
  """Trains SentencePiece on files with Llama-2's settings; writes PREFIX.model and PREFIX.vocab.

  input_format='tsv' reads `text<TAB>count` lines (a word-frequency list): each text counts as if
  seen `count` times. `options` override lm.tokenizer.LLAMA2_TRAINER_OPTIONS (model_type='unigram',
  byte_fallback=False, ...) or set any other SentencePieceTrainer option. Each file is replaced
  atomically, and neither is touched unless training succeeds.
  """
  # One pass to check the files first: a bad line should fail now, not after minutes of training.
  if not sum(1 for path in inputs for _ in _input_lines(path, input_format)):
    raise ValueError(f'The input files {list(inputs)} hold no text to train on.')
  directory = os.path.dirname(os.path.abspath(out_prefix))
  os.makedirs(directory, exist_ok=True)
  spm.set_random_generator_seed(seed)
  with tempfile.TemporaryDirectory(dir=directory, prefix='.tmp-') as tmp:
    lines = (line for path in inputs for line in _input_lines(path, input_format))
    try:
      spm.SentencePieceTrainer.Train(
          sentence_iterator=lines, model_prefix=os.path.join(tmp, 'spm'), vocab_size=vocab_size,
          input_format=input_format, **{**tokenizer_lib.LLAMA2_TRAINER_OPTIONS, **options})
    except RuntimeError as e:
      raise tokenizer_lib.training_error(e, f'vocab_size={vocab_size}', ', '.join(inputs)) from e
    for ext in ('model', 'vocab'):
      os.replace(os.path.join(tmp, f'spm.{ext}'), f'{out_prefix}.{ext}')
  return dict(model=f'{out_prefix}.model', vocab=f'{out_prefix}.vocab',
              vocab_size=tokenizer_lib.Tokenizer(f'{out_prefix}.model').vocab_size)


def _input_lines(path: str, input_format: str) -> Iterator[str]:
  """A training file's sentences: text lines cut as lm.tokenizer.training_sentences cuts them, or
  checked TSV lines."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Input file {path!r} does not exist.')
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode('utf-8').rstrip('\r\n')
      except UnicodeDecodeError as e:
        raise ValueError(f'{path} is not UTF-8 text: line {number}: {e}') from e
      if input_format == 'text':
        yield from tokenizer_lib.training_sentences([line])
      elif line:
        text, _, count = line.partition('\t')
        if not text or not count.isdigit() or int(count) < 1:
          raise ValueError(f'{path}:{number}: expected "text<TAB>count" (a count >= 1) in a '
                           f'--input_format=tsv file, got {line[:80]!r}.')
        yield line


# Merging: extend a base model (Llama-2's, say) with the pieces a model of a new language adds.

_APPENDABLE = (model_pb2.ModelProto.SentencePiece.NORMAL,
               model_pb2.ModelProto.SentencePiece.USER_DEFINED)


def merge_models(base: str, add: str, out: str, check: str | None = None) -> dict:
  """Appends to the base model the pieces of `add` it lacks, as Chinese-LLaMA does; writes `out`.

  Every base piece keeps its id, score and type, so a checkpoint trained with the base keeps its
  meaning. New pieces follow in `add`'s order (its BPE merge order) with its scores shifted below
  the lowest base score, so BPE applies every base merge first; yet an added piece can still join
  two of the base's final tokens (a '),' from `add` joins ')' and ','). `add`'s control, unknown,
  byte and unused pieces are never appended (the base's own do that work); its user-defined
  pieces stay user-defined. With `check`, a text file, the added pieces found in that text are
  left out, so that no piece can form in it, and the merged model is verified to tokenize it
  exactly as the base does. `out` is written atomically, and only if all went well.
  """
  base_proto = tokenizer_lib.read_model_proto(base)
  add_proto = tokenizer_lib.read_model_proto(add)
  _check_mergeable(base, base_proto, add, add_proto)
  check_lines = _read_lines(check) if check else []
  protected = _normalized_lines(base_proto, check_lines)
  pieces, skipped = _pieces_to_add(base_proto, add_proto, protected)
  if not pieces:
    raise ValueError(f'{add} has no piece that {base} lacks (skipped: {skipped}): nothing to add.')
  merged = model_pb2.ModelProto()
  merged.CopyFrom(base_proto)
  merged.pieces.extend(pieces)
  merged.trainer_spec.vocab_size = len(merged.pieces)
  _processor(merged)  # SentencePiece's own checks (no piece defined twice...), before writing.
  summary = dict(
      base_size=len(base_proto.pieces), added=len(pieces),
      added_user_defined=sum(p.type == p.USER_DEFINED for p in pieces),
      **{f'skipped_{reason}': count for reason, count in skipped.items()},
      final_size=len(merged.pieces),
      check=_check_unchanged(base_proto, merged, check, check_lines) if check else 'not run')
  files_lib.write_atomically(out, lambda f: f.write(merged.SerializeToString()), mode='wb')
  return summary


def _check_mergeable(base: str, base_proto, add: str, add_proto) -> None:
  type_name = model_pb2.TrainerSpec.ModelType.Name
  base_type, add_type = base_proto.trainer_spec.model_type, add_proto.trainer_spec.model_type
  if base_type != add_type:
    raise ValueError(
        f'{add} is a {type_name(add_type)} model but {base} is {type_name(base_type)}: its scores '
        f'mean something else. Train the added model with --model_type '
        f'{type_name(base_type).lower()}.')
  if base_proto == add_proto:
    raise ValueError(f'{add} is the same model as {base}: nothing to add.')


def _pieces_to_add(base_proto, add_proto, protected: str) -> tuple[list, dict]:
  """Copies of `add`'s new pieces, scores shifted below the base's; counts of those skipped."""
  taken = {p.piece for p in base_proto.pieces}
  protected_chars = set(protected)
  skipped = dict(duplicates=0, special=0, in_check_text=0)
  pieces = []
  for piece in add_proto.pieces:
    if piece.type not in _APPENDABLE:
      skipped['special'] += 1
    elif piece.piece in taken:
      skipped['duplicates'] += 1
    elif set(piece.piece) <= protected_chars and piece.piece in protected:
      skipped['in_check_text'] += 1
    else:
      pieces.append(model_pb2.ModelProto.SentencePiece())
      pieces[-1].CopyFrom(piece)
      taken.add(piece.piece)
  if pieces:
    shift = min(p.score for p in base_proto.pieces) - 1 - max(p.score for p in pieces)
    for piece in pieces:
      piece.score += shift
  return pieces, skipped


def _processor(proto) -> spm.SentencePieceProcessor:
  return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _normalized_lines(proto, lines: list[str]) -> str:
  """The lines as the model sees them ('▁' for spaces...), where pieces are matched."""
  sp = _processor(proto)
  return '\n'.join(sp.Normalize(line) for line in lines)


def _check_unchanged(base_proto, merged_proto, path: str, lines: list[str]) -> str:
  threads = os.cpu_count() or 1
  before = _processor(base_proto).Encode(lines, num_threads=threads)
  after = _processor(merged_proto).Encode(lines, num_threads=threads)
  changed = [i for i, (ids, new_ids) in enumerate(zip(before, after)) if ids != new_ids]
  if changed:
    raise ValueError(
        f'The merged model tokenizes {len(changed)} of the {len(lines)} lines of {path} '
        f'differently from the base, the first being {lines[changed[0]][:80]!r}; not written.')
  return f'{path}: unchanged on all {len(lines)} lines ({sum(map(len, before))} tokens)'


# Fertility: how many tokens a model spends on a language.


def fertility(models: dict[str, str], texts: dict[str, str]) -> list[dict]:
  """One row per model (name: .model file) and text (name: UTF-8 file) with the tokens it takes.

  Each non-empty line is encoded on its own, as SentencePiece sees a sentence. Words are runs of
  non-whitespace; characters are code points, line breaks excluded; bytes their UTF-8 encoding.
  """
  lines = {name: _read_lines(path) for name, path in texts.items()}
  tokenizers = {name: tokenizer_lib.Tokenizer(path) for name, path in models.items()}
  is_byte = {name: tok.byte_fallback_mask() for name, tok in tokenizers.items()}  # Once each.
  return [_fertility_row(model, tok, is_byte[model], text, lines[text])
          for model, tok in tokenizers.items() for text in texts]


def _fertility_row(model: str, tok: tokenizer_lib.Tokenizer, is_byte: np.ndarray, text: str,
                   lines: list[str]) -> dict:
  ids = np.concatenate([np.asarray(line_ids, np.int64) for line_ids in tok.encode_batch(lines)])
  words = sum(len(line.split()) for line in lines)
  chars = sum(map(len, lines))
  num_bytes = sum(len(line.encode('utf-8')) for line in lines)
  return dict(model=model, text=text, words=words, chars=chars, bytes=num_bytes, tokens=len(ids),
              tokens_per_word=len(ids) / words, tokens_per_char=len(ids) / chars,
              bytes_per_token=num_bytes / len(ids),
              byte_fallback_share=float(is_byte[ids].mean()))


def _read_lines(path: str) -> list[str]:
  """The non-empty lines of a UTF-8 text file (see _read_text)."""
  return [line for line in _read_text(path).splitlines() if line]


def _read_text(path: str) -> str:
  """The text of a UTF-8 file that holds some; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Text file {path!r} does not exist.')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path} is not UTF-8 text: {e}') from e
  if not text.strip():
    raise ValueError(f'{path} is empty: there is no text to tokenize.')
  return text


_FERTILITY_COLUMNS = (('tokens_per_word', 'tokens/word'), ('tokens_per_char', 'tokens/char'),
                      ('bytes_per_token', 'bytes/token'), ('byte_fallback_share', 'byte share'))


def format_fertility(rows: list[dict]) -> str:
  """The rows as an aligned text table."""
  header = ['model', 'text'] + [title for _, title in _FERTILITY_COLUMNS]
  table = [header] + [[r['model'], r['text']] + [f'{r[key]:.3f}' for key, _ in _FERTILITY_COLUMNS]
                      for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  return '\n'.join('  '.join(cell.rjust(w) if i > 1 else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))) for row in table)


def plot_fertility(rows: list[dict], path: str) -> str:
  """A PNG with one panel per measure: a group of bars per text, a bar per model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  models = list(dict.fromkeys(r['model'] for r in rows))
  texts = list(dict.fromkeys(r['text'] for r in rows))
  value = {(r['model'], r['text']): r for r in rows}
  width = 0.8 / len(models)
  fig, axes = plt.subplots(1, len(_FERTILITY_COLUMNS), figsize=(4 * len(_FERTILITY_COLUMNS), 3.5))
  for ax, (key, title) in zip(axes, _FERTILITY_COLUMNS):
    for i, model in enumerate(models):
      ax.bar(np.arange(len(texts)) + (i - (len(models) - 1) / 2) * width,
             [value[model, text][key] for text in texts], width, label=model)
    ax.set_xticks(np.arange(len(texts)), texts)
    ax.set_title(title)
    ax.grid(axis='y', alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, format='png', dpi=100)
  plt.close(fig)
  files_lib.write_atomically(path, lambda f: f.write(image.getvalue()), mode='wb')
  return path


# The command line: python -m lm.tokenizer {train,merge,fertility} --help


def _run_train(args) -> dict:
  options = dict(model_type=args.model_type, byte_fallback=args.byte_fallback,
                 character_coverage=args.character_coverage, pad_id=args.pad_id,
                 input_sentence_size=args.input_sentence_size,
                 user_defined_symbols=args.user_defined_symbols,
                 control_symbols=args.control_symbols, **dict(args.spm))
  return train_model(args.input, args.vocab_size, args.out, input_format=args.input_format,
                     seed=args.seed, **options)


def _run_merge(args) -> dict:
  return merge_models(args.base, args.add, args.out, check=args.check)


def _run_fertility(args) -> dict:
  rows = fertility(dict(args.model), dict(args.text))
  print(format_fertility(rows))
  json_path = os.path.join(args.out, 'fertility.json')
  text = json.dumps(rows, indent=2, ensure_ascii=False)
  files_lib.write_atomically(json_path, lambda f: f.write(text), encoding='utf-8')
  return dict(json=json_path, plot=plot_fertility(rows, os.path.join(args.out, 'fertility.png')))


def _named_file(spec: str) -> tuple[str, str]:
  """'NAME=FILE' as (NAME, FILE); a bare FILE is named after its base name."""
  name, sep, path = spec.partition('=')
  return (name, path) if sep else (os.path.splitext(os.path.basename(spec))[0], spec)


def _key_value(spec: str) -> tuple[str, str]:
  key, sep, value = spec.partition('=')
  if not sep:
    raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {spec!r}')
  return key, value


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m lm.tokenizer', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  for add_command in (_train_parser, _merge_parser, _fertility_parser):
    add_command(commands)
  return parser


def _train_parser(commands) -> None:
  train = commands.add_parser('train', help='train a SentencePiece model, Llama-2 style')
  train.add_argument('--input', nargs='+', required=True, help='UTF-8 text files, or TSV files')
  train.add_argument('--vocab_size', type=int, required=True)
  train.add_argument('--model_type', choices=('bpe', 'unigram'), default='bpe')
  train.add_argument('--out', required=True, help='writes OUT.model and OUT.vocab')
  train.add_argument('--input_format', choices=('text', 'tsv'), default='text',
                     help='tsv: "word<TAB>count" lines, a word-frequency list')
  train.add_argument('--byte_fallback', action=argparse.BooleanOptionalAction, default=True,
                     help='unknown characters as UTF-8 byte pieces, never <unk>')
  train.add_argument('--character_coverage', type=float, default=0.99995,
                     help='share of characters seen that get a piece; rarer ones fall back')
  train.add_argument('--input_sentence_size', type=int, default=0,
                     help='lines sampled to train on (0: all)')
  train.add_argument('--user_defined_symbols', default='', help='comma-separated, kept whole')
  train.add_argument('--control_symbols', default='', help='comma-separated, never in text')
  train.add_argument('--pad_id', type=int, default=-1, help='-1 (no pad piece) as in Llama-2')
  train.add_argument('--seed', type=int, default=0)
  train.add_argument('--spm', type=_key_value, action='append', default=[], metavar='KEY=VALUE',
                     help='any other SentencePieceTrainer option; repeatable')
  train.set_defaults(run=_run_train)


def _merge_parser(commands) -> None:
  merge = commands.add_parser('merge', help='append the pieces of a new model to a base model')
  merge.add_argument('--base', required=True, help="e.g. Llama-2's tokenizer.model")
  merge.add_argument('--add', required=True, help='a model of the same type (BPE) to take from')
  merge.add_argument('--out', required=True, help='the merged .model file')
  merge.add_argument('--check', help='text whose base tokenization must not change (English...)')
  merge.set_defaults(run=_run_merge)


def _fertility_parser(commands) -> None:
  fert = commands.add_parser('fertility', help='tokens per word of models on texts')
  fert.add_argument('--model', type=_named_file, nargs='+', action='extend', required=True,
                    metavar='NAME=FILE.model')
  fert.add_argument('--text', type=_named_file, nargs='+', action='extend', required=True,
                    metavar='LANG=FILE')
  fert.add_argument('--out', default='.', help='writes fertility.json and fertility.png here')
  fert.set_defaults(run=_run_fertility)


def main(argv: Sequence[str] | None = None) -> None:
  """The command line, run as `python -m lm.tokenizer` (lm.tokenizer.main)."""
  args = _parser().parse_args(argv)
  try:
    summary = args.run(args)
  except (OSError, ValueError) as e:  # Missing, existing or invalid files and values.
    sys.exit(f'python -m lm.tokenizer {args.command}: error: {e}')
  width = max(map(len, summary), default=0)
  for key, value in summary.items():
    print(f'{key:<{width}}  {value}')
