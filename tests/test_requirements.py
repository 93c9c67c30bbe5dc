"""Tests of tests/requirements.py: a missing package of the test extra skips, but fails under CI."""

import json

import pytest

from requirements import require


def test_a_missing_package_fails_under_ci(monkeypatch):
  monkeypatch.setenv('CI', 'true')
  with pytest.raises(ModuleNotFoundError, match='no_such_package'):
    require('no_such_package')


def test_a_missing_package_skips_elsewhere(monkeypatch):
  monkeypatch.delenv('CI', raising=False)
  with pytest.raises(pytest.skip.Exception, match='no_such_package'):
    require('no_such_package')
  assert require('json') is json
