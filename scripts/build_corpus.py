#!/usr/bin/env python3
"""Build the open English corpus the demo model was trained on: the same command as
``python -m ufb_corpus.build`` (see ufb_corpus/__init__.py for what it does)."""

import sys
from pathlib import Path

# The builder needs only the standard library: run it from a clone without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ufb_corpus.build import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
