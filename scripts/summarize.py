"""Kept for old command lines: ``python scripts/summarize.py SWEEP_DIR`` is ``capsnets-summarize SWEEP_DIR``."""

import sys

from capsnets.results.cli import main

if __name__ == "__main__":
    sys.exit(main())
