"""Heavy imports stay lazy (DESIGN.md §5): `import isdelta` is cheap; estimators never import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_isdelta_loads_no_heavy_module():
    mods = loaded_after("import isdelta")
    for heavy in ("torch", "arviz", "matplotlib", "pydantic", "transformers"):
        assert heavy not in mods, heavy


@pytest.mark.parametrize("code", ["import isdelta.estimators",
                                  "from isdelta import estimate, EntropyDelta"])
def test_estimators_never_import_torch(code):
    mods = loaded_after(code)
    assert "torch" not in mods and "arviz" not in mods and "matplotlib" not in mods


def test_lazy_names_resolve():
    import isdelta

    assert callable(isdelta.estimate) and callable(isdelta.completion_mask)
    with pytest.raises(AttributeError):
        isdelta.not_a_name  # noqa: B018
