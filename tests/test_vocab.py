import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import data as data_lib
from lm import model as model_lib
from lm import tokenizer as tokenizer_lib
from lm import train as train_lib
from lm import vocab

BASE_SIZE = 400
# What a merged tokenizer appends: Hindi pieces, and Latin ones the base does not have.
NEW_PIECES = ['▁नमस्ते', 'न', 'म', 'स्ते', '▁भारत', '▁the▁value', 'ing▁', '▁']
ENGLISH = 'def read(self, path):\n    """Return the value of the file at path."""\n'
CFG = model_lib.ModelConfig(vocab_size=BASE_SIZE, d_model=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, d_ff=64, max_seq_len=128, dtype='float32')


@pytest.fixture(scope='module')
def tokenizers(tmp_path_factory):
  """(base, merged) SentencePiece model paths; merged appends NEW_PIECES to the base."""
  directory = tmp_path_factory.mktemp('tokenizers')
  texts = list(data_lib.iter_documents('stdlib', max_chars=200_000))
  base = str(directory / 'base.model')
  tokenizer_lib.train_tokenizer(texts, BASE_SIZE, base, max_chars=200_000, seed=0)
  new = [p for p in NEW_PIECES if p not in _pieces(base)]
  return base, _write_merged(base, new, str(directory / 'merged.model'))


_proto = tokenizer_lib.read_model_proto


def _pieces(path):
  return [p.piece for p in _proto(path).pieces]


def _write_merged(base, new_pieces, path):
  proto = _proto(base)
  lowest = min(p.score for p in proto.pieces)
  for i, piece in enumerate(new_pieces):
    proto.pieces.add(piece=piece, score=lowest - 1 - i)
  with open(path, 'wb') as f:
    f.write(proto.SerializeToString())
  return path


def _save_run(workdir, cfg, params):
  """A training workdir as lm.train leaves it: config.json and checkpoints/STEP."""
  config = config_lib.base_config()
  config.model.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                       if f.name in config.model})
  config.data.seq_len = 32
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  optimizer = train_lib.make_optimizer(config.train, model_lib.logical_axes(cfg))
  state = jax.jit(functools.partial(train_lib.init_state, cfg, optimizer, 0))(params)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                             async_save=False)
  checkpointer.save(7, state, {})
  checkpointer.close()
  return str(workdir)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A training workdir whose model predicts peaked distributions, as a trained one does: its
  matrices are 25x wider than at init, which is far quicker than training (or compiling init)."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: (rng.normal(0, 0.5, x.shape) if x.ndim > 1 else np.ones(x.shape)).astype(x.dtype),
      jax.eval_shape(lambda: model_lib.init_params(CFG, 0)))
  return _save_run(tmp_path_factory.mktemp('runs') / 'run', CFG, params)


def _params(path):
  return checkpoint_lib.restore_params(path, checkpoint_lib.params_shapes(path))


def _logits(path, tokens):
  params = _params(path)
  cfg = dataclasses.replace(CFG, vocab_size=params['embed'].shape[0])
  return np.asarray(_forward(cfg)(params, tokens))


@functools.cache
def _forward(cfg):
  return jax.jit(functools.partial(model_lib.apply, model_lib.graphdef(cfg)))


