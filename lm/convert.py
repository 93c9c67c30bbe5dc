"""HuggingFace Llama checkpoints to lm checkpoints and back.

  python -m lm.convert hf-to-lm --hf HF_DIR --out CKPT_DIR [--param_dtype float32] \\
      [--rotary_layout hf|meta]
  python -m lm.convert lm-to-hf --checkpoint RUN_OR_CKPT --out HF_DIR [--tokenizer SPM.model] \\
      [--dtype float32|bfloat16|float16] [--max_shard_size 5GB]
  python -m lm.convert lm-to-peft --checkpoint LORA_RUN --out ADAPTER_DIR [--base NAME_OR_PATH]

Every tensor maps through one table, _TENSORS: an HF name, the lm parameter it becomes, and both
layouts as axis letters (V vocab, D d_model, H query heads, K kv heads, Q head dim, F d_ff; a comma
separates the axes of HF's 2-D matrix, so 'HQ,D' is q_proj's [H*Q, D]). HF stores nn.Linear
weights as [out, in]; lm stores [in..., out...] with the heads as their own axes, so a conversion
is a reshape and a transpose, and the lm layers are stacked along a leading [L] axis.

Rotary embeddings need no permutation. HF's Llama (LlamaRotaryEmbedding, rotate_half) and lm
(lm.model.rotary) both rotate dimension i of a head with dimension i + Q/2 at frequency
theta^(-2i/Q): the 'rotate-half' layout, into which HF's convert_llama_weights_to_hf already
permuted the q/k rows of Meta's checkpoints. Meta's own layout rotates the interleaved pairs
(2i, 2i+1) instead; `permute_rotary` and `unpermute_rotary` convert q/k weights between the two
(HF's `permute`), and `--rotary_layout meta` reads HF-named tensors whose q/k are still in Meta's
layout. tests/test_convert.py checks that lm's logits equal transformers' to 1e-4.

hf-to-lm writes a directory like lm.vocab's extended checkpoint, so `config.init_from=OUT` and
`python -m lm.vocab extend-checkpoint --checkpoint OUT` take it:
  params/          the parameters (an orbax item; lm.checkpoint.restore_params reads it)
  config.json      lm.config.base_config() with the model's fields, init_from pointing here
  config.py        get_config() of config.json, wherever the directory has moved (code: prefer
                   `--config OUT/config.json`, which runs none)
  tokenizer.model  the HF directory's SentencePiece model, when it has one (data.tokenizer)
  hf_config.json   the HF config.json as it was, so lm-to-hf restores its token ids and dtype
  conversion.json  what was done (hf_to_lm's summary)
lm-to-hf writes config.json, generation_config.json, model.safetensors (or shards of at most
max_shard_size with model.safetensors.index.json) and, given a SentencePiece model, tokenizer.model
with tokenizer_config.json and special_tokens_map.json for transformers' LlamaTokenizer. A tensor
read from HF in bf16 or fp16 and stored in fp32 is exported back bit-for-bit. LoRA adapters are
merged into their weights; lm-to-peft writes them instead, unmerged, as a PEFT adapter (lora_A
[r, in] and lora_B [out, r] per projection, the same alpha / r scaling).

Configs lm cannot compute exactly are refused, naming the field: activations other than SiLU,
biases, a head_dim other than hidden_size / num_attention_heads, rope scaling of any kind,
quantization, Mistral's sliding window, and models other than llama (and mistral without one).
"""

import argparse
from collections.abc import Sequence
import glob
import json
import logging
import math
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
import sentencepiece as spm

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import files as files_lib
from lm import model as model_lib
from lm import vocab as vocab_lib

DTYPES = ('float32', 'bfloat16', 'float16')
ROTARY_LAYOUTS = ('hf', 'meta')

