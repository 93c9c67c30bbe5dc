import os
import tempfile

# Silent broadcasting between arrays of different ranks is an error in the tests (set before JAX
# starts, so subprocesses that run lm inherit it); and one BLAS thread, since scipy's small
# L-BFGS fits run ~10x slower with OpenBLAS threads fighting pytest's workers for the cores.
os.environ.setdefault('JAX_NUMPY_RANK_PROMOTION', 'raise')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
# One persistent compilation cache for every test process (pytest's workers, the CLIs and
# notebooks they start): the suite compiles the same small programs many times over, and on two
# CPU cores compiling is most of its time. JAX keys an entry by the whole program, its options
# and the JAX version, so a hit is the executable a fresh compile would give.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'lm-tests-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(2 * 2 ** 30))  # Bytes, LRU.

# tests/multidevice needs 8 fake CPU devices, which must be set before JAX starts; the main
# suite runs on one device, so test_multidevice.py runs that folder in its own pytest process.
if os.environ.get('LM_MULTIDEVICE') != '1':
  collect_ignore = ['multidevice']


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# The files that take longest (minutes each, on two cores), started first: pytest's two workers
# take whole files in collection order, so a long one collected last would run on its own.
LONGEST_FIRST = ('test_notebooks.py', 'test_multidevice.py', 'test_multidevice_models.py',
                 'test_encoder_decoder.py', 'test_moe.py', 'test_sweep.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the rest in order.


@pytest.fixture(scope='session')
def tiny_llama(tmp_path_factory):
  """A random tiny HF Llama, its tokenizer and its lm.convert output (tests/eval_fixtures.py)."""
  import requirements  # pylint: disable=g-import-not-at-top
  requirements.require('torch')
  import eval_fixtures  # pylint: disable=g-import-not-at-top
  return eval_fixtures.build_tiny_llama(str(tmp_path_factory.mktemp('tiny_llama')))


@pytest.fixture(scope='session')
def local_tasks(tmp_path_factory):
  """(include_path, {kind: task name}) of local lm-eval tasks over JSONL files."""
  import eval_fixtures  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.mktemp('tasks'))
  return directory, eval_fixtures.write_tasks(directory)


@pytest.fixture(scope='session')
def stdlib_tokenizer(tmp_path_factory):
  """A 512-piece tokenizer trained once on the standard library's source (seq_len 64, 300k
  characters), shared by the training-loop tests (tests/test_train.py, tests/test_moe.py)."""
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm import data as data_lib  # pylint: disable=g-import-not-at-top
  data_config = config_lib.base_config().data
  data_config.update(seq_len=64, max_chars=300_000, tokenizer_train_chars=300_000)
  data = data_lib.make_data(data_config, vocab_size=512, batch_size=8, seed=0,
                            workdir=str(tmp_path_factory.mktemp('tokenizer')))
  return data.tokenizer.path
