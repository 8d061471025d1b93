"""Helpers shared by the tests: running the real CLIs, small model overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

# a CapsNet small enough for CPU tests (same architecture, fewer channels/capsules)
SMALL_DR_CAPS = [
    "model.net.conv1_channels=16",
    "model.net.primary_types=4",
    "model.net.primary_dim=4",
    "model.net.class_dim=8",
    "model.net.decoder_hidden=[32,64]",
]


def run_cli(script: str, *overrides: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python <script> overrides...`` exactly as a user would, returning the finished process."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
