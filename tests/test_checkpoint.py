import jax
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import train as train_lib

PARAMS = {'embed': np.arange(12, dtype=np.float32).reshape(4, 3),
          'blocks': {'w': np.ones((2, 3, 3), np.float32)}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_params_restore_from_a_params_item_or_any_level_of_a_training_run(tmp_path):
  checkpoint_lib.save_params(str(tmp_path / 'ext'), PARAMS)
  _assert_equal(checkpoint_lib.restore_params(str(tmp_path / 'ext'), _abstract(PARAMS)), PARAMS)

  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / 'run' / 'checkpoints'),
                                             async_save=False)
  for step in (3, 12):  # The newest step is taken.
    scaled = jax.tree.map(lambda x: x * step, PARAMS)
    checkpointer.save(step, {'params': scaled, 'opt_state': scaled, 'step': step}, {})
  checkpointer.close()
  newest = jax.tree.map(lambda x: x * 12, PARAMS)
  for path in ('run', 'run/checkpoints', 'run/checkpoints/12'):
    assert checkpoint_lib.params_shapes(str(tmp_path / path)) == _abstract(PARAMS)
    _assert_equal(checkpoint_lib.restore_params(str(tmp_path / path), _abstract(PARAMS)), newest)


def test_params_that_do_not_fit_the_model_are_named(tmp_path):
  checkpoint_lib.save_params(str(tmp_path), PARAMS)
  wanted = {'embed': jax.ShapeDtypeStruct((5, 3), np.float32), 'unembed': PARAMS['embed']}
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    checkpoint_lib.restore_params(str(tmp_path), wanted)
  message = str(e.value)
  assert "params['embed'] is (4, 3), the model wants (5, 3)" in message
  assert "params['unembed'] is missing, the model wants (4, 3)" in message
  assert "params['blocks']['w'] is (2, 3, 3), not in the model" in message


def test_a_directory_without_a_checkpoint_says_what_was_expected(tmp_path):
  with pytest.raises(checkpoint_lib.CheckpointError, match='does not exist'):
    checkpoint_lib.params_shapes(str(tmp_path / 'nowhere'))
  with pytest.raises(checkpoint_lib.CheckpointError, match='holds no lm checkpoint'):
    checkpoint_lib.params_shapes(str(tmp_path))


# -------------------------------------------------------------------------------------------
# Damaged steps: moved aside once an older step restores, then saved afresh.


def _state(step):
  return {'params': jax.tree.map(lambda x: x * step, PARAMS), 'step': np.asarray(step, np.int32)}


def _save(directory, *steps):
  checkpointer = checkpoint_lib.Checkpointer(str(directory), async_save=False)
  for step in steps:
    checkpointer.save(step, _state(step), {'step': step})
  checkpointer.close()


def _damage(step_directory):
  for path in step_directory.rglob('*'):
    if path.is_file():
      path.write_bytes(b'garbage')


def _restore_latest(directory):
  """(restored state, its data state, the Checkpointer it came from: still open)."""
  checkpointer = checkpoint_lib.Checkpointer(str(directory), async_save=False)
  state, data_state = checkpointer.restore_latest(_state(0))
  return state, data_state, checkpointer


def test_a_damaged_newest_step_is_moved_aside_and_the_resumed_run_saves_it_again(tmp_path):
  _save(tmp_path, 4, 8)
  _damage(tmp_path / '8')
  state, data_state, checkpointer = _restore_latest(tmp_path)
  _assert_equal(state, _state(4))
  assert data_state == {'step': 4}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['4', '8.corrupt']
  assert checkpointer.latest_step() == 4
  # Whatever takes the newest step takes step 4, not the damaged one.
  _assert_equal(checkpoint_lib.restore_params(str(tmp_path), _abstract(PARAMS)),
                _state(4)['params'])

  checkpointer.save(8, _state(8), {'step': 8})  # Before, skipped: step 8 was on disk.
  checkpointer.close()
  state, data_state, checkpointer = _restore_latest(tmp_path)
  checkpointer.close()
  _assert_equal(state, _state(8))
  assert data_state == {'step': 8}

  _damage(tmp_path / '8')  # Damaged again: the first one set aside stays as it was.
  _restore_latest(tmp_path)[2].close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['4', '8.corrupt', '8.corrupt-1']


def test_a_damaged_step_that_cannot_be_moved_aside_stops_the_run(tmp_path, monkeypatch):
  _save(tmp_path, 4, 8)
  _damage(tmp_path / '8')

  def refuse(source, destination):
    raise PermissionError(f'cannot rename {source} to {destination}')

  monkeypatch.setattr(checkpoint_lib.os, 'rename', refuse)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    checkpointer.restore_latest(_state(0))  # Else it would resume at 4 and never save 8 again.
  checkpointer.close()
  assert str(e.value).startswith(f'checkpoint steps [8] in {tmp_path} do not restore and could '
                                 'not be moved aside (PermissionError: cannot rename')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['4', '8']


def test_when_no_step_restores_each_is_named_and_none_is_moved(tmp_path):
  _save(tmp_path, 4, 8)
  for step in ('4', '8'):
    _damage(tmp_path / step)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(checkpoint_lib.CheckpointError, match='could be restored') as e:
    checkpointer.restore_latest(_state(0))
  checkpointer.close()
  assert 'step 8: ' in str(e.value) and 'step 4: ' in str(e.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['4', '8']


def test_the_newest_step_of_a_run_ignores_steps_set_aside(tmp_path):
  _save(tmp_path / 'run' / 'checkpoints', 4)
  (tmp_path / 'run' / 'checkpoints' / '12.corrupt').mkdir()  # Holds nothing restorable.
  for path in ('run', 'run/checkpoints'):
    _assert_equal(checkpoint_lib.restore_params(str(tmp_path / path), _abstract(PARAMS)),
                  _state(4)['params'])


def test_a_run_resumed_past_a_damaged_final_step_saves_that_step_intact(tmp_path):
  config = config_lib.base_config()
  config.model.update(vocab_size=512, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      d_ff=64, max_seq_len=32, dtype='float32')
  config.train.update(steps=8, batch_size=4, warmup_steps=2, log_every=4, eval_every=8,
                      eval_batches=1, checkpoint_every=4)
  config.data.update(seq_len=32, max_chars=30_000, tokenizer_train_chars=30_000)
  first, _ = train_lib.train(config, str(tmp_path))
  _damage(tmp_path / 'checkpoints' / '8')
  resumed, _ = train_lib.train(config, str(tmp_path))  # From step 4, through step 8 again.
  assert int(resumed.step) == 8
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['4', '8', '8.corrupt']
  saved = checkpoint_lib.restore_params(str(tmp_path), _abstract(first.params))
  _assert_equal(saved, jax.tree.map(np.asarray, first.params))
