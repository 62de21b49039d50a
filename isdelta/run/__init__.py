"""The ΔH program, ``python -m isdelta.run cfg.yaml``: how much did one update change the entropy.

- ``config``    the cfg.yaml schema (``RunConfig``, ``load_config``, ``config_hash``)
- ``data``      the data file's records, reference responses as rollouts, ``RunError``
- ``stages``    sample, score, make p1, estimate inputs, probe, tokens
- ``pipeline``  the driver (output folder, resume, stage order) and ``main``
- ``report``    report.json, sequences.csv, summary.md; ``plots`` the PNGs
"""

from __future__ import annotations

from isdelta.run.data import RunError
from isdelta.run.pipeline import main, run

__all__ = ["RunError", "main", "run"]
