"""bench/generate.py's no-cache baseline decodes what the KV-cached decoder does."""

import importlib.util
import os

import numpy as np

from lm import generate
from lm import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  spec = importlib.util.spec_from_file_location(
      'bench_generate', os.path.join(ROOT, 'bench', 'generate.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_no_cache_baseline_equals_kv_cached_greedy_across_padding_buckets():
  """5-token prompts and 30 new tokens: the recomputed prefix grows through buckets 16 and 32."""
  cfg = model_lib.ModelConfig(vocab_size=97, d_model=32, num_layers=1, num_heads=4,
                              num_kv_heads=2, d_ff=48, max_seq_len=48, scan_layers=True)
  graphdef, params = model_lib.init(cfg, 0)
  prompts_BC = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 5)).astype(np.int32)
  cached = generate.sample(graphdef, params, prompts_BC.tolist(), max_new_tokens=30,
                           temperature=0, stop_tokens=[])
  uncached = _bench().no_cache_decoder(graphdef)(params, prompts_BC, 30)
  np.testing.assert_array_equal(uncached[:, :5], prompts_BC)
  np.testing.assert_array_equal(uncached[:, 5:], [c.tokens for c in cached])
