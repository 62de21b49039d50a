"""Adapters that attach isdelta's EntropyMonitor to third-party trainers.

Each adapter lives in its own module and imports its framework only when imported itself:
``import isdelta.integrations`` costs nothing, ``import isdelta.integrations.trl`` needs TRL
(``pip install "isdelta[trl]"``).
"""
