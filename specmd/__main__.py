"""``python -m specmd``: the command line (``specmd.cli``)."""
import sys

from .cli import main

sys.exit(main())
