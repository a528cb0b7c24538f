"""``python -m vmsandbox.cli``: the ``vmsandbox`` command (tests/serve.py runs it so)."""

from __future__ import annotations

import sys

from . import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
