"""Shared fixtures (helpers live in tests/helpers.py, importable because pytest puts tests/ on sys.path)."""

import pytest

from helpers import run_cli


@pytest.fixture
def cli():
    """Run ``python <script> overrides...`` in a subprocess, as a user would."""
    return run_cli
