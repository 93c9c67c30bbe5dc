"""`python -m lm.eval`: lm-evaluation-harness with the lm model, and lm's own evaluations.

  python -m lm.eval --model_args checkpoint=DIR[,batch_size=N,max_length=T,dtype=D] \\
      --tasks T1,T2 [any lm-eval flag: --include_path, --num_fewshot, --limit, --log_samples,
      --output_path, --apply_chat_template, ...]
  python -m lm.eval ppl --checkpoint DIR --source SOURCE        perplexity and bits per byte
  python -m lm.eval needle --checkpoint DIR                     needle in a haystack grid
  python -m lm.eval contamination --tasks T1,T2 --source SOURCE n-gram overlap with training data
  python -m lm.eval compare --checkpoints A,B --tasks T1,T2     several checkpoints side by side

Without a subcommand the arguments are lm-eval's own command line, with `--model lm` (lm/eval/
harness.py) selected unless another model is named and `--batch_size auto` unless one is given.
"""

import importlib
import sys

SUBCOMMANDS = {
    'ppl': 'lm.eval.perplexity',
    'needle': 'lm.eval.needle',
    'contamination': 'lm.eval.contamination',
    'compare': 'lm.eval.compare',
}


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in SUBCOMMANDS:
    importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
  else:
    from lm.eval import harness  # pylint: disable=g-import-not-at-top
    harness.main(argv)


if __name__ == '__main__':
  main()
