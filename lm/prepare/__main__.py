"""`python -m lm.prepare --config configs/prepare/NAME.py --workdir OUT [--config.a.b=v]`."""

from lm.prepare import main

if __name__ == '__main__':  # Not when datatrove's worker processes import the main module.
  main.run()
