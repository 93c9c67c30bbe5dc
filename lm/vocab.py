"""Growing a trained model's vocabulary to a merged tokenizer's (OpenHathi-style extension).

  python -m lm.vocab extend-checkpoint --checkpoint DIR --base BASE.model \\
      --merged MERGED.model --init mean|normal|subword_mean --out DIR [--seed 0]

(`python -m lm.tokenizer extend-checkpoint ...`, the command's old spelling, runs it too.)

A tokenizer merged from a base model and one trained on a new language keeps every base piece at
its id and appends the new ones. `extend_checkpoint` gives a model trained with the base tokenizer
embedding rows (and, when untied, output columns) for the new pieces, padded to a multiple of 128.
The base rows stay bit-identical, so on text that the merged tokenizer splits as the base did the
old vocabulary's logits do not change.

New rows, by `init`:
  mean          the base rows' mean. Its logit is the mean of the old logits, so (Jensen) no new
                piece gets more probability than the average old piece, and all of them together
                at most n_new / (n_old + n_new): predictions barely move (Hewitt, 2021).
  normal        per dimension from the base rows' mean and std (seeded): like a random old row.
  subword_mean  the mean of the rows of the base pieces that spell the new piece (FVT, Gee et al.
                2022): '▁नमस्ते' starts as the average of the base's pieces for ' नमस्ते'.
Padding rows past the merged vocabulary get the base rows' mean whatever `init` is: they are never
inputs or targets, the mean's logit is never dominant (above), and training only lowers it. Zeros
would give them logit 0, which can top a trained model's logits, as the model has no output bias.

The extended checkpoint is a directory:
  params/          the parameters (an orbax item; lm.checkpoint.restore_params reads it)
  tokenizer.model  the merged SentencePiece model
  config.json      the source run's config, with model.vocab_size, data.tokenizer and init_from
                   pointing here
  config.py        get_config() of that config.json, pointing wherever the directory now is;
                   code, so prefer `python -m lm.main --config OUT/config.json --workdir NEW`
                   (lm.config.config_from_checkpoint), which runs none
  extension.json   what was done (extend_checkpoint's summary)
  hf_config.json   copied from the source when it was imported from HF (lm/convert.py), so that
                   lm-to-hf exports the extended model in its original dtype and token ids
It holds no optimizer state, step or data position: AdamW's moments no longer fit the shapes, and
the new run reads a stream tokenized differently. A run from it (config.init_from) starts at step
0 with fresh moments and warmup; config.train.trainable='embeddings' first trains only the
embedding matrices, as OpenHathi did.
"""

import argparse
from collections.abc import Sequence
import json
import os
import shutil
import sys

import numpy as np
import sentencepiece as spm

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import files as files_lib
from lm import tokenizer as tokenizer_lib

INITS = ('mean', 'normal', 'subword_mean')


