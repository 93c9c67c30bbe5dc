"""The base config: every field with its default, documented in lm/config.py."""

from lm.config import base_config


def get_config():
  return base_config()
