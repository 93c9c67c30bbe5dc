"""Post-training: supervised fine-tuning on prompt/response data (and, next, reward models, DPO,
PPO and GRPO), each plugged into lm.train's one setup and loop."""
