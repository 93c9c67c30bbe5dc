"""configs/llama_1b.py's shape with 8 experts, top-2, in every block (Mixtral's recipe at 1B
scale): 22 blocks of d_model 2048, each with 8 SwiGLU experts of width 5632. 6.43B parameters
in total and 1.86B active per token (lm.scaling.param_counts), so compute per token is that of
a ~1.9B dense model (6 N_active). For accelerators: experts split over config.mesh.expert
(all-to-all dispatch in capacity mode), the rest over data/fsdp; lm.memory's search finds
data=32 x expert=2 with remat at 63 GiB per device on 64 80-GiB devices:

  python -m lm.memory --config configs/moe_8x1b.py --num_devices 64 --device_gb 80
  python -m lm.main --config configs/moe_8x1b.py --workdir gs://BUCKET/moe_8x1b \\
      --config.mesh.data=32 --config.mesh.expert=2
"""

import os

from lm.config import load_config


def get_config():
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'llama_1b.py'))
  config.unlock()
  config.model.moe.update(num_experts=8, top_k=2, capacity_factor=1.25, every_n_layers=1,
                          load_balance_loss=0.01, router_z_loss=0.001)
  return config