@pytest.mark.parametrize('init', vocab.INITS)
def test_old_logits_stay_and_new_pieces_start_unlikely(init, run, tokenizers, tmp_path):
  base, merged = tokenizers
  summary = vocab.extend_checkpoint(run, base, merged, init, str(tmp_path / 'ext'))
  merged_size = tokenizer_lib.Tokenizer(merged).vocab_size
  assert summary['old_vocab_size'] == BASE_SIZE and summary['new_vocab_size'] == 512
  assert summary['rows_added'] == merged_size - BASE_SIZE > 0
  assert summary['padding_rows'] == 512 - merged_size

  old, new = _params(run), _params(tmp_path / 'ext')
  np.testing.assert_array_equal(new['embed'][:BASE_SIZE], old['embed'])
  np.testing.assert_array_equal(new['unembed'][:, :BASE_SIZE], old['unembed'])
  jax.tree.map(np.testing.assert_array_equal, new['blocks'], old['blocks'])

  base_ids = tokenizer_lib.Tokenizer(base).encode(ENGLISH)
  assert tokenizer_lib.Tokenizer(merged).encode(ENGLISH) == base_ids
  tokens = np.array([base_ids[:32]], np.int32)
  old_logits, new_logits = _logits(run, tokens), _logits(tmp_path / 'ext', tokens)
  np.testing.assert_allclose(new_logits[..., :BASE_SIZE], old_logits, rtol=0, atol=1e-6)

  # Jensen, exp(mean of logits) <= mean of exp(logits), bounds a mean row's probability at every
  # position: by the average old piece's (mean and padding rows), by its spelling's (subword_mean).
  probs = np.asarray(jax.nn.softmax(new_logits))[0]
  old_probs, new_probs = probs[:, :BASE_SIZE], probs[:, BASE_SIZE:]
  bound = np.repeat(old_probs.mean(-1, keepdims=True), new_probs.shape[1], 1)
  spellings = vocab.subword_ids(base, _pieces(merged)[BASE_SIZE:])
  if init == 'subword_mean':
    bound[:, :len(spellings)] = np.stack([old_probs[:, ids].mean(-1) for ids in spellings], 1)
  bounded = slice(len(spellings) if init == 'normal' else 0, None)  # Random rows have no bound.
  assert np.all(new_probs[:, bounded] <= bound[:, bounded] * (1 + 1e-5))
  assert new_probs.mean(0).max() < old_probs.mean(0).max()  # Never the likeliest piece.
  uniform_share = new_probs.shape[1] / probs.shape[1]
  assert new_probs.sum(-1).mean() < 0.5 * uniform_share  # Far below what uniform guessing gives.


def test_tied_embeddings_grow_one_matrix():
  params = {'embed': np.arange(12, dtype=np.float32).reshape(4, 3), 'final_norm': {}}
  extended = vocab.extend_params(params, base_size=3, merged_size=5, vocab_size=8, init='mean')
  assert set(extended) == {'embed', 'final_norm'}
  np.testing.assert_array_equal(extended['embed'][:3], params['embed'][:3])
  np.testing.assert_array_equal(extended['embed'][3:], np.broadcast_to([3, 4, 5], (5, 3)))


def test_the_extended_checkpoint_holds_what_a_new_run_needs(run, tokenizers, tmp_path):
  base, merged = tokenizers
  out = tmp_path / 'ext'
  summary = vocab.extend_checkpoint(run, base, merged, 'mean', str(out))
  assert sorted(os.listdir(out)) == [
      'config.json', 'config.py', 'extension.json', 'params', 'tokenizer.model']
  assert json.loads((out / 'extension.json').read_text()) == summary
  saved = config_lib.config_from_json(str(out / 'config.json'))
  assert saved.model.vocab_size == 512 and saved.init_from == str(out)
  assert saved.data.tokenizer == str(out / 'tokenizer.model')
  assert (out / 'tokenizer.model').read_bytes() == open(merged, 'rb').read()
  moved = tmp_path / 'moved'
  os.rename(out, moved)
  config = config_lib.load_config(str(moved / 'config.py'))  # As lm.main --config reads it.
  assert config.init_from == str(moved) and config.data.tokenizer == str(moved / 'tokenizer.model')
  assert config.model.vocab_size == 512
  config_lib.validate(config)


def test_an_imported_models_hf_config_goes_along(run, tokenizers, tmp_path):
  """A model lm.convert imported keeps its HF config.json, so the extended model exports (after
  training) in the original dtype and with the original special-token ids."""
  base, merged = tokenizers
  imported = tmp_path / 'imported'
  shutil.copytree(run, imported)
  hf_config = {'model_type': 'llama', 'dtype': 'bfloat16', 'bos_token_id': 1, 'eos_token_id': 2}
  (imported / 'hf_config.json').write_text(json.dumps(hf_config))
  out = tmp_path / 'ext'
  vocab.extend_checkpoint(str(imported / 'checkpoints'), base, merged, 'mean', str(out))
  assert json.loads((out / 'hf_config.json').read_text()) == hf_config
  saved = config_lib.config_from_json(str(out / 'config.json'))
  assert config_lib.find_hf_config(str(tmp_path / 'later_run'), saved) == str(
      out / 'hf_config.json')  # How lm-to-hf finds it for a run started from `out`.


