import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from lm import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_sessionstart(session):
  del session
  assert jax.device_count() == 8, 'set XLA_FLAGS before anything imports jax'


@pytest.fixture(scope='session')
def stdlib_tokenizer(tmp_path_factory):
  """A 512-piece tokenizer trained once on the standard library's source."""
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  data_config = config_lib.base_config().data
  data_config.update(max_chars=300_000, tokenizer_train_chars=300_000, seq_len=64)
  workdir = tmp_path_factory.mktemp('tokenizer')
  data = data_lib.make_data(data_config, vocab_size=512, batch_size=8, seed=0,
                            workdir=str(workdir))
  return data.tokenizer.path
