"""``python -m isdelta.run cfg.yaml [--set k=v ...] [--out DIR]``."""

import sys

from isdelta.run.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
