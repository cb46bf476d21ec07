"""``python -m featx``: the ``featx`` command, for launchers that run modules (``torchrun -m featx``)."""

from __future__ import annotations

import sys

from featx.cli import main

if __name__ == "__main__":
    sys.exit(main())
