"""``python -m attndsl``: the ``attndsl`` command line (see :mod:`attndsl.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
