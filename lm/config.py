"""The config contract: every field `lm` reads, its default and meaning, and its validation.

Configs under configs/ start from `base_config()` and change numbers. Run one with
`python -m lm.main --config configs/NAME.py --workdir DIR`, overriding any field with
`--config.train.steps=100`. Field names are a contract: sweeps and other tools set them by name.
"""

import importlib.util
import json
import os
import sys

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field `lm` reads, commented where it is defined; configs/*.py start from this."""
  config = ml_collections.ConfigDict()

  # What lm.main does with this config. 'train': train (resuming from DIR/checkpoints if present)
  # and evaluate on held-out text. 'sft': the same loop, fine-tuning on config.post's
  # prompt/response data (lm/post/); 'reward' and 'dpo': on its preference pairs. 'distill':
  # train on config.data's text toward config.distill.teacher's outputs (lm/distill.py).
  # 'sample': print completions of config.sample's prompts by the newest checkpoint in
  # DIR/checkpoints (the model fields must match the trained run's).
  config.mode = 'train'
  # Start a new run (no checkpoint in the workdir yet) from the parameters of this checkpoint: a
  # directory written by lm.vocab.extend_checkpoint, a training workdir, its checkpoints/ folder
  # or one step in it. Only parameters are taken: step, optimizer state and data position start
  # afresh, and the shapes must fit config.model. Once the run has saved a checkpoint it resumes
  # from its own. Empty: parameters are initialised randomly.
  config.init_from = ''
  # Take config.model's shape fields (block, sizes, vocab, tie_embeddings, rope_theta, norm_eps)
  # and, when empty, data.tokenizer from the config.json beside init_from's parameters (written
  # by lm.train, lm.convert and lm.vocab), so one config file continues any such checkpoint.
  config.model_from_init = False

  # ---------------------------------------------------------------------------------------------
  # Model: a transformer (lm/model.py).
  config.model = m = ml_collections.ConfigDict()
  # 'decoder': causal attention trained on next-token prediction (every mode). 'encoder': the
  # same blocks attending to their whole document both ways, trained as a masked language model
  # (config.mlm, lm/mlm.py; modes 'train' only: no KV cache, so no sampling or post-training).
  # 'encoder_decoder' (T5's family): an encoder of such blocks and a causal decoder whose blocks
  # also attend to the encoded input, trained on span corruption (config.span_corruption,
  # lm/span_corruption.py); modes 'train' and 'sample' (targets generated for an input).
  m.kind = 'decoder'
  m.encoder_layers = 0  # encoder_decoder: the encoder's blocks; 0: as many as num_layers.
  # encoder_decoder: the encoder reads the decoder's embedding table (T5), or (False) its own.
  m.shared_embeddings = True
  m.decoder_start_id = 1  # encoder_decoder: the decoder's first input (BOS in lm's tokenizers).
  # Block family. 'llama': RMSNorm, rotary positions, SwiGLU MLP, no biases.
  # 'gpt2': LayerNorm, learned absolute positions, GELU MLP, biases everywhere.
  m.block = 'llama'
  # Rows of the embedding: the tokenizer's vocabulary size, or that rounded up to a multiple of
  # 128 (lm/vocab.py pads extended vocabularies so; the extra rows are never used).
  m.vocab_size = 8192
  m.d_model = 512  # Width of the residual stream.
  m.num_layers = 8  # Number of transformer blocks.
  m.num_heads = 8  # Query heads; d_model must be divisible by it (head_dim = d_model // num_heads).
  # Key/value heads: num_heads for MHA, 1 for MQA, anything dividing num_heads for GQA.
  m.num_kv_heads = 8
  m.d_ff = 1408  # Hidden width of the MLP (for SwiGLU, each of the gate and up projections).
  m.max_seq_len = 1024  # Longest sequence the model accepts (size of the gpt2 position table).
  m.tie_embeddings = False  # Reuse the input embedding as the output projection.
  # A scalar head on the last token's hidden state: a reward model (mode='reward' sets it; a
  # checkpoint trained with it keeps it, so PPO can load it as its reward).
  m.reward_head = False
  # A scalar value head on every token's hidden state, sharing the trunk with the policy: PPO's
  # critic (mode='ppo' sets it; it starts at zero, so the policy's outputs are unchanged).
  m.value_head = False
  # Mixture of Experts (lm/moe.py): every every_n_layers-th block's MLP becomes num_experts expert
  # MLPs (each of width d_ff) and a router sending each token to top_k of them. 0: dense.
  m.moe = moe = ml_collections.ConfigDict()
  moe.num_experts = 0
  moe.top_k = 2  # Experts per token (1: Switch, 2: GShard/Mixtral).
  # Slots per expert in a row: ceil(capacity_factor * top_k * seq_len / num_experts); a token's
  # assignment beyond its expert's slots is dropped (counted as moe_dropped). 0: dropless (every
  # assignment computed, grouped matmuls via jax.lax.ragged_dot: fast on GPU/TPU, slow on CPU,
  # and the experts are not split over config.mesh.expert).
  moe.capacity_factor = 1.25
  moe.every_n_layers = 1  # 1: every block is MoE (Mixtral); 2: every other block (GShard, Switch).
  moe.load_balance_loss = 0.01  # Weight of Switch's load-balancing loss (1.0 at uniform routing).
  moe.router_z_loss = 0.001  # Weight of ST-MoE's router z-loss (mean squared router logsumexp).
  m.rope_theta = 10_000.0  # Base of the rotary frequencies (llama only).
  m.norm_eps = 1e-5  # Epsilon inside RMSNorm / LayerNorm.
  m.init_std = 0.02  # Std of the normal init; output projections are scaled by 1/sqrt(2*num_layers).
  # Compute dtype of matmuls and activations: 'float32', 'bfloat16', or 'auto' (bfloat16 on
  # GPU/TPU; on CPU whichever of the two a short matmul benchmark finds faster on this machine).
  # Parameters, logits, norms and the loss stay in float32 regardless.
  m.dtype = 'auto'
  m.param_dtype = 'float32'  # Storage dtype of parameters and optimizer state.
  # Recompute each block's activations in the backward pass, keeping only its input. Pair it
  # with scan_layers=True: with unrolled layers XLA:CPU was seen to merge the recomputation back
  # into the forward pass and save nothing. `python -m lm.memory` shows what it saves.
  m.remat = False
  # Run the blocks with lax.scan: faster compiles for deep models, and with FSDP only one
  # block's gathered weights live at a time (unrolled, XLA keeps every block's).
  m.scan_layers = False
  # Attention kernel (lm/attention.py): 'auto' ('blocked' on CPU, jax.nn.dot_product_attention
  # with its default implementation elsewhere, which jax 0.10 and 0.11 make XLA's, not cuDNN's),
  # 'xla' (jax.nn.dot_product_attention, XLA implementation), 'cudnn' (the same call forced to
  # cuDNN's fused flash attention: NVIDIA GPUs, bf16/fp16 compute; it never materialises the
  # [T, T] scores), 'einsum' (plain einsum + softmax over the full [T, T] scores), 'blocked'
  # (einsum + softmax computing only the causal lower triangle, in blocks; fastest on CPU).
  m.attention = 'auto'

  # ---------------------------------------------------------------------------------------------
  # Masked language modelling (model.kind='encoder'; lm/mlm.py, BERT's recipe). Each step selects
  # tokens of every row at random, seeded by the step and the row, and the loss is the
  # cross-entropy of the original tokens at the selected positions. The tokenizer needs a
  # '[MASK]' piece: the one the pipeline trains gets it; a given data.tokenizer must have one.
  config.mlm = mlm = ml_collections.ConfigDict()
  mlm.mask_rate = 0.15  # Chance that a real (non-padding) token is selected for prediction.
  mlm.mask_token_rate = 0.8  # Share of the selected tokens replaced by [MASK] in the input...
  mlm.random_token_rate = 0.1  # ...and by a uniformly random id; the rest are kept as they are.

  # ---------------------------------------------------------------------------------------------
  # Span corruption (model.kind='encoder_decoder'; lm/span_corruption.py, T5's objective). Each
  # training row of data.seq_len tokens is corrupted on device: noise_density of its tokens, in
  # spans of mean_noise_span_length, are each replaced in the encoder's input by one sentinel
  # piece <extra_id_K>, and the decoder predicts <extra_id_0> span_0 <extra_id_1> span_1 ... EOS.
  # The input is then about (1 - noise_density + noise_density / mean) * seq_len + 1 tokens long
  # and the targets noise_density * (1 + 1 / mean) * seq_len + 1 (T5: seq_len 568 -> 512 and 114).
  config.span_corruption = span = ml_collections.ConfigDict()
  span.noise_density = 0.15
  span.mean_noise_span_length = 3.0
  # <extra_id_K> pieces in the tokenizer the pipeline trains (T5's vocabulary has 100); at least
  # the spans of one row. A given data.tokenizer must have them, consecutive from <extra_id_0>.
  span.sentinels = 100

  # ---------------------------------------------------------------------------------------------
  # Distillation (config.mode='distill'; lm/distill.py): at each target token the loss is
  # (1 - alpha) * cross-entropy + alpha * temperature^2 * KL(teacher || student), both
  # distributions softened by the temperature. The teacher runs on each batch before the step.
  config.distill = distill = ml_collections.ConfigDict()
  # The teacher: any lm checkpoint (a training workdir, an lm.convert output, ...). It must share
  # the student's tokenizer (data.tokenizer defaults to the teacher's) and vocab_size.
  distill.teacher = ''
  distill.alpha = 0.5  # Weight of the KL term; 0: plain training, 1: the teacher's outputs alone.
  distill.temperature = 2.0  # Softens both distributions (Hinton et al.: 2-5 is typical).
  # 0: the teacher's whole distribution ([batch, seq, vocab] fp32 per step, exact KL); k > 0:
  # its k most likely tokens at each position, renormalised (vocab / k times less memory).
  distill.top_k = 0
  # A directory of precomputed top-k targets (`python -m lm.distill` with this config writes
  # them for the rows of train.steps steps): the run reads them from disk instead of holding and
  # running the teacher each step. '' computes them on the fly.
  distill.teacher_cache = ''
  distill.cache_dtype = 'float32'  # Of the stored log-probabilities: 'float32' or 'float16'.

  # ---------------------------------------------------------------------------------------------
  # Pruning while training (lm/prune.py's Schedule; any mode that trains). The projection
  # matrices of attention, MLPs and experts (embeddings too with include_embed) lose their
  # smallest |W| gradually: the target sparsity rises from 0 at start_step to `sparsity` at
  # end_step along Zhu & Gupta's cubic, pruning each matrix to it every `every` steps. A pruned
  # weight stays exactly zero through every later update (its zero is its mask), so resumes are
  # exact; `sparsity` (the share of zeros in the prunable matrices) is logged.
  config.prune = prune = ml_collections.ConfigDict()
  prune.sparsity = 0.0  # Final share of weights pruned in each matrix; 0: no schedule.
  prune.start_step = 0
  prune.end_step = 0  # Must lie in (start_step, train.steps] when sparsity > 0.
  prune.every = 10
  prune.include_embed = False
  # A masks.npz written by `python -m lm.prune` (OUT/masks.npz): applied when the run starts
  # (with config.init_from=OUT, a no-op) and kept through training, e.g. to recover a pruned
  # model's quality by fine-tuning or distillation (config.mode='distill' from the dense model).
  prune.masks = ''

  # ---------------------------------------------------------------------------------------------
  # Quantization-aware training (lm/quantize.py's fake_quantize): the model computes with its
  # weights quantized and dequantized by the quantizer `python -m lm.quantize` applies after
  # training (straight-through gradients into the float weights), so the checkpoint it ends with
  # loses little when quantized with the same bits and group_size; held-out metrics are those of
  # the quantized weights.
  config.qat = qat = ml_collections.ConfigDict()
  qat.bits = 0  # 8 or 4; 0: off.
  qat.group_size = 0  # 0: one scale per output channel; G: per G inputs (lm.quantize's).
  qat.include_embed = False  # The embedding tables too.

  # ---------------------------------------------------------------------------------------------
  # LoRA adapters (lm/lora.py): each targeted projection W computes x W + (alpha / rank) x A B,
  # with A [in, rank] (uniform init like PEFT's) and B [rank, out] starting at zero, so training
  # starts from the base model's exact outputs. Train them alone or with the embeddings through
  # config.train.trainable='lora' or 'lora,embeddings'; `lm.lora.merge` folds them into W.
  config.lora = lora = ml_collections.ConfigDict()
  lora.rank = 0  # Rank of A and B; 0: no adapters.
  lora.alpha = 16.0  # The update is scaled by alpha / rank, so changing rank keeps its size.
  lora.dropout = 0.0  # Dropout on an adapter's input while training (not on the frozen path).
  # Projections that get adapters, comma-separated among q, k, v, o (attention) and gate, up,
  # down (MLP; gate is llama-only); 'attention', 'mlp' and 'all' name those groups.
  lora.targets = 'all'

  # Adapters and prompt tuning (lm/peft.py), the other parameter-efficient methods. 'lora': LoRA
  # as config.lora says (none at rank 0); 'adapter': a bottleneck (D -> adapter_dim, GELU, ->
  # D, up projection starting at zero) after every attention and MLP output, trained with
  # config.train.trainable='adapter' or 'adapter,embeddings'; 'prompt' (decoders): prompt_tokens
  # soft-prompt embeddings before every row, trained with trainable='prompt'. Adapters cannot be
  # merged into the weights; the soft prompt takes prompt_tokens of config.model.max_seq_len.
  config.peft = peft = ml_collections.ConfigDict()
  peft.kind = 'lora'
  peft.adapter_dim = 16  # The adapters' bottleneck width r ('adapter').
  peft.prompt_tokens = 20  # Soft-prompt length N ('prompt').
  # 'vocab': the soft prompt starts as the embeddings of prompt_tokens random vocabulary ids
  # (drawn with prompt_seed; Lester et al., 2021); 'normal': drawn like the embeddings.
  peft.prompt_init = 'vocab'
  peft.prompt_seed = 0

  # ---------------------------------------------------------------------------------------------
  # Training (lm/train.py).
  config.train = t = ml_collections.ConfigDict()
  t.steps = 1000  # Total optimizer steps; the cosine schedule decays over exactly these.
  # End this run, with a checkpoint, after this many steps (e.g. to fit a job's time limit);
  # the next run resumes the same schedule. 0: run to train.steps.
  t.steps_per_run = 0
  t.batch_size = 32  # Global batch size in sequences per optimizer step.
  t.grad_accum_steps = 1  # Micro-batches per step (batch_size must be divisible by it).
  t.learning_rate = 3e-4  # Peak learning rate, reached after warmup.
  t.warmup_steps = 100  # Linear warmup from 0 to learning_rate.
  t.min_lr_ratio = 0.1  # Cosine decay ends at learning_rate * min_lr_ratio.
  # Resuming with a different steps, warmup_steps, learning_rate or min_lr_ratio would bend the
  # learning-rate curve mid-run, so it is refused unless this is True (the change is then logged
  # and the previous config.json kept as config.step-STEP.json).
  t.allow_schedule_change = False
  t.weight_decay = 0.1  # AdamW decoupled weight decay, applied to weight matrices and embeddings only.
  t.b1 = 0.9  # AdamW first-moment decay.
  t.b2 = 0.95  # AdamW second-moment decay.
  t.eps = 1e-8  # AdamW epsilon.
  t.grad_clip = 1.0  # Clip gradients to this global norm (0 disables).
  # Parameter groups to train, comma-separated names from PARAM_GROUPS below ('all',
  # 'embeddings'); the others stay bit-for-bit unchanged (weight decay too) and get no optimizer
  # state. Clipping then measures the trained parameters' gradients only.
  t.trainable = 'all'
  t.z_loss = 0.0  # Weight of the z-loss (log Z)^2 that keeps the softmax normaliser near 1 (PaLM: 1e-4).
  t.label_smoothing = 0.0  # Label smoothing of the cross-entropy.
  t.seed = 0  # Seeds parameter init, data shuffling and every other random choice.
  t.log_every = 10  # Write metrics (metrics.jsonl, TensorBoard) every this many steps.
  t.eval_every = 200  # Evaluate on the held-out split every this many steps (and at the end).
  t.eval_batches = 16  # Held-out batches per evaluation (fewer if the split is smaller).
  t.checkpoint_every = 200  # Save a checkpoint every this many steps (and at the end).
  t.keep_checkpoints = 3  # Keep this many most recent checkpoints.

  # ---------------------------------------------------------------------------------------------
  # Data (lm/data.py).
  config.data = d = ml_collections.ConfigDict()
  # Where documents come from:
  #   'stdlib'               the Python standard library's own source files (offline, real text)
  #   'text:GLOB'            local text files, one document per file
  #   'jsonl:GLOB'           local JSON-lines files, one document per line, text under data.text_field
  #   'tfds:NAME[:SPLIT]'    a TensorFlow Datasets dataset, e.g. 'tfds:lm1b', 'tfds:wiki40b/hi:train'
  #   'prepared:DIR'         token shards written by `python -m lm.prepare --workdir DIR`, packed
  #                          without tokenizing again (data.tokenizer: theirs, or refused if another)
  d.source = 'stdlib'
  d.text_field = 'text'  # Field holding the text in jsonl records and TFDS examples.
  d.seq_len = 512  # Tokens per training row (at most model.max_seq_len).
  d.tokenizer = ''  # SentencePiece .model file; empty: train one on the corpus, cached in the workdir.
  d.tokenizer_train_chars = 20_000_000  # Characters of text sampled to train that tokenizer.
  d.max_chars = 0  # Use only the first this many characters of the corpus (0: all of it).
  # Share of the token stream held out for evaluation, cut at the nearest document start, so no
  # document is on both sides (exact duplicate documents are dropped before the split).
  d.eval_fraction = 0.02
  # Train on several sources at once instead of data.source: 'NAME=SOURCE@WEIGHT; ...', e.g.
  # 'hi=text:/data/hi/*.txt@0.8; en=stdlib@0.2'. Each source is tokenized and split on its own;
  # WEIGHT / sum(weights) of the training rows come from source NAME (interleaved in a fixed
  # pattern, each source shuffled on its own; shares within about 1%), and evaluation
  # reports loss, perplexity and bits per byte per source (eval_NAME_loss, ...) besides the
  # overall ones, so forgetting of one language is visible. Empty: data.source alone.
  d.mixture = ''

  # ---------------------------------------------------------------------------------------------
  # Device mesh (lm/sharding.py). The four sizes multiply to the number of devices (all
  # processes together); one of them may be -1 to take the rest. Batch is split over
  # data x fsdp x expert.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data parallelism: parameters replicated.
  mesh.fsdp = 1  # ZeRO-3 style: parameters, gradients and optimizer state split along 'embed'.
  mesh.tensor = 1  # Megatron style: heads and MLP hidden units split; must divide both.
  # Expert parallelism (config.model.moe): the experts split over these devices, which also split
  # the batch; must divide moe.num_experts. Tokens reach their experts by all-to-all.
  mesh.expert = 1
  # Overrides of the logical-axis rules in lm/sharding.py, 'LOGICAL=AXIS[+AXIS],...', e.g.
  # 'vocab=,embed=fsdp+data'. Empty: the standard rules.
  mesh.rules = ''

  # ---------------------------------------------------------------------------------------------
  # Multiple processes (hosts) via jax.distributed (lm/distributed.py).
  config.distributed = dist = ml_collections.ConfigDict()
  # 'HOST:PORT' of process 0 (with num_processes and process_id below); 'auto' to let JAX find
  # the cluster itself (Cloud TPU pods, SLURM, Open MPI); empty: one process, unless SLURM or
  # Open MPI report several tasks.
  dist.coordinator_address = ''
  dist.num_processes = 1  # Processes in the job (with coordinator_address).
  dist.process_id = 0  # This process's index in [0, num_processes).
  dist.initialization_timeout = 300  # Seconds to wait for all processes before giving up.

  # ---------------------------------------------------------------------------------------------
  # Sampling (mode='sample'; lm/generate.py, KV-cached).
  config.sample = s = ml_collections.ConfigDict()
  s.prompt = ''  # Text to complete (BOS is prepended). Empty: only the prompts_file's.
  s.prompts_file = ''  # A text file with one more prompt per line (backslash escapes like \n work).
  s.max_new_tokens = 64  # Tokens to generate at most per completion (prompt + this <= max_seq_len).
  s.temperature = 1.0  # Softmax temperature; 0 is greedy decoding (deterministic).
  s.top_k = 0  # Sample among the k most likely tokens only; 0: no limit.
  s.top_p = 1.0  # Nucleus sampling: the most likely tokens holding this much probability; 1: all.
  s.num_samples = 1  # Completions per prompt (each with its own seed; with beam search, the best).
  s.seed = 0  # Seed of the first completion; the others count up from it.
  # Beam search with this many beams instead of sampling (temperature, top_k, top_p unused).
  # 0: sample.
  s.beam_size = 0
  s.length_alpha = 1.0  # Beam search ranks by sum(log p) / length**length_alpha.
  # Cut each completion before the first of these strings, '|'-separated, backslash escapes
  # understood (e.g. '\n\n|\ndef '). Generation also stops at the tokenizer's EOS.
  s.stop_strings = ''
  # Also write every (prompt, completion) to this JSONL file as {"prompt": ..., "response": ...}:
  # config.post.data's SFT records, e.g. a teacher's answers to distil (Zephyr's first step).
  s.output = ''

  # ---------------------------------------------------------------------------------------------
  # Post-training (mode='sft', 'reward', 'dpo', 'ppo' or 'grpo'; lm/post/). The model, optimizer, mesh and loop are config.model,
  # config.train and config.mesh's, as for pretraining; data.seq_len is the row length and
  # data.tokenizer (or init_from's tokenizer) encodes the examples.
  config.post = p = ml_collections.ConfigDict()
  # Examples: jsonl:GLOB (one JSON object per line), tfds:NAME[:SPLIT], or, real records on
  # every machine for offline runs, stdlib:functions (the standard library's documented
  # functions: prompt = signature and docstring, response = body) or stdlib:function_pairs (the
  # same prompt, chosen = its own body, rejected = the next function's).
  p.data = ''
  p.prompt_field = 'prompt'  # The record's prompt (not trained on).
  p.response_field = 'response'  # The record's response (trained on, with the EOS after it).
  # A FLAN-style template instead of the two fields: a name in lm.post.templates.FLAN_TEMPLATES
  # ('instruction', 'qa', 'translate') or MODULE:ATTRIBUTE naming a list of (input, target)
  # format strings over the record's fields; one is picked per example by train.seed.
  p.template = ''
  # Multi-turn data: a chat template from lm.post.templates.CHAT_TEMPLATES ('chatml', 'zephyr',
  # 'plain') over the record's messages ([{"role": system|user|assistant, "content": ...}]);
  # every assistant reply is trained. Empty: single-turn records.
  p.chat_template = ''
  p.messages_field = 'messages'
  p.chosen_field = 'chosen'  # mode='reward' or 'dpo': the preferred response...
  p.rejected_field = 'rejected'  # ...and the other one, to the same prompt.
  # mode='dpo': the frozen reference the policy is held near; empty: init_from (with LoRA, the
  # base without adapters). Its log-probabilities are computed once, before training.
  p.reference = ''
  p.beta = 0.1  # mode='dpo': the strength of the pull towards the reference.
  # mode='dpo': 'sigmoid' (DPO's -log sigmoid(beta * margin)) or 'ipo' (squared, per-token
  # log-ratios: Azar et al., 2023).
  p.loss_type = 'sigmoid'
  p.pack = True  # mode='sft': pack several examples into each row (segment ids keep them apart).
  # Reinforcement learning from the policy's own completions (mode='ppo' or 'grpo'): each step
  # completes train.batch_size / group_size prompts of post.data (prompt_field) group_size times
  # with lm.engine, scores them, then updates the policy update_epochs x minibatches times.
  # The score: a reward model (a mode='reward' checkpoint directory; same tokenizer)...
  p.reward_model = ''
  # ...or a Python function MODULE:NAME called as fn(prompts=[str], completions=[str], **fields)
  # -> [float], fields being the records' other fields (lists), as TRL's reward functions are.
  p.reward_function = ''
  p.missing_eos_penalty = 0.0  # Subtracted from the score of a completion cut at max_new_tokens.
  p.max_new_tokens = 32  # Longest completion; prompts are cut from the left to fit data.seq_len.
  p.temperature = 1.0  # Rollout sampling (0: greedy); top_k 0 and top_p 1 filter nothing.
  p.top_k = 0
  p.top_p = 1.0
  p.group_size = 1  # Completions per prompt: GRPO's group (>= 2); PPO usually 1.
  p.rollout_slots = 16  # lm.engine decode slots (sequences decoded together).
  p.update_epochs = 1  # Passes over each rollout batch (PPO's epochs, GRPO's iterations).
  p.minibatches = 1  # Optimizer updates per pass: batch_size / minibatches rows each.
  p.clip_epsilon = 0.2  # Clip of the probability ratio pi / pi_old in the policy loss.
  # The KL penalty to the reference (post.reference, default init_from; with LoRA the base with
  # adapters off): PPO subtracts kl_coef * (log pi_old - log ref) from each token's reward; GRPO
  # adds kl_coef * KL (the k3 estimate) per token to its loss. 0: no reference is evaluated.
  p.kl_coef = 0.05
  # Adapt kl_coef towards this KL per completion (log pi_old - log ref summed over its tokens;
  # Ziegler et al., 2019: +-20% at most per step, scaled by batch_size / kl_horizon); 0: fixed.
  p.kl_target = 0.0
  p.kl_horizon = 10000
  p.value_coef = 0.1  # mode='ppo': weight of the value loss (the value head shares the trunk).
  p.value_clip = 0.2  # mode='ppo': clip of the new value around the rollout's.
  p.gamma = 1.0  # mode='ppo': discount of generalised advantage estimation...
  p.gae_lambda = 0.95  # ...and its lambda.
  p.whiten_advantages = True  # mode='ppo': advantages to mean 0, std 1 over each batch's tokens.
  # mode='grpo': the loss is a mean over the batch's completion 'token's (DAPO) or a mean over
  # 'sequence's of each one's token mean (the GRPO paper); both over the whole batch.
  p.loss_normalization = 'token'
  p.eval_fraction = 0.05  # Share of the examples held out (at least one).
  p.max_examples = 0  # Read at most this many records; 0: all.
  return config


def load_config(path: str, **overrides) -> ml_collections.ConfigDict:
  """get_config() of a config file, e.g. load_config('configs/tiny.py', train={'steps': 50}).

  A relative path that does not exist from the working directory is looked up in the repository
  (so notebooks and scripts elsewhere can name 'configs/tiny.py').
  """
  if not os.path.exists(path) and not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'config file {path} does not exist')
  spec = importlib.util.spec_from_file_location(os.path.basename(path).removesuffix('.py'), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.lock()  # A misspelled override raises instead of adding a field nothing reads.
  for section, values in overrides.items():
    if isinstance(values, dict):
      config[section].update(values)
    else:
      config[section] = values
  return config


def config_from_json(path: str) -> ml_collections.ConfigDict:
  """A run's saved config.json over base_config(), so fields added since keep their defaults."""
  with open(path) as f:
    values = json.load(f)
  config = base_config()
  _update(config, values, f'{path}: config')
  return config


def config_from_checkpoint(checkpoint: str) -> ml_collections.ConfigDict:
  """The config to train on from `checkpoint` (a training workdir, an lm.convert or lm.vocab
  output): its saved config.json, with init_from set to it and data.tokenizer to its
  tokenizer.model when it has one.

  What `--config DIR/config.json` (configs/from_checkpoint.py) runs: JSON is data, whereas a
  config.py shipped with someone else's checkpoint is code that ml-collections would execute.
  """
  if os.path.basename(checkpoint) == 'config.json':
    checkpoint = os.path.dirname(checkpoint) or '.'
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f'checkpoint {checkpoint} does not exist')
  config = checkpoint_config(checkpoint)
  directory = run_directory(checkpoint)
  config.init_from = directory
  config.model_from_init = False  # Its config.json already holds the model it was made with.
  # An export's tokenizer.model, or a training run's own (trained into its workdir's cache).
  for tokenizer in ('tokenizer.model', os.path.join('tokenizer', 'spm.model')):
    if os.path.isfile(os.path.join(directory, tokenizer)):
      config.data.tokenizer = os.path.join(directory, tokenizer)
      break
  return config


def checkpoint_config(checkpoint: str) -> ml_collections.ConfigDict:
  """The run config of a checkpoint: config.json in it or up to two directories above (a step
  directory is WORKDIR/checkpoints/STEP). FileNotFoundError if there is none."""
  return config_from_json(os.path.join(run_directory(checkpoint), 'config.json'))


def run_directory(checkpoint: str) -> str:
  """The directory holding a checkpoint's config.json: the checkpoint or one of the two above."""
  directory = os.path.abspath(checkpoint)
  for _ in range(3):
    if os.path.isfile(os.path.join(directory, 'config.json')):
      return directory
    directory = os.path.dirname(directory)
  raise FileNotFoundError(
      f'no config.json in {checkpoint} or the two directories above it (lm.train, lm.convert '
      'and lm.vocab write one): the config the model was made with is needed')


def find_hf_config(checkpoint: str, config: ml_collections.ConfigDict) -> str | None:
  """hf_config.json (the HF config.json a model was imported from, lm/convert.py) beside the
  run's config.json (in the checkpoint or up to two directories above), or in the directory
  config.init_from names (a run started from an imported or extended model); None if neither."""
  directory = os.path.abspath(checkpoint)
  candidates = []
  for _ in range(3):
    candidates.append(directory)
    directory = os.path.dirname(directory)
  if config.init_from and '://' not in config.init_from:
    candidates.append(config.init_from)
  for directory in candidates:
    if os.path.isfile(os.path.join(directory, 'hf_config.json')):
      return os.path.join(directory, 'hf_config.json')
  return None


# The config.model fields that fix the parameters' shapes and the function the model computes.
MODEL_SHAPE_FIELDS = ('kind', 'block', 'vocab_size', 'd_model', 'num_layers', 'num_heads',
                      'num_kv_heads', 'd_ff', 'max_seq_len', 'tie_embeddings', 'rope_theta',
                      'norm_eps', 'encoder_layers', 'shared_embeddings', 'decoder_start_id')


def resolve_model_from_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config with config.model_from_init applied (a copy; config itself when it is False)."""
  if not config.model_from_init:
    return config
  if not config.init_from:
    raise ConfigError('config.model_from_init=True needs config.init_from (a checkpoint)')
  try:
    source = checkpoint_config(config.init_from)
  except FileNotFoundError as e:
    raise ConfigError(f'config.model_from_init: {e}') from None
  config = config.copy_and_resolve_references()
  for field in MODEL_SHAPE_FIELDS:
    config.model[field] = source.model[field]
  if not config.data.tokenizer:
    # The checkpoint's config names its tokenizer, or (one trained on first use, in its
    # workdir) generate.find_tokenizer finds it: a run recorded without one could not be loaded.
    from lm import generate  # pylint: disable=g-import-not-at-top
    try:
      config.data.tokenizer = generate.find_tokenizer(config.init_from, source)
    except FileNotFoundError:
      config.data.tokenizer = source.data.tokenizer
  return config


def _update(config: ml_collections.ConfigDict, values: dict, where: str) -> None:
  for name, value in values.items():
    if name not in config:
      raise ConfigError(f'{where}.{name} is not a field of lm.config.base_config()')
    if isinstance(value, dict):
      _update(config[name], value, f'{where}.{name}')
    else:
      config[name] = value


def parse_flags(argv):
  """absl's flag parser for the CLIs, with a misspelled --config.a.b override reported as one
  clear line instead of a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = _config_json_as_file(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    reason = str(e).strip('\'"').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
    sys.exit(f'error: no such config field ({reason}); overrides given: {overrides}')
  except flags.Error as e:
    sys.exit(f'error: {e}')


_FROM_CHECKPOINT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'from_checkpoint.py')


def _config_json_as_file(argv: list[str]) -> list[str]:
  """`--config PATH/config.json` (or a checkpoint directory) -> configs/from_checkpoint.py:PATH,
  so a saved config runs as data, without executing any code shipped beside it."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value, spelled = arg.split('=', 1)[1], lambda v: f'--config={v}'
    elif arg == '--config' and i + 1 < len(argv):
      value, spelled, i = argv[i + 1], lambda v: v, i + 1
    else:
      continue
    if value.endswith('.json') or os.path.isdir(value):
      argv[i] = spelled(f'{_FROM_CHECKPOINT}:{value}')
    break
  return argv


class ConfigError(ValueError):
  """A config field holds a value `lm` cannot run with; the message names the field."""


_CHOICES = {
    'mode': ('train', 'sft', 'reward', 'dpo', 'ppo', 'grpo', 'distill', 'sample'),
    'post.loss_type': ('sigmoid', 'ipo'),
    'post.loss_normalization': ('token', 'sequence'),
    'model.kind': ('decoder', 'encoder', 'encoder_decoder'),
    'qat.bits': (0, 8, 4),
    'model.block': ('llama', 'gpt2'),
    'model.dtype': ('auto', 'float32', 'bfloat16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.attention': ('auto', 'xla', 'cudnn', 'einsum', 'blocked'),
}
# Groups of parameters config.train.trainable can name, each a test on a parameter's logical axes
# (lm/model.py): 'embeddings' is the token embedding and the untied output projection, 'lora' the
# LoRA adapters (config.lora).
PARAM_GROUPS = {
    'all': lambda axes: True,
    'embeddings': lambda axes: 'vocab' in axes,
    'lora': lambda axes: 'lora_rank' in axes,
    'adapter': lambda axes: 'adapter_dim' in axes,  # config.peft.kind='adapter' (lm/peft.py).
    'prompt': lambda axes: 'prompt_tokens' in axes,  # config.peft.kind='prompt'.
}
_POSITIVE = (
    'model.vocab_size', 'model.d_model', 'model.num_layers', 'model.num_heads',
    'model.num_kv_heads', 'model.d_ff', 'model.max_seq_len', 'train.steps', 'train.batch_size',
    'train.grad_accum_steps', 'train.log_every', 'train.eval_every', 'train.eval_batches',
    'train.checkpoint_every', 'train.keep_checkpoints', 'data.seq_len',
    'distributed.num_processes', 'distributed.initialization_timeout', 'sample.max_new_tokens',
    'sample.num_samples')
_NON_NEGATIVE = (
    'train.warmup_steps', 'train.learning_rate', 'train.weight_decay', 'train.grad_clip',
    'train.z_loss', 'train.label_smoothing', 'train.min_lr_ratio', 'data.max_chars',
    'train.steps_per_run', 'sample.temperature', 'sample.top_k', 'sample.beam_size',
    'sample.length_alpha', 'sample.seed', 'lora.rank', 'lora.alpha', 'lora.dropout')


def _get(config, dotted):
  for name in dotted.split('.'):
    config = config[name]
  return config


def _validate_sample(config: ml_collections.ConfigDict) -> None:
  s = config.sample
  if not 0 < s.top_p <= 1:
    raise ConfigError(f'config.sample.top_p={s.top_p!r}: must be in (0, 1] (1: no nucleus filter)')
  if s.beam_size and s.num_samples > s.beam_size:
    raise ConfigError(f'config.sample.num_samples={s.num_samples} exceeds '
                      f'config.sample.beam_size={s.beam_size}: beam search returns its best beams')
  if config.mode == 'sample' and s.max_new_tokens >= config.model.max_seq_len:
    raise ConfigError(f'config.sample.max_new_tokens={s.max_new_tokens} leaves no room for a '
                      f'prompt in config.model.max_seq_len={config.model.max_seq_len}')
  if config.mode == 'sample' and not (s.prompt or s.prompts_file):
    raise ConfigError('config.mode=sample needs config.sample.prompt or config.sample.prompts_file')
  if s.prompts_file and not os.path.isfile(s.prompts_file):
    raise ConfigError(f'config.sample.prompts_file={s.prompts_file!r} does not exist')


def _validate_post(config: ml_collections.ConfigDict) -> None:
  from lm.post import templates  # pylint: disable=g-import-not-at-top
  p = config.post
  if not p.data:
    raise ConfigError(f'config.mode={config.mode!r} needs config.post.data (jsonl:GLOB or '
                      'tfds:NAME[:SPLIT])')
  stdlib = ('stdlib:functions', 'stdlib:function_pairs')
  if p.data not in stdlib and (p.data.partition(':')[0] not in ('jsonl', 'tfds')
                               or not p.data.partition(':')[2]):
    raise ConfigError(f'config.post.data={p.data!r}: expected jsonl:GLOB, tfds:NAME[:SPLIT] or '
                      f'one of {stdlib}')
  if p.chat_template and p.chat_template not in templates.CHAT_TEMPLATES:
    raise ConfigError(f'config.post.chat_template={p.chat_template!r}: expected one of '
                      f'{sorted(templates.CHAT_TEMPLATES)}')
  if p.chat_template and p.template:
    raise ConfigError('config.post.template and config.post.chat_template are both set: a '
                      'record is either one prompt/response or a conversation')
  if p.template:
    try:
      templates.flan_template(p.template)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if not 0 < p.eval_fraction < 1:
    raise ConfigError(f'config.post.eval_fraction={p.eval_fraction}: must be in (0, 1)')
  if p.max_examples < 0:
    raise ConfigError(f'config.post.max_examples={p.max_examples}: must be >= 0')
  if config.mode == 'dpo':
    if not p.beta > 0:
      raise ConfigError(f'config.post.beta={p.beta}: must be positive')
    if not (p.reference or config.init_from):
      raise ConfigError('config.mode=dpo needs a reference model: config.init_from (the policy '
                        'starts there and it is the reference) or config.post.reference')
    if p.reference and '://' not in p.reference and not os.path.isdir(p.reference):
      raise ConfigError(f'config.post.reference={p.reference!r}: no such directory')


def _validate_rl(config: ml_collections.ConfigDict) -> None:
  p, t, mode = config.post, config.train, config.mode
  if bool(p.reward_model) == bool(p.reward_function):
    raise ConfigError(f'config.mode={mode} needs exactly one of config.post.reward_model (a '
                      'reward model checkpoint) and config.post.reward_function (MODULE:NAME)'
                      f', got {p.reward_model!r} and {p.reward_function!r}')
  if p.reward_model and '://' not in p.reward_model and not os.path.isdir(p.reward_model):
    raise ConfigError(f'config.post.reward_model={p.reward_model!r}: no such directory')
  if p.reward_function and p.reward_function.count(':') != 1:
    raise ConfigError(f'config.post.reward_function={p.reward_function!r}: expected MODULE:NAME')
  for name in ('max_new_tokens', 'group_size', 'rollout_slots', 'update_epochs', 'minibatches',
               'kl_horizon'):
    if p[name] < 1:
      raise ConfigError(f'config.post.{name}={p[name]}: must be >= 1')
  if mode == 'grpo' and p.group_size < 2:
    raise ConfigError(f'config.post.group_size={p.group_size}: GRPO compares each completion '
                      'with the others of its prompt, so it needs at least 2')
  if t.batch_size % p.group_size:
    raise ConfigError(f'config.train.batch_size={t.batch_size} is not divisible by '
                      f'config.post.group_size={p.group_size} (completions per prompt)')
  if t.batch_size % (p.minibatches * t.grad_accum_steps):
    raise ConfigError(f'config.train.batch_size={t.batch_size} is not divisible by '
                      f'config.post.minibatches x config.train.grad_accum_steps = '
                      f'{p.minibatches} x {t.grad_accum_steps}')
  if p.max_new_tokens >= config.data.seq_len:
    raise ConfigError(f'config.post.max_new_tokens={p.max_new_tokens} leaves no room for a '
                      f'prompt in config.data.seq_len={config.data.seq_len}')
  if config.data.seq_len + 1 > config.model.max_seq_len:
    raise ConfigError(f'config.data.seq_len={config.data.seq_len}: a rollout of seq_len + 1 '
                      f'tokens must fit config.model.max_seq_len={config.model.max_seq_len}')
  for name in ('kl_coef', 'kl_target', 'missing_eos_penalty', 'temperature', 'top_k', 'value_coef',
               'value_clip', 'gamma', 'gae_lambda', 'clip_epsilon'):
    if p[name] < 0:
      raise ConfigError(f'config.post.{name}={p[name]}: must be >= 0')
  if not 0 < p.top_p <= 1:
    raise ConfigError(f'config.post.top_p={p.top_p}: must be in (0, 1]')
  if p.kl_target > 0 and p.kl_coef == 0:
    raise ConfigError(f'config.post.kl_target={p.kl_target} adapts config.post.kl_coef, which is '
                      '0 (and would stay 0): start it above 0')
  if (p.kl_coef > 0 or p.kl_target > 0) and not (p.reference or config.init_from):
    raise ConfigError(f'config.mode={mode} with a KL penalty needs a reference model: '
                      'config.init_from (the policy starts there) or config.post.reference')
  if p.reference and '://' not in p.reference and not os.path.isdir(p.reference):
    raise ConfigError(f'config.post.reference={p.reference!r}: no such directory')
  if mode == 'ppo' and not config.model.value_head:
    raise ConfigError('config.mode=ppo needs config.model.value_head=True (the critic)')


def _validate_lora(config: ml_collections.ConfigDict) -> None:
  from lm import lora as lora_lib  # pylint: disable=g-import-not-at-top
  lora, groups = config.lora, [g.strip() for g in config.train.trainable.split(',')]
  if lora.dropout >= 1:
    raise ConfigError(f'config.lora.dropout={lora.dropout}: must be < 1')
  if lora.rank > 0:
    try:
      lora_lib.lora_targets(lora.targets, config.model.block)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    if 'all' in groups:
      raise ConfigError(
          f'config.lora.rank={lora.rank} with config.train.trainable={config.train.trainable!r} '
          "would train the base weights too; use 'lora' or 'lora,embeddings'")
  elif 'lora' in groups:
    raise ConfigError(f'config.train.trainable={config.train.trainable!r} names lora, but '
                      'config.lora.rank=0 adds no adapters')


def _validate_peft(config: ml_collections.ConfigDict) -> None:
  from lm import peft as peft_lib  # pylint: disable=g-import-not-at-top
  peft, groups = config.peft, [g.strip() for g in config.train.trainable.split(',')]
  if peft.kind not in peft_lib.KINDS:
    raise ConfigError(f'config.peft.kind={peft.kind!r}: expected one of {peft_lib.KINDS}')
  if peft.kind != 'lora' and config.lora.rank > 0:
    raise ConfigError(f'config.peft.kind={peft.kind!r} with config.lora.rank={config.lora.rank}: '
                      "one method at a time; set config.lora.rank=0 or config.peft.kind='lora'")
  group = {'adapter': 'adapter', 'prompt': 'prompt'}.get(peft.kind)
  for name in ('adapter', 'prompt'):
    if name in groups and name != group:
      raise ConfigError(f'config.train.trainable={config.train.trainable!r} names {name}, but '
                        f'config.peft.kind={peft.kind!r} adds no {name} parameters')
  if group and 'all' in groups:
    raise ConfigError(
        f'config.peft.kind={peft.kind!r} with config.train.trainable={config.train.trainable!r} '
        f"would train the base weights too; use '{group}' or '{group},embeddings'")
  if peft.kind == 'adapter' and peft.adapter_dim < 1:
    raise ConfigError(f'config.peft.adapter_dim={peft.adapter_dim}: must be >= 1')
  if peft.kind != 'prompt':
    return
  if config.model.kind != 'decoder':
    raise ConfigError(f"config.peft.kind='prompt' prepends a soft prompt to a decoder's input; "
                      f'config.model.kind={config.model.kind!r} is not supported')
  if peft.prompt_tokens < 1:
    raise ConfigError(f'config.peft.prompt_tokens={peft.prompt_tokens}: must be >= 1')
  if peft.prompt_init not in peft_lib.PROMPT_INITS:
    raise ConfigError(f'config.peft.prompt_init={peft.prompt_init!r}: expected one of '
                      f'{peft_lib.PROMPT_INITS}')
  if config.data.seq_len + peft.prompt_tokens > config.model.max_seq_len:
    raise ConfigError(
        f'config.data.seq_len={config.data.seq_len} + config.peft.prompt_tokens='
        f'{peft.prompt_tokens} exceed config.model.max_seq_len={config.model.max_seq_len}: the '
        'soft prompt takes positions of its own')


# Modes that decode with a KV cache or score sequences causally: a decoder's alone.
DECODER_MODES = ('sample', 'sft', 'reward', 'dpo', 'ppo', 'grpo', 'distill')


def _validate_prune(config: ml_collections.ConfigDict) -> None:
  """config.prune: a sparsity in [0, 1) reached within the run, and a masks file that exists."""
  p, steps = config.prune, config.train.steps
  if not 0 <= p.sparsity < 1:
    raise ConfigError(f'config.prune.sparsity={p.sparsity!r}: must be in [0, 1) (the share of '
                      'each matrix pruned by the end of the schedule)')
  if p.sparsity and not 0 <= p.start_step < p.end_step <= steps:
    raise ConfigError(
        f'config.prune.end_step={p.end_step} with start_step={p.start_step}: the schedule needs '
        f'0 <= start_step < end_step <= config.train.steps={steps}')
  if p.every < 1:
    raise ConfigError(f'config.prune.every={p.every!r}: must be >= 1 (steps between updates)')
  if config.qat.group_size < 0:
    raise ConfigError(f'config.qat.group_size={config.qat.group_size!r}: must be >= 0 (0: one '
                      'scale per output channel)')
  if p.masks and not os.path.isfile(p.masks):
    raise ConfigError(f'config.prune.masks={p.masks!r}: no such file (lm.prune writes '
                      'OUT/masks.npz)')


def _validate_distill(config: ml_collections.ConfigDict) -> None:
  """config.mode='distill': a teacher checkpoint, alpha in [0, 1], a positive temperature and
  top_k within the vocabulary (lm.distill checks the teacher's tokenizer and vocab_size)."""
  d = config.distill
  if not d.teacher:
    raise ConfigError("config.mode='distill' needs config.distill.teacher: the checkpoint "
                      'directory of the model to learn from')
  if '://' not in d.teacher and not os.path.isdir(d.teacher):
    raise ConfigError(f'config.distill.teacher={d.teacher!r}: no such directory')
  if not 0 <= d.alpha <= 1:
    raise ConfigError(f'config.distill.alpha={d.alpha!r}: must be in [0, 1]')
  if not d.temperature > 0:
    raise ConfigError(f'config.distill.temperature={d.temperature!r}: must be positive')
  if not 0 <= d.top_k < config.model.vocab_size:
    raise ConfigError(f'config.distill.top_k={d.top_k!r}: expected 0 (the whole distribution) '
                      f'or 1 .. config.model.vocab_size - 1 = {config.model.vocab_size - 1}')
  if d.cache_dtype not in ('float32', 'float16'):
    raise ConfigError(f'config.distill.cache_dtype={d.cache_dtype!r}: expected float32 or float16')
  if d.teacher_cache and not d.top_k:
    raise ConfigError('config.distill.teacher_cache holds top-k targets: set config.distill.top_k '
                      '> 0 (the whole distribution is vocab_size floats a token, too many to store)')
  if config.model.reward_head or config.model.value_head:
    raise ConfigError("config.mode='distill' trains a language model: config.model.reward_head "
                      'and value_head must be False')


def _validate_encoder(config: ml_collections.ConfigDict) -> None:
  """model.kind='encoder': mode 'train' with the masked-LM objective, and config.mlm's rates."""
  if config.mode in DECODER_MODES:
    raise ConfigError(
        f"config.mode={config.mode!r} needs a decoder, but config.model.kind='encoder' attends "
        "both ways and has no KV cache (lm.generate, lm.engine and lm.post decode or score "
        "causally); an encoder trains with config.mode='train' (the masked-LM objective)")
  if config.model.attention == 'blocked':
    raise ConfigError("config.model.attention='blocked' computes only the causal lower "
                      "triangle; config.model.kind='encoder' needs 'auto', 'xla' or 'einsum'")
  mlm = config.mlm
  if not 0 < mlm.mask_rate <= 1:
    raise ConfigError(f'config.mlm.mask_rate={mlm.mask_rate!r}: must be in (0, 1]')
  for field in ('mask_token_rate', 'random_token_rate'):
    if not 0 <= mlm[field] <= 1:
      raise ConfigError(f'config.mlm.{field}={mlm[field]!r}: must be in [0, 1]')
  if mlm.mask_token_rate + mlm.random_token_rate > 1:
    raise ConfigError(f'config.mlm.mask_token_rate + random_token_rate = {mlm.mask_token_rate} + '
                      f'{mlm.random_token_rate}: the shares of the selected tokens must sum to '
                      'at most 1 (the rest are kept)')


def _validate_encoder_decoder(config: ml_collections.ConfigDict) -> None:
  """model.kind='encoder_decoder': modes 'train' (span corruption) and 'sample', and
  config.span_corruption's fields against data.seq_len."""
  if config.mode not in ('train', 'sample'):
    raise ConfigError(
        f"config.mode={config.mode!r}: config.model.kind='encoder_decoder' trains with "
        "config.mode='train' (span corruption) and generates with 'sample'; lm.post's modes "
        'score and decode a decoder-only model')
  if config.model.encoder_layers < 0:
    raise ConfigError(f'config.model.encoder_layers={config.model.encoder_layers}: expected 0 '
                      '(as many as num_layers) or more')
  if config.model.attention == 'blocked':
    raise ConfigError("config.model.attention='blocked' computes only the causal lower "
                      "triangle; config.model.kind='encoder_decoder' needs 'auto', 'xla' or "
                      "'einsum' (its encoder attends both ways)")
  moe = config.model.get('moe')
  if moe is not None and moe.num_experts:
    layers = config.model.encoder_layers or config.model.num_layers
    if layers % moe.every_n_layers:
      raise ConfigError(f'config.model.encoder_layers={layers} must be a multiple of '
                        f'config.model.moe.every_n_layers={moe.every_n_layers}')
  from lm import span_corruption  # pylint: disable=g-import-not-at-top
  span = config.span_corruption
  try:
    lengths = span_corruption.lengths(config.data.seq_len, span.noise_density,
                                      span.mean_noise_span_length)
  except ValueError as e:
    raise ConfigError(f'config.span_corruption with config.data.seq_len='
                      f'{config.data.seq_len}: {e}') from None
  if span.sentinels < lengths.num_spans:
    raise ConfigError(
        f'config.span_corruption.sentinels={span.sentinels}: a row of config.data.seq_len='
        f'{config.data.seq_len} tokens has {lengths.num_spans} noise spans, each needing a '
        'sentinel of its own')
  longest = max(lengths.inputs, lengths.targets)
  if config.model.block == 'gpt2' and longest > config.model.max_seq_len:
    raise ConfigError(f'config.model.max_seq_len={config.model.max_seq_len}: the corrupted rows '
                      f'are {lengths.inputs} (input) and {lengths.targets} (targets) tokens')


def _validate_moe(config: ml_collections.ConfigDict) -> None:
  moe = config.model.get('moe')
  if moe is None or moe.num_experts == 0:
    if config.mesh.get('expert', 1) not in (1, -1):
      raise ConfigError(f'config.mesh.expert={config.mesh.expert} splits experts, but '
                        'config.model.moe.num_experts=0 (a dense model) has none')
    return
  if moe.num_experts < 0:
    raise ConfigError(f'config.model.moe.num_experts={moe.num_experts}: must be >= 0')
  if not 1 <= moe.top_k <= moe.num_experts:
    raise ConfigError(f'config.model.moe.top_k={moe.top_k}: must be in [1, '
                      f'config.model.moe.num_experts={moe.num_experts}]')
  if moe.every_n_layers < 1 or config.model.num_layers % moe.every_n_layers:
    raise ConfigError(f'config.model.moe.every_n_layers={moe.every_n_layers}: must be positive '
                      f'and divide config.model.num_layers={config.model.num_layers}')
  for field in ('capacity_factor', 'load_balance_loss', 'router_z_loss'):
    if not moe[field] >= 0:
      raise ConfigError(f'config.model.moe.{field}={moe[field]!r}: must be >= 0')
  expert = config.mesh.get('expert', 1)
  if expert > 1 and moe.num_experts % expert:
    raise ConfigError(f'config.mesh.expert={expert} does not divide '
                      f'config.model.moe.num_experts={moe.num_experts}')
  if config.lora.rank > 0 and moe.every_n_layers == 1:
    from lm import lora as lora_lib  # pylint: disable=g-import-not-at-top
    mlp = set(lora_lib.lora_targets(config.lora.targets, config.model.block)) & {
        'w_gate', 'w_up', 'w_down'}
    if mlp:
      raise ConfigError(f'config.lora.targets={config.lora.targets!r} names MLP projections, '
                        'but every block of this MoE model has experts there (LoRA adapts '
                        "dense projections); use 'attention'")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value cannot work; runs before compiling."""
  for field, choices in _CHOICES.items():
    if _get(config, field) not in choices:
      raise ConfigError(f'config.{field}={_get(config, field)!r}: expected one of {choices}')
  for field in _POSITIVE:
    if not _get(config, field) > 0:
      raise ConfigError(f'config.{field}={_get(config, field)!r}: must be positive')
  for field in _NON_NEGATIVE:
    if not _get(config, field) >= 0:
      raise ConfigError(f'config.{field}={_get(config, field)!r}: must be >= 0')

  m, t, d = config.model, config.train, config.data
  if m.d_model % m.num_heads:
    raise ConfigError(
        f'config.model.d_model={m.d_model} is not divisible by config.model.num_heads='
        f'{m.num_heads}')
  if (m.d_model // m.num_heads) % 2 and m.block == 'llama':
    raise ConfigError(
        f'config.model.d_model / num_heads = {m.d_model // m.num_heads}: rotary embeddings need '
        'an even head dimension')
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(
        f'config.model.num_heads={m.num_heads} is not divisible by config.model.num_kv_heads='
        f'{m.num_kv_heads}')
  if d.seq_len > m.max_seq_len:
    raise ConfigError(
        f'config.data.seq_len={d.seq_len} exceeds config.model.max_seq_len={m.max_seq_len}')
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(
        f'config.train.batch_size={t.batch_size} is not divisible by '
        f'config.train.grad_accum_steps={t.grad_accum_steps}')
  if t.warmup_steps >= t.steps:
    raise ConfigError(
        f'config.train.warmup_steps={t.warmup_steps} leaves no steps of config.train.steps='
        f'{t.steps} for the cosine decay: it must be smaller')
  if not 0 < d.eval_fraction < 1:
    raise ConfigError(f'config.data.eval_fraction={d.eval_fraction}: must be in (0, 1)')
  if not 0 <= config.distributed.process_id < config.distributed.num_processes:
    raise ConfigError(
        f'config.distributed.process_id={config.distributed.process_id}: must be in '
        f'[0, config.distributed.num_processes={config.distributed.num_processes})')
  if t.min_lr_ratio > 1:
    raise ConfigError(f'config.train.min_lr_ratio={t.min_lr_ratio}: must be <= 1')
  unknown = [g for g in t.trainable.split(',') if g.strip() not in PARAM_GROUPS]
  if unknown:
    raise ConfigError(f'config.train.trainable={t.trainable!r}: {unknown} not among the groups '
                      f'{tuple(PARAM_GROUPS)}; separate several with commas')
  _validate_lora(config)
  _validate_peft(config)
  _validate_moe(config)
  if m.kind == 'encoder':
    _validate_encoder(config)
  if m.kind == 'encoder_decoder':
    _validate_encoder_decoder(config)
  if d.mixture:
    from lm import sources as sources_lib  # pylint: disable=g-import-not-at-top
    try:
      sources_lib.parse_mixture(d.mixture)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if config.init_from and '://' not in config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f'config.init_from={config.init_from!r}: no such directory')
  _validate_sample(config)
  if config.mode in ('sft', 'reward', 'dpo', 'ppo', 'grpo'):
    _validate_post(config)
  if config.mode in ('ppo', 'grpo'):
    _validate_rl(config)
  if config.mode == 'distill':
    _validate_distill(config)
  _validate_prune(config)
  if config.mode == 'reward' and not config.model.reward_head:
    raise ConfigError('config.mode=reward needs config.model.reward_head=True (the scalar head '
                      'the reward is read from)')


def input_errors() -> tuple[type[Exception], ...]:
  """The project's errors for bad input (a config field, a file, a corpus, a checkpoint, a run
  that diverged): each names what is wrong, so it is reported in one line. Any other exception
  is a bug and keeps its traceback."""
  # pylint: disable=g-import-not-at-top
  from lm import checkpoint, distributed, sharding, sources, tokenizer, train
  return (ConfigError, sharding.ShardingError, checkpoint.CheckpointError,
          distributed.DistributedError, train.NonFiniteLossError, sources.DataError,
          tokenizer.TokenizerError, FileNotFoundError)
