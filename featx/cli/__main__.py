"""``python -m featx.cli``: the ``featx`` command."""

from __future__ import annotations

import sys

from featx.cli import main

if __name__ == "__main__":
    sys.exit(main())
