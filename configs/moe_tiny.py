"""configs/tiny.py with Mixture-of-Experts blocks: 8 experts of width 128, top-2, in every block.

Each token runs 2 experts of width 128 where tiny.py runs one MLP of width 384 (2/3 of its MLP
compute), while the model holds 8/3 times tiny.py's MLP weights. Trains offline on CPU in a few
minutes:

  python -m lm.main --config configs/moe_tiny.py --workdir /tmp/lm-moe
"""

import os

from lm.config import load_config


def get_config():
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))
  config.unlock()
  config.model.d_ff = 128
  config.model.moe.update(num_experts=8, top_k=2, capacity_factor=1.25, every_n_layers=1,
                          load_balance_loss=0.01, router_z_loss=0.001)
  return config
