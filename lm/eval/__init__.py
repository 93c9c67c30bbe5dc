"""Evaluation: lm checkpoints on lm-evaluation-harness (harness.py), and lm's own evaluations
(perplexity.py, needle.py, contamination.py, compare.py), all over one scoring engine
(scoring.py). The command line is `python -m lm.eval` (__main__.py)."""