def extend_checkpoint(checkpoint: str, base: str, merged: str, init: str, out: str,
                      seed: int = 0) -> dict:
  """Writes the extended checkpoint `out` (see above); returns what it did.

  `checkpoint` is a training workdir, its checkpoints/ folder, one step in it, or an extended
  checkpoint; `base` the SentencePiece model it was trained with, `merged` one that extends it.
  Raises ValueError for an unknown init or tokenizers that do not fit, FileExistsError when `out`
  holds anything, CheckpointError for a missing or unreadable checkpoint. `out` appears whole or
  not at all.
  """
  if init not in INITS:
    raise ValueError(f'init={init!r}: expected one of {INITS}')
  out = files_lib.new_directory(out)
  base_pieces, merged_pieces = _pieces(base), _pieces(merged)
  _check_extends(base_pieces, merged_pieces, base, merged)
  shapes = checkpoint_lib.params_shapes(checkpoint)
  old_vocab = shapes['embed'].shape[0]
  config = config_lib.checkpoint_config(checkpoint)
  hf_config = config_lib.find_hf_config(checkpoint, config)
  _check_vocab(old_vocab, len(base_pieces), checkpoint, base, config.data.tokenizer)

  new_pieces = merged_pieces[len(base_pieces):]
  new_vocab = tokenizer_lib.padded_vocab_size(len(merged_pieces))
  params = extend_params(
      checkpoint_lib.restore_params(checkpoint, shapes), base_size=len(base_pieces),
      merged_size=len(merged_pieces), vocab_size=new_vocab, init=init, seed=seed,
      spellings=subword_ids(base, new_pieces) if init == 'subword_mean' else None)
  config.model.vocab_size = new_vocab
  config.data.tokenizer = os.path.join(out, 'tokenizer.model')
  config.init_from = out
  summary = dict(
      checkpoint=os.path.abspath(checkpoint), base=os.path.abspath(base),
      merged=os.path.abspath(merged), old_vocab_size=old_vocab, new_vocab_size=new_vocab,
      rows_added=len(new_pieces), padding_rows=new_vocab - len(merged_pieces), init=init,
      seed=seed, out=out)
  with files_lib.atomic_directory(out) as directory:
    checkpoint_lib.save_params(directory, params)
    shutil.copyfile(merged, os.path.join(directory, 'tokenizer.model'))
    write_checkpoint_config(directory, config)
    with open(os.path.join(directory, 'extension.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    if hf_config:  # An imported HF model: lm.convert lm-to-hf restores its dtype and token ids.
      shutil.copyfile(hf_config, os.path.join(directory, 'hf_config.json'))
  return summary


_CONFIG_PY = '''"""The config of the checkpoint in this directory (written by lm.vocab or lm.convert).
`python -m lm.main --config DIR/config.json --workdir NEW` reads the same config as data, without
running this file; `--config DIR/config.py` runs it."""

import os

from lm import config as config_lib


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))  # Wherever this directory has moved to.
  config = config_lib.config_from_json(os.path.join(here, 'config.json'))
  config.init_from = here
  if os.path.exists(os.path.join(here, 'tokenizer.model')):
    config.data.tokenizer = os.path.join(here, 'tokenizer.model')
  return config
'''


def write_checkpoint_config(directory: str, config) -> None:
  """Writes config.json and config.py (its get_config(), pointing init_from, and data.tokenizer
  when there is a tokenizer.model, at wherever the directory has moved) into a checkpoint
  directory: this module's extended checkpoints and lm.convert's imported models."""
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(directory, 'config.py'), 'w') as f:
    f.write(_CONFIG_PY)


def write_params_workdir(directory: str, params: dict, *, tokenizer: str, config,
                         hf_config: str | None = None) -> None:
  """Writes a workdir whose one step holds only params (checkpoints/0, which lm.checkpoint
  reads like a run's), with tokenizer.model, config.json/config.py and hf_config.json: what
  lm.prune and lm.quantize write, loadable wherever a checkpoint is."""
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(directory, 'checkpoints'),
                                             async_save=False)
  checkpointer.save(0, {'params': params}, {})
  checkpointer.close()
  shutil.copyfile(tokenizer, os.path.join(directory, 'tokenizer.model'))
  write_checkpoint_config(directory, config)
  if hf_config:
    shutil.copyfile(hf_config, os.path.join(directory, 'hf_config.json'))


def extend_params(params: dict, *, base_size: int, merged_size: int, vocab_size: int, init: str,
                  spellings: list[list[int]] | None = None, seed: int = 0) -> dict:
  """params with embed [V, D] -> [vocab_size, D] and, if untied, unembed [D, V] -> [D, vocab_size]

  Rows below base_size are kept as they are, rows up to merged_size come from `init` (spellings:
  each new piece's base ids, for subword_mean), and the rest are padding (the base rows' mean).
  """
  rng = np.random.default_rng(seed)
  grow = lambda table_VxD: extend_rows(table_VxD, base_size, merged_size, vocab_size, init,
                                       spellings, rng)
  extended = dict(params, embed=grow(params['embed']))
  if 'unembed' in params:
    extended['unembed'] = grow(params['unembed'].T).T
  return extended


