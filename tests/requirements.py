"""Packages of the test extra (pip install -e '.[test]'): a test that needs one is skipped where it
is not installed, but fails under CI (CI=true), where a missing package means a broken setup."""

import importlib
import os
import types

import pytest


def require(name: str) -> types.ModuleType:
  """The module `name`: imported plainly under CI, else through pytest.importorskip."""
  if os.environ.get('CI') == 'true':
    return importlib.import_module(name)
  return pytest.importorskip(name)
