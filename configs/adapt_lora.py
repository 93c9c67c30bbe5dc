"""Continued pretraining of a pretrained Llama on a new language with LoRA and new embeddings.

The OpenHathi recipe: import a Llama-2 checkpoint, extend its tokenizer and embeddings with a
Hindi tokenizer, then train LoRA adapters on every projection together with the (new and old)
embeddings on mostly-Hindi text, the base weights frozen bit for bit:

  python -m lm.convert hf-to-lm --hf Llama-2-7b-hf --out llama2
  python -m lm.tokenizer train --input hindi.txt --vocab_size 16000 --out hindi
  python -m lm.tokenizer merge --base llama2/tokenizer.model --add hindi.model \\
      --check english.txt --out merged.model
  python -m lm.vocab extend-checkpoint --checkpoint llama2 --base llama2/tokenizer.model \\
      --merged merged.model --init subword_mean --out llama2_hi
  python -m lm.main --config configs/adapt_lora.py --workdir run --config.init_from=llama2_hi
  python -m lm.convert lm-to-hf --checkpoint run --tokenizer merged.model --out llama2_hi_hf

The model's shape and tokenizer come from init_from (config.model_from_init). A tenth of the rows
are English, to limit forgetting; evaluation reports eval_hi_* and eval_en_* separately, so the
English perplexity shows any forgetting. Sized for Llama-2-7B on one 80 GB GPU (bf16 compute,
remat, 4 micro-batches: lm.memory plans 60 GiB with a 48k merged vocabulary; the frozen fp32
weights take 27 GB) or a TPU slice (fsdp over all devices); notebooks/adapt_llama.ipynb runs the
same recipe on a tiny model on CPU.
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.model_from_init = True  # Shape and tokenizer from --config.init_from's config.json.
  config.model.update(dtype='auto', remat=True, scan_layers=True)
  config.lora.update(rank=64, alpha=128.0, dropout=0.05, targets='all')
  config.train.update(
      trainable='lora,embeddings', steps=20_000, batch_size=64, grad_accum_steps=4,
      learning_rate=2e-4, warmup_steps=200, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0,
      log_every=10, eval_every=500, eval_batches=32, checkpoint_every=500)
  config.data.update(
      mixture='hi=tfds:wiki40b/hi:train@0.9; en=tfds:wiki40b/en:train@0.1', seq_len=2048,
      eval_fraction=0.005)
  config.mesh.update(data=1, fsdp=-1)  # Any device count; the frozen weights split over all.
  return config
