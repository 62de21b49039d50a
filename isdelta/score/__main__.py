"""``python -m isdelta.score cfg.yaml [--set k=v ...] [--out DIR]``."""

from isdelta.program.ranks import leave
from isdelta.score.pipeline import main

if __name__ == "__main__":
    leave(main())