def extend_rows(table_VxD: np.ndarray, base_size: int, merged_size: int, vocab_size: int,
                init: str, spellings: list[list[int]] | None,
                rng: np.random.Generator) -> np.ndarray:
  """One vocab-by-D matrix grown to vocab_size rows (see extend_params)."""
  old_VxD = np.asarray(table_VxD[:base_size])
  mean_D = old_VxD.mean(0, dtype=np.float64)
  N, D = merged_size - base_size, old_VxD.shape[1]
  if init == 'mean':
    new_NxD = np.broadcast_to(mean_D, (N, D))
  elif init == 'normal':
    new_NxD = mean_D + old_VxD.std(0, dtype=np.float64) * rng.standard_normal((N, D))
  elif init == 'subword_mean':
    new_NxD = np.array([old_VxD[ids].mean(0, dtype=np.float64) if ids else mean_D
                        for ids in spellings]).reshape(N, D)
  else:
    raise ValueError(f'init={init!r}: expected one of {INITS}')
  padding_PxD = np.broadcast_to(mean_D, (vocab_size - merged_size, D))
  return np.concatenate([old_VxD, new_NxD.astype(old_VxD.dtype),
                         padding_PxD.astype(old_VxD.dtype)])


def subword_ids(base: str, pieces: list[str]) -> list[list[int]]:
  """The base tokenizer's ids spelling each piece ('▁' as a space, and no '▁' put in front),
  leaving out unknown pieces (a base without byte fallback cannot spell every character)."""
  proto = tokenizer_lib.read_model_proto(base)
  proto.normalizer_spec.add_dummy_prefix = False
  proto.normalizer_spec.remove_extra_whitespaces = False
  sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
  return [[i for i in sp.EncodeAsIds(piece.replace('▁', ' ')) if i != sp.unk_id()]
          for piece in pieces]


def _pieces(path: str) -> list[str]:
  return [p.piece for p in tokenizer_lib.read_model_proto(path).pieces]


def _check_extends(base_pieces: list[str], merged_pieces: list[str], base: str, merged: str):
  differ = [i for i, (b, m) in enumerate(zip(base_pieces, merged_pieces)) if b != m]
  if differ:
    i = differ[0]
    raise ValueError(
        f'the merged tokenizer {merged} does not extend the base {base}: piece {i} is '
        f'{merged_pieces[i]!r} there but {base_pieces[i]!r} in the base ({len(differ)} ids '
        'differ); a merged model keeps every base piece at its id and appends the new ones')
  if len(merged_pieces) < len(base_pieces):
    raise ValueError(f'the merged tokenizer {merged} has {len(merged_pieces)} pieces, fewer than '
                     f'the base {base} ({len(base_pieces)}): it does not extend it')


def _check_vocab(old_vocab: int, base_size: int, checkpoint: str, base: str, trained_with: str):
  padded = tokenizer_lib.padded_vocab_size(base_size)
  if old_vocab not in (base_size, padded):
    raise ValueError(
        f'{checkpoint} has model.vocab_size={old_vocab} but the base tokenizer {base} has '
        f'{base_size} pieces (expected {base_size} or {padded}, padded): is it the tokenizer the '
        f'model was trained with (data.tokenizer={trained_with!r}, or WORKDIR/tokenizer/spm.model '
        'when that is empty)?')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m lm.vocab', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  extend = commands.add_parser('extend-checkpoint',
                               help="grow a checkpoint's embeddings to a merged vocabulary")
  extend.add_argument('--checkpoint', required=True)
  extend.add_argument('--base', required=True, help='the tokenizer the checkpoint was trained with')
  extend.add_argument('--merged', required=True,
                      help="lm.tokenizer merge's output: the base plus new pieces")
  extend.add_argument('--init', choices=INITS, required=True,
                      help='how the new embedding rows start')
  extend.add_argument('--out', required=True)
  extend.add_argument('--seed', type=int, default=0)
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  try:
    summary = extend_checkpoint(args.checkpoint, args.base, args.merged, args.init, args.out,
                                seed=args.seed)
  except (OSError, ValueError, checkpoint_lib.CheckpointError) as e:  # The user's to fix.
    sys.exit(f'python -m lm.vocab {args.command}: error: {e}')
  width = max(map(len, summary), default=0)
  for key, value in summary.items():
    print(f'{key:<{width}}  {value}')


if __name__ == '__main__':
  main()
