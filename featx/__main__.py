"""``python -m featx``: the command line, as ``torchrun -m featx extract ...`` runs it."""

import sys

from featx.cli import main

sys.exit(main())