def test_subword_mean_rows_average_the_base_pieces_spelling_them(run, tokenizers, tmp_path):
  base, merged = tokenizers
  new_pieces, base_pieces = _pieces(merged)[BASE_SIZE:], _pieces(base)
  spellings = vocab.subword_ids(base, new_pieces)

  def spelled(ids):  # Byte pieces '<0xE0>' are bytes; '▁' is a space.
    return b''.join(bytes([int(base_pieces[i][1:-1], 16)]) if base_pieces[i].startswith('<0x')
                    else base_pieces[i].replace('▁', ' ').encode() for i in ids).decode()

  assert [spelled(ids) for ids in spellings] == [p.replace('▁', ' ') for p in new_pieces]
  vocab.extend_checkpoint(run, base, merged, 'subword_mean', str(tmp_path / 'ext'))
  old, new = _params(run), _params(tmp_path / 'ext')
  for row, ids in enumerate(spellings, BASE_SIZE):
    np.testing.assert_allclose(new['embed'][row], old['embed'][ids].mean(0), atol=1e-6)
    np.testing.assert_allclose(new['unembed'][:, row], old['unembed'][:, ids].mean(1), atol=1e-6)


def test_normal_rows_follow_the_old_rows_statistics_and_the_seed():
  rng = np.random.default_rng(0)
  old = (rng.normal(size=(1000, 4)) * [1, 2, 3, 4] + [0, 1, -1, 5]).astype(np.float32)
  grow = lambda seed: vocab.extend_rows(old, 1000, 6000, 6016, 'normal', None,
                                        np.random.default_rng(seed))
  rows = grow(0)
  assert rows.shape == (6016, 4) and rows.dtype == np.float32
  np.testing.assert_array_equal(rows[:1000], old)
  np.testing.assert_allclose(rows[1000:6000].mean(0), old.mean(0), atol=0.1)
  np.testing.assert_allclose(rows[1000:6000].std(0), old.std(0), rtol=0.05)
  np.testing.assert_array_equal(rows[6000:], np.broadcast_to(
      old.mean(0, dtype=np.float64).astype(np.float32), (16, 4)))
  np.testing.assert_array_equal(grow(0), rows)
  assert not np.array_equal(grow(1), rows)


def _not_extending(tokenizers, tmp_path):
  """A 'merged' model with two base pieces swapped."""
  proto = _proto(tokenizers[1])
  a, b = proto.pieces[BASE_SIZE - 2].piece, proto.pieces[BASE_SIZE - 1].piece
  proto.pieces[BASE_SIZE - 2].piece, proto.pieces[BASE_SIZE - 1].piece = b, a
  (tmp_path / 'swapped.model').write_bytes(proto.SerializeToString())
  return str(tmp_path / 'swapped.model')


def _corrupt(run, tmp_path):
  shutil.copytree(run, tmp_path / 'corrupt')
  for path in (tmp_path / 'corrupt' / 'checkpoints').rglob('*'):
    if path.is_file():
      path.write_bytes(b'garbage')
  return str(tmp_path / 'corrupt')


@pytest.mark.parametrize('case, error, message', [
    ('missing checkpoint', checkpoint_lib.CheckpointError, 'does not exist'),
    ('corrupt checkpoint', checkpoint_lib.CheckpointError, 'cannot read the parameters'),
    ('wrong base', ValueError, f'model.vocab_size={BASE_SIZE} but the base tokenizer'),
    ('merged does not extend base', ValueError, f'piece {BASE_SIZE - 2} is'),
    ('unknown init', ValueError, "init='zeros'"),
    ('out not empty', FileExistsError, 'not empty'),
])
def test_bad_input_fails_clearly_and_writes_nothing(case, error, message, run, tokenizers,
                                                     tmp_path):
  base, merged = tokenizers
  args = dict(checkpoint=run, base=base, merged=merged, init='mean',
              out=str(tmp_path / 'out' / 'ext'))
  if case == 'missing checkpoint':
    args['checkpoint'] = str(tmp_path / 'nowhere')
  elif case == 'corrupt checkpoint':
    args['checkpoint'] = _corrupt(run, tmp_path)
  elif case == 'wrong base':
    args['base'] = merged
  elif case == 'merged does not extend base':
    args['merged'] = _not_extending(tokenizers, tmp_path)
  elif case == 'unknown init':
    args['init'] = 'zeros'
  else:
    os.makedirs(args['out'])
    (tmp_path / 'out' / 'ext' / 'keep.txt').write_text('mine')
  with pytest.raises(error, match=message):
    vocab.extend_checkpoint(**args)
  left = sorted(p.name for p in (tmp_path / 'out').rglob('*'))  # Nothing, or only the user's.
  assert left == (['ext', 'keep.txt'] if case == 'out not empty' else [])


