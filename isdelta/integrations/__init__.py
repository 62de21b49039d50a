"""Adapters that attach isdelta's EntropyMonitor to third-party trainers.

Each adapter lives in its own module and imports its framework only when imported itself:
``import isdelta.integrations`` costs nothing, ``import isdelta.integrations.trl`` needs TRL
(``pip install "isdelta[trl]"``). ``isdelta.integrations.verl`` registers verl's trainer mode
``isdelta`` when verl is installed (``pip install "isdelta[verl]"``) and imports without it;
``isdelta.integrations.verl_rows`` (verl's per-token arrays → ΔH) needs no framework.
"""