# HF tensor ('{}': the layer) -> lm parameter ('blocks/...' leaves have a leading [L] axis),
# HF layout -> lm layout.
_TENSORS = (
    ('model.embed_tokens.weight', 'embed', 'V,D', 'VD'),
    ('model.layers.{}.input_layernorm.weight', 'blocks/attention_norm/scale', 'D', 'D'),
    ('model.layers.{}.self_attn.q_proj.weight', 'blocks/attention/w_q', 'HQ,D', 'DHQ'),
    ('model.layers.{}.self_attn.k_proj.weight', 'blocks/attention/w_k', 'KQ,D', 'DKQ'),
    ('model.layers.{}.self_attn.v_proj.weight', 'blocks/attention/w_v', 'KQ,D', 'DKQ'),
    ('model.layers.{}.self_attn.o_proj.weight', 'blocks/attention/w_o', 'D,HQ', 'HQD'),
    ('model.layers.{}.post_attention_layernorm.weight', 'blocks/mlp_norm/scale', 'D', 'D'),
    ('model.layers.{}.mlp.gate_proj.weight', 'blocks/mlp/w_gate', 'F,D', 'DF'),
    ('model.layers.{}.mlp.up_proj.weight', 'blocks/mlp/w_up', 'F,D', 'DF'),
    ('model.layers.{}.mlp.down_proj.weight', 'blocks/mlp/w_down', 'D,F', 'FD'),
    ('model.norm.weight', 'final_norm/scale', 'D', 'D'),
    ('lm_head.weight', 'unembed', 'V,D', 'DV'),  # Absent when the embeddings are tied.
)
# Buffers some checkpoints carry that hold no parameters (recomputed from the config).
_IGNORED = re.compile(r'\.rotary_emb\.inv_freq$')
_SHARD = 'model-{:05d}-of-{:05d}.safetensors'
_INDEX = 'model.safetensors.index.json'


