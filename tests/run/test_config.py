"""cfg.yaml validation: one clear error per bad value, unknown keys list the valid ones."""

from __future__ import annotations

import pytest

from isdelta.program import ConfigError, apply_overrides
from isdelta.run.config import config_hash, load_config

BASE = {"model": {"path": "smollm2-135m-instruct"}, "data": {"path": "builtin:math"}, "update": {"loss": "reinforce"}}


def with_(section: str, **values) -> dict:
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


BAD = [
    (with_("model", dtype="float8"), r"model\.dtype: .*'float32', 'bfloat16' or 'float16'.*got 'float8'"),
    (with_("model", trust_remote_code="maybe"), r"model\.trust_remote_code: .*valid boolean"),
    (with_("update", loss="dpo"), r"update\.loss: .*'sft' or 'reinforce'.*got 'dpo'"),
    (with_("update", lr=0), r"update\.lr: lr must be > 0 and finite; got 0"),
    (with_("update", steps=0), r"update\.steps: steps must be an integer in \[1, 10000\]; got 0"),
    (with_("update", reward="exact"), r"update\.reward: .*'boxed_match' or 'answer_match'"),
    (with_("update", optimizer="lion"), r"update\.optimizer: .*'sgd' or 'adamw'"),
    (with_("data", limit=0), r"data\.limit: .*greater than or equal to 1"),
    (with_("sampling", num_samples=1), r"sampling\.num_samples: .*greater than or equal to 2"),
    (with_("sampling", top_p=1.5), r"sampling\.top_p: top_p must lie in \(0, 1\]; got 1\.5"),
    (with_("sampling", temperature=0), r"sampling\.temperature: temperature must be > 0; got 0"),
    (with_("sampling", top_k=-3), r"sampling\.top_k: top_k must be a non-negative integer.*got -3"),
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
    with pytest.raises(ConfigError, match=r"modle: unknown key\. Valid keys here: checkpoints, data, engine"):
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


# ---------------------------------------------------------------------------- config
def test_tokens_config_section_validates_and_keeps_old_hashes():
    import hashlib
    import json

    from isdelta.tokens import TokenThresholds

    base = {"model": {"path": "x"}, "data": {"path": "builtin:math"}, "update": {"loss": "reinforce"}}
    cfg = load_config({**base, "tokens": {"positions": "every:4", "thresholds": {"lock_top1": 0.95}}})
    assert cfg.tokens.thresholds == TokenThresholds(lock_top1=0.95) and cfg.tokens.mode == "generations"
    for bad, pattern in [
        ({"positions": "every:x"}, r"tokens\.positions: .*every:K needs a positive integer"),
        ({"patterns": ["(unclosed"]}, r"tokens\.patterns: .*not a valid regular expression"),
        ({"thresholds": {"lock_top1": 2}}, r"tokens\.thresholds: .*lock_top1 must lie in \[0, 1\]"),
        ({"mode": "teacher"}, r"tokens\.mode: .*'generations', 'teacher_forced' or 'both'"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            load_config({**base, "tokens": bad})
    # a config without the section hashes as before the section existed (old run folders resume)
    plain = load_config(base)
    old = plain.model_dump(mode="json", exclude={"output", "tokens", "checkpoints"})
    del old["engine"]["fused"]  # at its default, likewise (added later)
    old["sampling"].pop("backend")  # at its default, likewise (added with the vLLM back end)
    assert config_hash(plain) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(cfg) != config_hash(plain)


def test_engine_fused_is_validated_and_hashed_only_when_set():
    """``engine.fused`` at its default keeps older runs' hashes; "on"/"off" are another config."""
    auto = load_config(BASE)
    assert auto.engine.fused == "auto"
    assert config_hash(load_config(BASE, ["engine.fused=auto"])) == config_hash(auto)
    assert config_hash(load_config(BASE, ["engine.fused=on"])) != config_hash(auto)
    assert load_config({**BASE, "engine": {"fused": True}}).engine.fused == "on"  # YAML's bare `on`
    assert load_config({**BASE, "engine": {"fused": False}}).engine.fused == "off"
    with pytest.raises(ConfigError, match=r"engine\.fused"):
        load_config(BASE, ["engine.fused=fast"])
