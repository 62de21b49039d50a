"""Token-level comparison of two models (torch): where the next-token distribution moved.

- :func:`compare_tokens` (``compare``): per-position entropy, top-k, nucleus, tail and KL of two
  models on the same carriers, each position classified lock / fork / diffuse / mixed;
  :func:`run_tokens` adds the tables and plots, as the run program calls it.
- :class:`TokenOptions` (``options``), :class:`TokenComparison` (``table``), the classes
  (``classes``), which positions (``positions``), the statistics kernel (``stats``), markdown
  (``report``) and plots (``plots``).
- Strata of carrier rows by length and correctness (``strata``), intervals over carrier rows
  (``bootstrap``, ``significance``: every aggregate, the probing table), mean entropy by token
  text (``token_texts``).

Every name loads on first use; ``classes``, ``positions``, ``table``, ``strata``,
``bootstrap``, ``significance`` and ``token_texts`` are numpy (+ scipy) only.
The same names keep importing from :mod:`isdelta.probes`, where they first lived.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_LAZY = {
    "compare_tokens": "compare",
    "run_tokens": "compare",
    "TokenOptions": "options",
    "TokenComparison": "table",
    "TokenThresholds": "classes",
    "classify": "classes",
    "select_positions": "positions",
    "summarise": "compare",
    "add_strata": "strata",
    "CarrierBootstrap": "significance",
    "token_text_summary": "token_texts",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"isdelta.tokens.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'isdelta.tokens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
