"""Entry point: ``python -m lit_star --help``."""

import sys

from lit_star.cli import main

if __name__ == "__main__":
    sys.exit(main())
