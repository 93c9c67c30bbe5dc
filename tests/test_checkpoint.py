import jax
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib

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
