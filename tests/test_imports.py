"""Heavy imports stay lazy (DESIGN.md §5): `import isdelta` is cheap; estimators never import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_import_isdelta_loads_no_heavy_module():
    mods = loaded_after("import isdelta")
    for heavy in ("torch", "arviz", "matplotlib", "pydantic", "transformers"):
        assert heavy not in mods, heavy


@pytest.mark.parametrize("code", ["import isdelta.estimators", "from isdelta import estimate, EntropyDelta"])
def test_estimators_never_import_torch(code):
    mods = loaded_after(code)
    assert "torch" not in mods and "arviz" not in mods and "matplotlib" not in mods


def test_lazy_names_resolve():
    import isdelta

    assert callable(isdelta.estimate) and callable(isdelta.completion_mask)
    with pytest.raises(AttributeError):
        isdelta.not_a_name  # noqa: B018


def test_old_probes_token_names_still_import():
    import isdelta.probes as probes
    import isdelta.tokens as tokens

    for name in (
        "compare_tokens",
        "run_tokens",
        "TokenComparison",
        "TokenOptions",
        "TokenThresholds",
        "classify",
        "select_positions",
    ):
        assert getattr(probes, name) is getattr(tokens, name), name


@pytest.mark.parametrize("program", ["isdelta.run", "isdelta.score"])
def test_programs_run_as_modules(program):
    out = subprocess.run([sys.executable, "-m", program, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and f"python -m {program}" in out.stdout and "--set" in out.stdout