def permute_rotary(w_NQxD: np.ndarray, num_heads: int) -> np.ndarray:
  """q/k rows [heads * Q, D] from Meta's interleaved rotary layout (pairs 2i, 2i+1) to the
  rotate-half layout (pairs i, i + Q/2) of HF and lm; HF's convert_llama_weights_to_hf `permute`."""
  n, d = w_NQxD.shape
  return w_NQxD.reshape(num_heads, n // num_heads // 2, 2, d).swapaxes(1, 2).reshape(n, d)


def unpermute_rotary(w_NQxD: np.ndarray, num_heads: int) -> np.ndarray:
  """The inverse of permute_rotary: rotate-half rows back to Meta's interleaved layout."""
  n, d = w_NQxD.shape
  return w_NQxD.reshape(num_heads, 2, n // num_heads // 2, d).swapaxes(1, 2).reshape(n, d)


def to_lm(w, hf_axes: str, lm_axes: str, sizes: dict) -> np.ndarray:
  """An HF tensor in lm's layout, e.g. q_proj [H*Q, D] ('HQ,D') -> w_q [D, H, Q] ('DHQ')."""
  flat = hf_axes.replace(',', '')
  w = np.asarray(w).reshape([sizes[a] for a in flat])
  return w.transpose([flat.index(a) for a in lm_axes])


def to_hf(w, hf_axes: str, lm_axes: str, sizes: dict) -> np.ndarray:
  """The inverse of to_lm, as a contiguous array (what safetensors writes)."""
  flat = hf_axes.replace(',', '')
  w = np.asarray(w).transpose([lm_axes.index(a) for a in flat])
  return np.ascontiguousarray(w.reshape(hf_shape(hf_axes, sizes)))


def hf_shape(hf_axes: str, sizes: dict) -> tuple[int, ...]:
  return tuple(math.prod(sizes[a] for a in group) for group in hf_axes.split(','))


def tensors(cfg: model_lib.ModelConfig):
  """(HF name, lm path as a tuple, layer or None, HF axes, lm axes) of every tensor of `cfg`."""
  for name, path, hf_axes, lm_axes in _TENSORS:
    if path == 'unembed' and cfg.tie_embeddings:
      continue
    layers = range(cfg.num_layers) if '{}' in name else [None]
    for layer in layers:
      yield name.format(layer), tuple(path.split('/')), layer, hf_axes, lm_axes


def axis_sizes(cfg: model_lib.ModelConfig) -> dict:
  return dict(V=cfg.vocab_size, D=cfg.d_model, H=cfg.num_heads, K=cfg.num_kv_heads,
              Q=cfg.head_dim, F=cfg.d_ff)


# ---------------------------------------------------------------------------------------------
# HF -> lm.


def hf_to_lm(hf_dir: str, out: str, param_dtype: str = 'float32',
             rotary_layout: str = 'hf') -> dict:
  """Converts the HF Llama checkpoint in `hf_dir` (config.json and *.safetensors) into the lm
  checkpoint directory `out` (see above); returns what it did.

  Raises ValueError naming the config field, file or tensor that does not fit, FileExistsError
  when `out` holds anything. Everything is read and checked before `out` appears, whole.
  """
  if param_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f'param_dtype={param_dtype!r}: expected float32 or bfloat16')
  if rotary_layout not in ROTARY_LAYOUTS:
    raise ValueError(f'rotary_layout={rotary_layout!r}: expected one of {ROTARY_LAYOUTS}')
  out = files_lib.new_directory(out)
  config_path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(config_path):
    raise ValueError(f'{hf_dir} has no config.json: expected a HuggingFace model directory')
  with open(config_path) as f:
    hf_config = json.load(f)
  config = config_lib.base_config()
  config.model.update(model_fields(hf_config, config_path), param_dtype=param_dtype)
  config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
  config_lib.validate(config)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  files = safetensors_files(hf_dir)
  params = read_params(files, cfg, rotary_layout)

  tokenizer = _sentencepiece_model(os.path.join(hf_dir, 'tokenizer.model'))
  if tokenizer:
    config.data.tokenizer = os.path.join(out, 'tokenizer.model')
  config.init_from = out
  summary = dict(
      hf=os.path.abspath(hf_dir), out=out, files=len(files),
      hf_dtype=_hf_dtype(hf_config) or 'unrecorded', param_dtype=param_dtype,
      rotary_layout=rotary_layout, num_params=model_lib.count_params(params),
      **{k: config.model[k] for k in ('vocab_size', 'd_model', 'num_layers', 'num_heads',
                                      'num_kv_heads', 'd_ff', 'tie_embeddings', 'rope_theta')},
      tokenizer=tokenizer or '')

  with files_lib.atomic_directory(out) as directory:
    checkpoint_lib.save_params(directory, params)
    if tokenizer:
      shutil.copyfile(tokenizer, os.path.join(directory, 'tokenizer.model'))
    shutil.copyfile(config_path, os.path.join(directory, 'hf_config.json'))
    vocab_lib.write_checkpoint_config(directory, config)
    _write_text(directory, {'conversion.json': json.dumps(summary, indent=2)})
  return summary


def _sentencepiece_model(path: str) -> str | None:
  """path if it is a SentencePiece model; None if absent or another format (Llama-3's
  tokenizer.model is a tiktoken BPE file, which lm's tokenizer does not read)."""
  if not os.path.isfile(path):
    return None
  try:
    spm.SentencePieceProcessor(model_file=path)
  except (OSError, RuntimeError):
    logging.warning('%s is not a SentencePiece model (a tiktoken file?): not copied; set '
                    'config.data.tokenizer to a SentencePiece model to train on text', path)
    return None
  return path


def model_fields(hf_config: dict, where: str) -> dict:
  """config.model's fields for an HF Llama config; ValueError naming a field lm cannot follow."""
  c = hf_config
  model_type = c.get('model_type')
  if model_type not in ('llama', 'mistral'):
    raise ValueError(f'{where}: model_type={model_type!r}; only llama (and mistral without a '
                     'sliding window) convert')
  if c.get('sliding_window') is not None:
    raise ValueError(f'{where}: sliding_window={c["sliding_window"]!r}; lm attends to the whole '
                     'context (only null converts)')
  for field, wanted in (('hidden_act', ('silu', 'swish')), ('attention_bias', (False, None)),
                        ('mlp_bias', (False, None)), ('quantization_config', (None,))):
    if c.get(field) not in wanted:
      raise ValueError(f'{where}: {field}={c.get(field)!r}; lm supports only {wanted[0]!r}')
  missing = [f for f in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                         'intermediate_size') if not isinstance(c.get(f), int)]
  if missing:
    raise ValueError(f'{where}: {missing[0]}={c.get(missing[0])!r}; expected an integer')
  heads, d_model = c['num_attention_heads'], c['hidden_size']
  if c.get('head_dim') not in (None, d_model // heads) or d_model % heads:
    raise ValueError(f'{where}: head_dim={c.get("head_dim")!r} with hidden_size={d_model} and '
                     f'num_attention_heads={heads}; lm needs head_dim = hidden_size / heads')
  return dict(
      block='llama', vocab_size=c['vocab_size'], d_model=d_model,
      num_layers=c['num_hidden_layers'], num_heads=heads,
      num_kv_heads=c.get('num_key_value_heads') or heads, d_ff=c['intermediate_size'],
      max_seq_len=c.get('max_position_embeddings', 2048),
      tie_embeddings=bool(c.get('tie_word_embeddings', False)),
      rope_theta=float(_rope_theta(c, where)), norm_eps=float(c.get('rms_norm_eps', 1e-6)))


def _rope_theta(c: dict, where: str) -> float:
  """rope_theta from transformers 5's rope_parameters dict or the older top-level rope_theta,
  refusing any rope scaling (rope_scaling or a rope_type other than 'default')."""
  scaling = c.get('rope_scaling')
  if scaling and scaling.get('rope_type', scaling.get('type')) != 'default':
    raise ValueError(f'{where}: rope_scaling={scaling!r}; lm has plain rotary embeddings only')
  rope = c.get('rope_parameters') or {}
  if rope.get('rope_type', 'default') != 'default' or set(rope) - {'rope_type', 'rope_theta'}:
    raise ValueError(f'{where}: rope_parameters={rope!r}; lm has plain rotary embeddings only '
                     "(rope_type 'default' and rope_theta)")
  return rope.get('rope_theta', c.get('rope_theta', 10_000.0))


def safetensors_files(hf_dir: str) -> list[str]:
  """The weight files: those model.safetensors.index.json names, or else every *.safetensors."""
  index = os.path.join(hf_dir, _INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)['weight_map'].values()))
    files = [os.path.join(hf_dir, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise ValueError(f'{index} names {missing[0]}, which does not exist')
    return files
  files = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
  if not files:
    raise ValueError(f'{hf_dir} holds no *.safetensors files (.bin and .pth weights are not read; '
                     'transformers save_pretrained(safe_serialization=True) writes safetensors)')
  return files


def read_params(files: list[str], cfg: model_lib.ModelConfig, rotary_layout: str = 'hf') -> dict:
  """lm params in cfg.param_dtype from HF safetensors files, one tensor at a time into
  preallocated stacked arrays, so memory peaks at about one copy of the model."""
  sizes, dtype = axis_sizes(cfg), jnp.dtype(cfg.param_dtype)
  target = jax.eval_shape(lambda: model_lib.init_params(cfg, 0))
  params = jax.tree.map(lambda x: np.empty(x.shape, dtype), target)
  expected = {t[0]: t for t in tensors(cfg)}
  _check_table_covers(params, expected.values())
  where, tied_head = {}, None
  for file in files:
    with safe_open(file, framework='numpy') as f:
      for name in f.keys():
        if name in where:
          raise ValueError(f'tensor {name} is in both {where[name]} and {file}')
        if name == 'lm_head.weight' and cfg.tie_embeddings:
          tied_head = file  # Tolerated if equal to the embedding; checked below.
          continue
        if name not in expected:
          if _IGNORED.search(name):
            continue
          raise ValueError(f'{file}: unexpected tensor {name} (shape '
                           f'{f.get_slice(name).get_shape()}), which no lm parameter takes')
        _, path, layer, hf_axes, lm_axes = expected[name]
        w = _read_tensor(f, name, file, hf_shape(hf_axes, sizes))
        if rotary_layout == 'meta' and path[-1] in ('w_q', 'w_k'):
          w = permute_rotary(w, sizes['H' if path[-1] == 'w_q' else 'K'])
        leaf = _leaf(params, path)
        leaf[() if layer is None else layer] = to_lm(w, hf_axes, lm_axes, sizes)
        where[name] = file
  missing = [n for n in expected if n not in where]
  if missing:
    raise ValueError(f'tensor {missing[0]} (and {len(missing) - 1} more) is missing from the '
                     f'{len(files)} safetensors files in {os.path.dirname(files[0])}; its '
                     'config.json says the model has it')
  if tied_head:
    with safe_open(tied_head, framework='numpy') as f:
      head = _read_tensor(f, 'lm_head.weight', tied_head, params['embed'].shape)
    if not np.array_equal(head.astype(dtype), params['embed']):
      raise ValueError(f'{tied_head}: tensor lm_head.weight differs from model.embed_tokens.weight '
                       'but config.json has tie_word_embeddings=true')
  return params


def _read_tensor(f, name: str, file: str, shape: tuple[int, ...]) -> np.ndarray:
  """Tensor `name` of the open safetensors file, if it has `shape` and a float dtype."""
  view = f.get_slice(name)
  if tuple(view.get_shape()) != shape:
    raise ValueError(f'{file}: tensor {name} has shape {tuple(view.get_shape())}, expected '
                     f'{shape} from config.json')
  if view.get_dtype() not in ('F64', 'F32', 'F16', 'BF16'):
    raise ValueError(f'{file}: tensor {name} has dtype {view.get_dtype()}; only float weights '
                     'convert (not quantized ones)')
  return view[:]  # get_tensor cannot make bf16 numpy arrays (safetensors 0.8); slicing can.


def _check_table_covers(params: dict, entries) -> None:
  paths = {tuple(k.key for k in path) for path, _ in jax.tree.leaves_with_path(params)}
  mapped = {entry[1] for entry in entries}
  if paths != mapped:
    raise ValueError(f'lm.convert._TENSORS does not fit lm.model: parameters {paths - mapped} '
                     f'have no HF tensor, {mapped - paths} are not in the model')


def _leaf(params: dict, path: tuple[str, ...]):
  for key in path:
    params = params[key]
  return params


def _original_hf_config(checkpoint: str, config, dtype: str | None):
  """(path, contents, export dtype) of the HF config.json the model was imported from (lm/config
  find_hf_config; None, {} when it was not): the dtype is `dtype`, else the original's, else fp32."""
  hf_source = config_lib.find_hf_config(checkpoint, config)
  hf_config = {}
  if hf_source:
    with open(hf_source) as f:
      hf_config = json.load(f)
  dtype = dtype or _hf_dtype(hf_config) or 'float32'
  if dtype not in DTYPES:
    raise ValueError(f'{hf_source}: dtype {dtype!r} is not one of {DTYPES}; pass dtype=')
  return hf_source, hf_config, dtype


def _hf_dtype(hf_config: dict) -> str | None:
  return hf_config.get('dtype') or hf_config.get('torch_dtype')


# ---------------------------------------------------------------------------------------------
# lm -> HF.


def lm_to_hf(checkpoint: str, out: str, tokenizer: str | None = None, dtype: str | None = None,
             max_shard_size: int | str = '5GB') -> dict:
  """Exports an lm checkpoint as an HF LlamaForCausalLM directory `out`; returns what it did.

  `checkpoint` is anything lm.checkpoint.restore_params reads, with the run's config.json in it
  or up to two directories above. LoRA adapters are merged into their weights. The dtype defaults
  to the one recorded in hf_config.json (next to config.json, or in config.init_from) when the
  model came from HF, else float32; the tokenizer to config.data.tokenizer when that file exists.
  """
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}: expected one of {DTYPES}')
  max_bytes = parse_size(max_shard_size)
  out = files_lib.new_directory(out)
  config = config_lib.checkpoint_config(checkpoint)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  if cfg.block != 'llama':
    raise ValueError(f'{checkpoint}: config.model.block={cfg.block!r}; only llama blocks export '
                     'as LlamaForCausalLM')
  if cfg.moe_num_experts:
    raise ValueError(f'{checkpoint}: config.model.moe.num_experts={cfg.moe_num_experts}; a Mixture '
                     'of Experts model does not export as LlamaForCausalLM')
  hf_source, hf_config, dtype = _original_hf_config(checkpoint, config, dtype)
  if tokenizer is None and config.data.tokenizer and os.path.isfile(config.data.tokenizer):
    tokenizer = config.data.tokenizer
  sp = _load_sentencepiece(tokenizer, cfg.vocab_size) if tokenizer else None

  target = jax.eval_shape(lambda: model_lib.init_params(cfg, 0))
  params = checkpoint_lib.restore_params(checkpoint, target)
  if cfg.lora_rank:
    from lm import lora  # pylint: disable=g-import-not-at-top
    params = lora.merge(params, cfg)
  np_dtype = jnp.dtype(dtype)
  shards = _plan_shards(cfg, np_dtype.itemsize, max_bytes)
  ids = _token_ids(hf_config, sp)
  summary = dict(
      checkpoint=os.path.abspath(checkpoint), out=out, dtype=dtype, files=len(shards),
      num_params=sum(int(np.size(x)) for x in jax.tree.leaves(params)),
      lora_merged=bool(cfg.lora_rank), tokenizer=os.path.abspath(tokenizer) if tokenizer else '',
      hf_config=hf_source or '', **ids)
  sizes = axis_sizes(cfg)

  with files_lib.atomic_directory(out) as directory:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = 'model.safetensors' if len(shards) == 1 else _SHARD.format(i + 1, len(shards))
      arrays = {name: to_hf(_leaf(params, path)[() if layer is None else layer], hf_axes,
                            lm_axes, sizes).astype(np_dtype, copy=False)
                for name, path, layer, hf_axes, lm_axes in shard}
      save_file(arrays, os.path.join(directory, file), metadata={'format': 'pt'})
      os.chmod(os.path.join(directory, file), 0o644)  # safetensors writes 0o600.
      weight_map.update(dict.fromkeys(arrays, file))
    files = {'config.json': hf_llama_config(cfg, dtype, ids),
             'generation_config.json': {k: v for k, v in ids.items() if v is not None}}
    if len(shards) > 1:
      total = sum(math.prod(hf_shape(t[3], sizes)) * np_dtype.itemsize for t in tensors(cfg))
      files[_INDEX] = dict(metadata=dict(total_size=total), weight_map=dict(sorted(
          weight_map.items())))
    if sp:
      shutil.copyfile(tokenizer, os.path.join(directory, 'tokenizer.model'))
      files.update(_tokenizer_files(sp, cfg.max_seq_len))
    _write_text(directory, {k: json.dumps(v, indent=2) + '\n' for k, v in files.items()})
  return summary


def lm_to_peft(checkpoint: str, out: str, base: str | None = None,
               dtype: str | None = None) -> dict:
  """Exports a LoRA run's adapters, not merged, as a PEFT adapter directory `out`
  (adapter_config.json, adapter_model.safetensors); returns what it did.

  `peft.PeftModel.from_pretrained(model, out)` applies them to the model the run started from
  (the HF original, or lm-to-hf of the run's init_from). `base` is what adapter_config.json names
  as that model; by default the original HF config's _name_or_path, if it has one. Only a run that
  trained nothing but its adapters (config.train.trainable='lora') can be exported this way: one
  that trained the embeddings too changed the base model, so export it merged with lm_to_hf.
  """
  from lm import lora as lora_lib  # pylint: disable=g-import-not-at-top
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}: expected one of {DTYPES}')
  out = files_lib.new_directory(out)
  config = config_lib.checkpoint_config(checkpoint)
  cfg = model_lib.ModelConfig.from_config(config, 'float32')
  if not cfg.lora_rank:
    raise ValueError(f'{checkpoint}: config.lora.rank=0, so there are no adapters to export; '
                     'use lm-to-hf')
  trained = {g.strip() for g in config.train.trainable.split(',')}
  if trained != {'lora'}:
    raise ValueError(
        f'{checkpoint}: config.train.trainable={config.train.trainable!r} trained more than the '
        'LoRA adapters, which PEFT adapters alone cannot carry; export the merged model with '
        'lm-to-hf')
  _, hf_config, dtype = _original_hf_config(checkpoint, config, dtype)
  params = checkpoint_lib.restore_params(
      checkpoint, jax.eval_shape(lambda: model_lib.init_params(cfg, 0)))
  sizes = dict(axis_sizes(cfg), R=cfg.lora_rank)
  arrays, modules = {}, []
  for name, path, layer, hf_axes, lm_axes in tensors(cfg):
    weight = path[-1]
    if weight not in cfg.lora_targets:
      continue
    n_in = lora_lib.INPUT_AXES[weight]
    hf_out, hf_in = hf_axes.split(',')  # HF stores a projection as [out, in].
    leaves = _leaf(params, path[:-1])
    prefix = 'base_model.model.' + name.removesuffix('.weight')
    arrays[prefix + '.lora_A.weight'] = to_hf(
        leaves[weight + '_lora_a'][layer], f'R,{hf_in}', lm_axes[:n_in] + 'R', sizes)
    arrays[prefix + '.lora_B.weight'] = to_hf(
        leaves[weight + '_lora_b'][layer], f'{hf_out},R', 'R' + lm_axes[n_in:], sizes)
    modules.append(name.split('.')[-2])
  np_dtype = jnp.dtype(dtype)
  arrays = {k: v.astype(np_dtype) for k, v in arrays.items()}
  adapter_config = dict(
      peft_type='LORA', task_type='CAUSAL_LM',
      base_model_name_or_path=base if base is not None else hf_config.get('_name_or_path', ''),
      r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
      target_modules=sorted(set(modules)), bias='none', fan_in_fan_out=False,
      inference_mode=True, init_lora_weights=True, use_rslora=False, use_dora=False,
      modules_to_save=None)

  with files_lib.atomic_directory(out) as directory:
    save_file(arrays, os.path.join(directory, 'adapter_model.safetensors'),
              metadata={'format': 'pt'})
    os.chmod(os.path.join(directory, 'adapter_model.safetensors'), 0o644)
    _write_text(directory, {'adapter_config.json': json.dumps(adapter_config, indent=2) + '\n'})
  return dict(checkpoint=os.path.abspath(checkpoint), out=out, dtype=dtype, rank=cfg.lora_rank,
              alpha=cfg.lora_alpha, target_modules=','.join(adapter_config['target_modules']),
              tensors=len(arrays), num_params=sum(int(v.size) for v in arrays.values()),
              base=adapter_config['base_model_name_or_path'])