def test_output_appears_whole_or_not_at_all(run, tokenizers, tmp_path, monkeypatch):
  base, merged = tokenizers
  out = tmp_path / 'ext'

  def fail(*args):
    raise OSError('disk full')

  with monkeypatch.context() as patch:
    patch.setattr(vocab.shutil, 'copyfile', fail)  # After the params are written.
    with pytest.raises(OSError, match='disk full'):
      vocab.extend_checkpoint(run, base, merged, 'mean', str(out))
  assert os.listdir(tmp_path) == []
  out.mkdir()  # An empty directory may be the target.
  vocab.extend_checkpoint(run, base, merged, 'mean', str(out))
  assert os.listdir(tmp_path) == ['ext'] and 'params' in os.listdir(out)



def test_extend_checkpoint_command(monkeypatch, capsys):
  """`python -m lm.vocab extend-checkpoint` hands its flags to extend_checkpoint (faked here, as
  the real one is tested above) and prints the summary; a bad checkpoint exits with one line."""
  calls = []

  def extend_checkpoint(*args, **kwargs):
    calls.append((args, kwargs))
    if args[0] == 'missing':
      raise checkpoint_lib.CheckpointError('no checkpoint in missing')
    return dict(vocab_size=5, added=2)

  monkeypatch.setattr(vocab, 'extend_checkpoint', extend_checkpoint)
  flags = ['--base', 'b.model', '--merged', 'm.model', '--init', 'mean', '--out', 'new']
  vocab.main(['extend-checkpoint', '--checkpoint', 'ckpt'] + flags)
  assert calls == [(('ckpt', 'b.model', 'm.model', 'mean', 'new'), dict(seed=0))]
  assert capsys.readouterr().out == 'vocab_size  5\nadded       2\n'
  with pytest.raises(SystemExit, match='^python -m lm.vocab extend-checkpoint: error: no '
                                       'checkpoint in missing$'):
    vocab.main(['extend-checkpoint', '--checkpoint', 'missing'] + flags)

def test_a_run_continues_from_the_extended_checkpoint_training_only_embeddings(
    run, tokenizers, tmp_path):
  base, merged = tokenizers
  ext = tmp_path / 'ext'
  vocab.extend_checkpoint(run, base, merged, 'mean', str(ext))
  for i in range(10):  # Whole documents are held out, so the corpus needs several.
    (tmp_path / f'hindi{i}.txt').write_text(f'{i} ' + 'नमस्ते भारत। ' * 20 + ENGLISH * 4)
  config = config_lib.config_from_json(str(ext / 'config.json'))
  config.train.update(steps=3, warmup_steps=1, batch_size=4, eval_every=3, eval_batches=1,
                      checkpoint_every=3, trainable='embeddings')
  config.data.update(source=f'text:{tmp_path}/hindi*.txt', seq_len=32, eval_fraction=0.1)
  state, metrics = train_lib.train(config, str(tmp_path / 'run'))
  start = _params(ext)
  assert int(state.step) == 3 and np.isfinite(metrics['eval_loss'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params['blocks']),
               start['blocks'])
  np.testing.assert_array_equal(state.params['final_norm']['scale'], start['final_norm']['scale'])
  assert not np.array_equal(state.params['embed'], start['embed'])
  assert not np.array_equal(state.params['unembed'], start['unembed'])
