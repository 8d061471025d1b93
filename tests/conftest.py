"""Shared fixtures (helpers live in tests/helpers.py, importable because pytest puts tests/ on sys.path)."""

import os

import pytest

from helpers import run_cli

# routing kernels=auto runs eager in the suite (and the processes it starts): compiling the fused routings' kernels
# for every differently shaped tiny layer would cost minutes; tests/nn/test_kernels.py compiles them and checks them
# against eager, and exports its own setting where it needs auto to compile
os.environ.setdefault("CAPSNETS_ROUTING_KERNELS", "eager")


@pytest.fixture
def cli():
    """Run ``python <script> overrides...`` in a subprocess, as a user would."""
    return run_cli
