"""cfg.yaml validation: one clear error per bad value, unknown keys list the valid ones."""

from __future__ import annotations

import pytest

from isdelta.config import ConfigError, RunConfig, apply_overrides, config_hash, load_config

BASE = {"model": {"path": "smollm2-135m-instruct"}, "data": {"path": "builtin:math"},
        "update": {"loss": "reinforce"}}


def with_(section: str, **values) -> dict:
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


BAD = [
    (with_("model", dtype="float8"), r"model\.dtype: .*'float32', 'bfloat16' or 'float16'.*got 'float8'"),
    (with_("model", trust_remote_code="maybe"), r"model\.trust_remote_code: .*valid boolean"),
    (with_("update", loss="dpo"), r"update\.loss: .*'sft' or 'reinforce'.*got 'dpo'"),
    (with_("update", lr=0), r"update\.lr: .*greater than 0.*got 0"),
    (with_("update", steps=0), r"update\.steps: .*greater than or equal to 1"),
    (with_("update", reward="exact"), r"update\.reward: .*'boxed_match' or 'answer_match'"),
    (with_("update", optimizer="lion"), r"update\.optimizer: .*'sgd' or 'adamw'"),
    (with_("data", limit=0), r"data\.limit: .*greater than or equal to 1"),
    (with_("sampling", num_samples=1), r"sampling\.num_samples: .*greater than or equal to 2"),
    (with_("sampling", top_p=1.5), r"sampling\.top_p: .*less than or equal to 1.*got 1\.5"),
    (with_("sampling", temperature=0), r"sampling\.temperature: .*greater than 0"),
    (with_("sampling", top_k=-3), r"sampling\.top_k: .*greater than or equal to 0"),
    (with_("engine", token_budget=0), r"engine\.token_budget: .*greater than or equal to 1"),
    (with_("estimator", weights="smooth"), r"estimator\.weights: .*'psis', 'none', 'truncate' or 'clip'"),
    (with_("estimator", prompts="all"), r"estimator\.prompts: .*'fixed' or 'sampled'"),
    (with_("estimator", level=1.2), r"estimator\.level: .*less than 1"),
    (with_("estimator", weights="clip"), r"clip needs estimator\.clip"),
    (with_("output", plots="yes please"), r"output\.plots: .*valid boolean"),
    ({k: v for k, v in BASE.items() if k != "data"}, r"data: Field required"),
    ({**BASE, "probe": {"sweep": []}}, r"probe: probe\.sweep must be a non-empty list"),
    ({**BASE, "probe": {"sweep": [1, "big"]}}, r"probe\.sweep\.1: .*valid number"),
    ({**BASE, "updated": {"path": "x"}}, r"exactly one of `updated`"),
]


@pytest.mark.parametrize("raw,pattern", BAD, ids=[p.split(":")[0].replace("\\", "") for _, p in BAD])
def test_each_bad_value_gives_one_clear_error(raw, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(raw)
    assert str(err.value).count("\n") == 1  # exactly one problem reported


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"sampling\.temprature: unknown key\. Valid keys here: .*temperature"):
        load_config(with_("sampling", temprature=0.7))
    with pytest.raises(ConfigError, match=r"modle: unknown key\. Valid keys here: data, engine"):
        load_config({**BASE, "modle": {}})


def test_overrides_are_type_checked_and_applied():
    cfg = load_config(BASE, ["update.lr=3e-4", 'sampling.stop_strings=["\\n\\n"]', "estimator.prompts=sampled"])
    assert cfg.update.lr == 3e-4 and cfg.sampling.stop_strings == ("\n\n",)
    assert cfg.estimator.prompts == "sampled"
    with pytest.raises(ConfigError, match=r"update\.lr: .*valid number"):
        load_config(BASE, ["update.lr=fast"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(BASE, ["update.lr"])
    with pytest.raises(ConfigError, match=r"update\.lrr: unknown key"):
        load_config(BASE, ["update.lrr=1"])


def test_config_is_frozen_and_hash_ignores_output():
    cfg = load_config(BASE)
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]
    other_dir = load_config(BASE, ["output.dir=elsewhere"])
    assert config_hash(cfg) == config_hash(other_dir)
    assert config_hash(cfg) != config_hash(load_config(BASE, ["seed=1"]))
    assert apply_overrides(BASE, ["a.b=1"])["a"] == {"b": 1} and "a" not in BASE


def test_shipped_configs_validate():
    from pathlib import Path

    from isdelta.scoring.config import ScoreConfig, load_score_config

    paths = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        if path.name.startswith("score"):
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
