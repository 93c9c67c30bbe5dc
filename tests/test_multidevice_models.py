"""The other half of tests/multidevice (see test_multidevice.py): generation, evaluation and
post-training on 8 fake CPU devices."""

from test_multidevice import run_on_8_fake_devices

MODEL_FILES = ('test_generate.py', 'test_eval.py', 'test_post.py')


def test_generation_evaluation_and_post_training_on_8_fake_cpu_devices():
  run_on_8_fake_devices(*MODEL_FILES)
