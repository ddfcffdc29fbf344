"""``python -m vitkernels.train --help``."""
import sys

from vitkernels.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
