"""``python -m isdelta.run cfg.yaml [--set k=v ...] [--out DIR]``."""

from isdelta.program.ranks import leave
from isdelta.run.pipeline import main

if __name__ == "__main__":
    leave(main())
