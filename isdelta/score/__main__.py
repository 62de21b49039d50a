"""``python -m isdelta.score cfg.yaml [--set k=v ...] [--out DIR]``."""

import sys

from isdelta.score.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