def hf_llama_config(cfg: model_lib.ModelConfig, dtype: str, ids: dict) -> dict:
  """LlamaForCausalLM's config.json. rope_theta is written both at the top level (transformers
  4) and in rope_parameters (transformers 5), as is the dtype (torch_dtype, dtype)."""
  return dict(
      architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_act='silu', max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=None,
      rope_parameters=dict(rope_type='default', rope_theta=cfg.rope_theta),
      attention_bias=False, attention_dropout=0.0, mlp_bias=False, pretraining_tp=1,
      tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, use_cache=True,
      torch_dtype=dtype, dtype=dtype, **ids)


def parse_size(size: int | str) -> int:
  """Bytes in '5GB' (10^9, as HF counts), '512MiB' (2^20), '100KB' or an int."""
  if isinstance(size, int):
    return size
  units = dict(B=1, KB=10**3, MB=10**6, GB=10**9, TB=10**12, KIB=2**10, MIB=2**20, GIB=2**30,
               TIB=2**40)
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*', size)
  if not match or match.group(2).upper() not in units | {'': 1}:
    raise ValueError(f'max_shard_size={size!r}: expected bytes like 5GB, 500MB or 2GiB')
  return int(float(match.group(1)) * (units.get(match.group(2).upper()) or 1))


