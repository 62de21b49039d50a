"""What both programs share: --set overrides, the shipped configs, the console script."""

from __future__ import annotations

import pytest

from isdelta.program import ConfigError, apply_overrides


def test_shipped_configs_validate():
    from pathlib import Path

    import yaml

    from isdelta.run.config import RunConfig, load_config
    from isdelta.score.config import ScoreConfig, load_score_config

    paths = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        if "models" in yaml.safe_load(path.read_text()):  # the score program's (a list of models)
            assert isinstance(load_score_config(path), ScoreConfig)
        else:
            assert isinstance(load_config(path), RunConfig)


def test_overrides_index_into_lists():
    raw = apply_overrides({"models": [{"path": "a"}, {"path": "b"}]}, ["models.1.path=c"])
    assert raw["models"][1]["path"] == "c"
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"models": [{"path": "a"}]}, ["models.3.path=c"])


def test_console_script_dispatches(capsys):
    from isdelta.cli import main

    assert main([]) == 2 and "usage: isdelta" in capsys.readouterr().out
    assert main(["run", "missing.yaml"]) == 2 and "does not exist" in capsys.readouterr().err
    assert main(["score", "missing.yaml"]) == 2 and "does not exist" in capsys.readouterr().err
    assert main(["audit", "missing.pt"]) == 2 and "no such file" in capsys.readouterr().err