def _plan_shards(cfg: model_lib.ModelConfig, itemsize: int, max_bytes: int) -> list[list]:
  """The tensors in order, cut into shards of at most max_bytes (a larger tensor alone)."""
  shards, size = [[]], 0
  for entry in tensors(cfg):
    nbytes = math.prod(hf_shape(entry[3], axis_sizes(cfg))) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  return shards


def _load_sentencepiece(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
  if not os.path.isfile(path):
    raise ValueError(f'tokenizer {path} does not exist')
  sp = spm.SentencePieceProcessor()
  try:
    sp.Load(path)
  except (RuntimeError, OSError) as e:
    raise ValueError(f'tokenizer {path} is not a SentencePiece model: {e}') from e
  if sp.GetPieceSize() > vocab_size:
    raise ValueError(f'tokenizer {path} has {sp.GetPieceSize()} pieces, more than the model\'s '
                     f'model.vocab_size={vocab_size}: not the tokenizer it was trained with')
  return sp


def _token_ids(hf_config: dict, sp: spm.SentencePieceProcessor | None) -> dict:
  """bos/eos/pad ids: the original HF config's, else the tokenizer's, else Llama's 1 and 2."""
  if hf_config:
    return {k: hf_config.get(k) for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')}
  if sp:
    ids = (sp.bos_id(), sp.eos_id(), sp.pad_id())
    return dict(zip(('bos_token_id', 'eos_token_id', 'pad_token_id'),
                    (i if i >= 0 else None for i in ids)))
  return dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)


def _tokenizer_files(sp: spm.SentencePieceProcessor, max_seq_len: int) -> dict:
  """tokenizer_config.json and special_tokens_map.json for transformers' LlamaTokenizer, which
  builds itself from tokenizer.model. It encodes like SentencePiece except that text starting with
  whitespace loses one space (transformers' Metaspace pre-tokenizer adds the '▁' prefix only
  when the text does not start with one)."""
  special = {name: sp.IdToPiece(i) for name, i in (
      ('bos_token', sp.bos_id()), ('eos_token', sp.eos_id()), ('unk_token', sp.unk_id()),
      ('pad_token', sp.pad_id())) if i >= 0}
  config = dict(tokenizer_class='LlamaTokenizer', add_bos_token=True, add_eos_token=False,
                clean_up_tokenization_spaces=False, legacy=False, model_max_length=max_seq_len,
                sp_model_kwargs={}, **special)
  return {'tokenizer_config.json': config, 'special_tokens_map.json': special}


# ---------------------------------------------------------------------------------------------
# Output files.


def _write_text(directory: str, files: dict[str, str]) -> None:
  for name, text in files.items():
    with open(os.path.join(directory, name), 'w') as f:
      f.write(text)


# ---------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m lm.convert', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  to_lm_ = commands.add_parser('hf-to-lm', help='an HF Llama directory -> an lm checkpoint')
  to_lm_.add_argument('--hf', required=True, help='directory with config.json and *.safetensors')
  to_lm_.add_argument('--out', required=True, help='a new (or empty) checkpoint directory')
  to_lm_.add_argument('--param_dtype', choices=('float32', 'bfloat16'), default='float32')
  to_lm_.add_argument('--rotary_layout', choices=ROTARY_LAYOUTS, default='hf',
                      help="meta: q/k rows still in Meta's interleaved rotary layout")
  to_lm_.set_defaults(run=lambda a: hf_to_lm(a.hf, a.out, a.param_dtype, a.rotary_layout))
  to_hf_ = commands.add_parser('lm-to-hf', help='an lm checkpoint -> an HF Llama directory')
  to_hf_.add_argument('--checkpoint', required=True,
                      help='a converted or extended checkpoint, a workdir, or one of its steps')
  to_hf_.add_argument('--out', required=True, help='a new (or empty) directory')
  to_hf_.add_argument('--tokenizer', help='SentencePiece model (default: config.data.tokenizer)')
  to_hf_.add_argument('--dtype', choices=DTYPES,
                      help="default: the original HF model's, else float32")
  to_hf_.add_argument('--max_shard_size', default='5GB', help='e.g. 5GB, 500MB, 2GiB')
  to_hf_.set_defaults(run=lambda a: lm_to_hf(a.checkpoint, a.out, a.tokenizer, a.dtype,
                                             a.max_shard_size))
  to_peft = commands.add_parser(
      'lm-to-peft', help="a LoRA run's adapters -> a PEFT adapter directory (not merged)")
  to_peft.add_argument('--checkpoint', required=True, help='a LoRA workdir or one of its steps')
  to_peft.add_argument('--out', required=True, help='a new (or empty) directory')
  to_peft.add_argument('--base', help="the base model's name or path, for adapter_config.json")
  to_peft.add_argument('--dtype', choices=DTYPES,
                       help="default: the original HF model's, else float32")
  to_peft.set_defaults(run=lambda a: lm_to_peft(a.checkpoint, a.out, a.base, a.dtype))
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  try:
    summary = args.run(args)
  except (OSError, ValueError, checkpoint_lib.CheckpointError) as e:
    sys.exit(f'python -m lm.convert {args.command}: error: {e}')
  width = max(map(len, summary), default=0)
  for key, value in summary.items():
    print(f'{key:<{width}}  {value}')


if __name__ == '__main__':
  main()
