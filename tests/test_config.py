"""Typed configs: defaults, validation messages, load_config, YAML round-trip, immutability."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.config import PrunerConfig, PruningConfig, load_config
from prunekit.errors import ConfigError

NM_MAX = {"2:4": 0.5, "1:4": 0.25, "4:8": 0.5}


def config_error(fn, *args, **kwargs) -> ConfigError:
    """Run ``fn`` and return the ConfigError it must raise."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return info.value


# ---- typed objects ----------------------------------------------------------------------------------
def test_defaults_are_the_original_2x_defaults():
    c = PrunerConfig()
    assert (c.target_sparsity, c.pruning_type, c.pattern) == (0.9, "snip_momentum", "4x1")
    assert (c.op_names, c.excluded_op_names, c.pruning_op_types) == ((), (), ("Conv", "Linear"))
    assert (c.start_step, c.end_step, c.pruning_frequency) == (0, 0, 1)
    assert (c.pruning_scope, c.sparsity_decay_type, c.criterion_reduce_type) == ("global", "exp", "mean")
    assert (c.min_sparsity_ratio_per_op, c.max_sparsity_ratio_per_op) == (0.0, 0.98)
    assert (c.low_memory_usage, c.lock_init_sparsity, c.reg_type, c.reg_coeff) == (False, False, None, 0.0)


def test_default_config_is_usable():
    """The original rejected its own defaults (snip_momentum with end_step 0); ours must not."""
    assert PruningConfig.from_kwargs().pruners == (PrunerConfig(),)


@pytest.mark.parametrize("ptype, criterion, progressive", [
    ("snip_momentum", "snip_momentum", False),
    ("magnitude_progressive", "magnitude", True),
    ("gradient", "gradient", False),
    ("snip_progressive", "snip", True),
])
def test_criterion_and_progressive(ptype, criterion, progressive):
    c = PrunerConfig(pruning_type=ptype)
    assert (c.criterion, c.progressive) == (criterion, progressive)


def test_pattern_lock_one_shot():
    c = PrunerConfig(pruning_type="pattern_lock", start_step=5, end_step=5)
    assert c.criterion == "pattern_lock" and not c.progressive


@pytest.mark.parametrize("spec", ["1x1", "4x1", "1x4", "2x2", "channelx1", "1xchannel", "2:4", "1:4", "4:8", "mha"])
def test_patterns_accepted(spec):
    assert PrunerConfig(pattern=spec, target_sparsity=0.2).pattern == spec


@pytest.mark.parametrize("spec, stored", [
    ("tile_pattern_4x1", "4x1"), ("oc_pattern_4x1", "4x1"), ("ic_pattern_1x4", "1x4"), ("tile_pattern_2:4", "2:4"),
])
def test_pattern_prefix_is_normalised(spec, stored):
    assert PrunerConfig(pattern=spec, target_sparsity=0.5).pattern == stored


def test_strings_become_tuples():
    c = PrunerConfig(op_names="encoder.*", excluded_op_names=["head", "pool"], pruning_op_types="Linear")
    assert c.op_names == ("encoder.*",)
    assert c.excluded_op_names == ("head", "pool")
    assert c.pruning_op_types == ("Linear",)


def test_none_means_default():
    assert PrunerConfig(target_sparsity=None, op_names=None, pattern=None) == PrunerConfig()


def test_nm_caps_max_ratio_per_op():
    c = PrunerConfig(pattern="2:4", target_sparsity=0.5)
    assert c.max_sparsity_ratio_per_op == 0.5
    assert PrunerConfig(pattern="1:4", target_sparsity=0.1).max_sparsity_ratio_per_op == 0.25
    lower = PrunerConfig(pattern="2:4", target_sparsity=0.4, max_sparsity_ratio_per_op=0.3)
    assert lower.max_sparsity_ratio_per_op == 0.3
    assert PrunerConfig(pattern="4x1").max_sparsity_ratio_per_op == 0.98


def test_pattern_lock_is_exempt_from_the_nm_target_check():
    """pattern_lock prunes nothing new, so the default 0.9 target does not conflict with 2:4 (as in the original)."""
    assert PrunerConfig(pattern="2:4", pruning_type="pattern_lock").pattern == "2:4"


# ---- every bad config names key, value and what is allowed ----------------------------------------------
BAD = [
    # kwargs, key, value as printed, fragment of the allowed text
    ({"target_sparsitty": 0.5}, "target_sparsitty", "0.5", "did you mean 'target_sparsity'"),
    ({"target_sparsity": 1.0}, "target_sparsity", "1.0", "[0, 1)"),
    ({"target_sparsity": -0.1}, "target_sparsity", "-0.1", "[0, 1)"),
    ({"target_sparsity": "lots"}, "target_sparsity", "'lots'", "[0, 1)"),
    ({"start_step": 10, "end_step": 5}, "end_step", "5", ">= start_step (10)"),
    ({"start_step": -1}, "start_step", "-1", ">= 0"),
    ({"start_step": True}, "start_step", "True", ">= 0"),
    ({"end_step": 2.5}, "end_step", "2.5", "an int"),
    ({"pruning_frequency": 0}, "pruning_frequency", "0", ">= 1"),
    ({"pruning_scope": "Global"}, "pruning_scope", "'Global'", "'global', 'local'"),
    ({"pruning_scope": "layer"}, "pruning_scope", "'layer'", "'global', 'local'"),
    ({"sparsity_decay_type": "quadratic"}, "sparsity_decay_type", "'quadratic'", "'exp', 'linear', 'cos', 'cube'"),
    ({"criterion_reduce_type": "median"}, "criterion_reduce_type", "'median'", "'mean', 'sum', 'max'"),
    ({"min_sparsity_ratio_per_op": 0.6, "max_sparsity_ratio_per_op": 0.5}, "min_sparsity_ratio_per_op", "0.6",
     "max_sparsity_ratio_per_op = 0.5"),
    ({"max_sparsity_ratio_per_op": 1.0}, "max_sparsity_ratio_per_op", "1.0", "[0, 1)"),
    ({"op_names": ["layer[1"]}, "op_names", "'layer[1'", "re.error"),
    ({"excluded_op_names": "(head"}, "excluded_op_names", "'(head'", "re.error"),
    ({"pattern": "2:4", "target_sparsity": 0.8}, "target_sparsity", "0.8", "<= 0.5"),
    ({"pattern": "1:4", "target_sparsity": 0.3}, "target_sparsity", "0.3", "<= 0.25"),
    ({"pattern": "4y1"}, "pattern", "4y1", "N:M"),
    ({"pattern": "4:2"}, "pattern", "4:2", "0 < N < M"),
    ({"pattern": 124}, "pattern", "124", "N:M"),
    ({"pruning_type": "snip_momentun"}, "pruning_type", "'snip_momentun'", "did you mean 'snip_momentum'"),
    ({"pruning_type": "wanda"}, "pruning_type", "'wanda'", "magnitude, gradient, snip"),  # prune_wanda only
    ({"pruning_type": "pattern_lock_progressive"}, "pruning_type", "'pattern_lock_progressive'", "_progressive"),
    ({"pruning_type": "pattern_lock", "end_step": 10}, "end_step", "10", "equal to start_step (0)"),
    ({"reg_type": "l1"}, "reg_type", "'l1'", "'group_lasso'"),
    ({"reg_coeff": -1.0}, "reg_coeff", "-1.0", ">= 0"),
    ({"pruning_op_types": []}, "pruning_op_types", "[]", "non-empty"),
]


@pytest.mark.parametrize("kwargs, key, value, allowed", BAD)
def test_bad_config_names_key_value_and_allowed(kwargs, key, value, allowed):
    err = config_error(PrunerConfig, **kwargs)
    message = str(err)
    assert err.key == key
    assert message.startswith(f"{key}: got ")
    assert value in message and allowed in message


@pytest.mark.parametrize("kwargs, key, value, allowed", BAD)
def test_bad_config_same_error_through_every_entry_point(kwargs, key, value, allowed):
    """build(), model_validate(), PruningConfig, from_kwargs and load_config all raise the same ConfigError."""
    errors = [
        config_error(PrunerConfig.build, **kwargs),
        config_error(PrunerConfig.model_validate, kwargs),
        config_error(PruningConfig, pruners=[kwargs]),
        config_error(PruningConfig.from_kwargs, **kwargs),
        config_error(load_config, [kwargs]),
    ]
    for err in errors:
        assert err.key == key and value in str(err) and allowed in str(err)


def test_unknown_key_lists_the_valid_ones():
    message = str(config_error(PrunerConfig, prune_type="magnitude"))
    assert "unknown key" in message and "pruning_type" in message


def test_pruning_config_needs_a_pruner():
    err = config_error(PruningConfig, pruners=[])
    assert err.key == "pruners" and "non-empty" in str(err)
    assert config_error(PruningConfig, pruners=[3]).key == "pruners[0]"


def test_errors_in_a_pruner_list_say_which_entry():
    err = config_error(PruningConfig, pruners=[{}, {"pruning_frequency": 0}])
    assert err.key == "pruning_frequency" and "pruners[1]" in str(err)


# ---- load_config ---------------------------------------------------------------------------------------
def test_load_config_accepts_every_form(tmp_path):
    one = PrunerConfig(target_sparsity=0.5, pattern="1x1")
    expected = PruningConfig(pruners=[one])
    path = tmp_path / "c.yaml"
    expected.to_yaml(path)
    assert load_config(expected) is expected
    assert load_config(one) == expected
    assert load_config({"target_sparsity": 0.5, "pattern": "1x1"}) == expected
    assert load_config({"pruning_configs": [{"target_sparsity": 0.5, "pattern": "1x1"}]}) == expected
    assert load_config([{"target_sparsity": 0.5, "pattern": "1x1"}]) == expected
    assert load_config([one]) == expected
    assert load_config(path) == expected
    assert load_config(str(path)) == expected
    assert load_config("target_sparsity: 0.5\npattern: 1x1\n") == expected
    assert load_config("- {target_sparsity: 0.5, pattern: 1x1}") == expected


@pytest.mark.parametrize("bad, key", [(42, "config"), ([], "config"), ("missing.yaml", "config"),
                                      ("just a string", "config")])
def test_load_config_rejects_other_objects(bad, key):
    err = config_error(load_config, bad)
    assert err.key == key and "allowed" in str(err)


# ---- YAML round trip -----------------------------------------------------------------------------------
PATTERNS = ["1x1", "4x1", "1x4", "2x2", "16x1", "channelx1", "1xchannel", "2:4", "1:4", "4:8"]
UNIT = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)
REGEX = st.sampled_from([".*", r"layer\.\d+", "attn|mlp", r"^encoder\..*dense$", "classifier"])


@st.composite
def pruner_kwargs(draw) -> dict:
    """Any valid PrunerConfig, as kwargs (targets within the pattern's maximum, min <= max)."""
    pattern = draw(st.sampled_from(PATTERNS))
    cap = NM_MAX.get(pattern, 1.0)
    start = draw(st.integers(0, 10**6))
    lock = draw(st.booleans())
    ptype = "pattern_lock" if lock else draw(st.sampled_from(["magnitude", "gradient", "snip", "snip_momentum"]))
    if not lock and draw(st.booleans()):
        ptype += "_progressive"
    max_ratio = draw(UNIT)
    return {
        "target_sparsity": draw(UNIT) * cap,
        "pruning_type": ptype,
        "pattern": pattern,
        "op_names": draw(st.lists(REGEX, max_size=3)),
        "excluded_op_names": draw(st.lists(REGEX, max_size=3)),
        "pruning_op_types": draw(st.lists(st.sampled_from(["Conv", "Linear", "Conv1D"]), min_size=1, max_size=3)),
        "start_step": start,
        "end_step": start if lock else start + draw(st.integers(0, 10**6)),
        "pruning_frequency": draw(st.integers(1, 1000)),
        "pruning_scope": draw(st.sampled_from(["global", "local"])),
        "sparsity_decay_type": draw(st.sampled_from(["exp", "linear", "cos", "cube"])),
        "criterion_reduce_type": draw(st.sampled_from(["mean", "sum", "max"])),
        "max_sparsity_ratio_per_op": max_ratio,
        "min_sparsity_ratio_per_op": draw(st.floats(0.0, min(max_ratio, cap))),
        "low_memory_usage": draw(st.booleans()),
        "lock_init_sparsity": draw(st.booleans()),
        "reg_type": draw(st.sampled_from([None, "group_lasso"])),
        "reg_coeff": draw(st.floats(0.0, 1e6)),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pruner_kwargs(), min_size=1, max_size=3))
def test_yaml_round_trip(pruners):
    config = PruningConfig(pruners=pruners)
    text = config.to_yaml()
    assert text.startswith("pruning_configs:")
    assert PruningConfig.from_yaml(text) == config
    assert load_config(text) == config
    assert PruningConfig.from_dict(config.to_dict()) == config
    for kwargs, pruner in zip(pruners, config.pruners):
        assert pruner.target_sparsity == kwargs["target_sparsity"]
        assert pruner.op_names == tuple(kwargs["op_names"])


def test_to_yaml_writes_the_file(tmp_path):
    config = PruningConfig(pruners=[PrunerConfig(pattern="2:4", target_sparsity=0.5)])
    text = config.to_yaml(tmp_path / "out.yaml")
    assert (tmp_path / "out.yaml").read_text() == text
    assert "'2:4'" in text  # quoted, or YAML 1.1 readers would see the base-60 integer 124
    assert PruningConfig.from_yaml(tmp_path / "out.yaml") == config


# ---- overrides and immutability --------------------------------------------------------------------------
def test_with_overrides_returns_a_new_validated_config():
    config = PruningConfig.from_kwargs([{"pattern": "2:4", "target_sparsity": 0.5}, {"pattern": "4x1"}])
    moved = config.with_overrides(start_step=100, end_step=500)
    assert [(p.start_step, p.end_step) for p in moved.pruners] == [(100, 500), (100, 500)]
    assert [(p.start_step, p.end_step) for p in config.pruners] == [(0, 0), (0, 0)]
    assert [p.pattern for p in moved.pruners] == ["2:4", "4x1"]
    err = config_error(config.with_overrides, target_sparsity=0.7)  # too much for the 2:4 pruner
    assert err.key == "target_sparsity" and "pruners[0]" in str(err)
    assert "did you mean 'end_step'" in str(config_error(config.with_overrides, end_stp=3))


def test_configs_are_immutable():
    config = PruningConfig.from_kwargs()
    err = config_error(setattr, config.pruners[0], "target_sparsity", 0.1)
    assert err.key == "target_sparsity" and "with_overrides" in str(err)
    config_error(setattr, config, "pruners", ())
    assert isinstance(config.pruners, tuple) and isinstance(config.pruners[0].op_names, tuple)
    assert hash(config) == hash(PruningConfig.from_kwargs())


def test_model_copy_revalidates():
    c = PrunerConfig()
    assert c.model_copy(update={"target_sparsity": 0.5}).target_sparsity == 0.5
    assert config_error(c.model_copy, update={"pruning_frequency": 0}).key == "pruning_frequency"


def test_no_shared_mutable_state_between_configs():
    """The original's shared ``pruning_configs=[{}]`` default made a second config inherit the first's values."""
    first = PruningConfig.from_kwargs(target_sparsity=0.3, pattern="1x1")
    second = PruningConfig.from_kwargs()
    assert (first.pruners[0].target_sparsity, first.pruners[0].pattern) == (0.3, "1x1")
    assert (second.pruners[0].target_sparsity, second.pruners[0].pattern) == (0.9, "4x1")

    # Neither the caller's dicts nor lists are filled in or kept by reference.
    local = {"op_names": ["attn"], "pattern": "2:4", "target_sparsity": 0.5}
    excluded = ["head"]
    snapshot = ({**local, "op_names": list(local["op_names"])}, list(excluded))
    config = PruningConfig.from_kwargs([local, {}], excluded_op_names=excluded)
    assert (local, excluded) == snapshot
    excluded.append("late")
    local["op_names"].append("late")
    assert [p.excluded_op_names for p in config.pruners] == [("head",), ("head",)]
    assert config.pruners[0].op_names == ("attn",)

    # Two configs built from the same input are equal but share no list objects.
    again = PruningConfig.from_kwargs([local, {}], excluded_op_names=excluded)
    d1, d2 = config.to_dict(), again.to_dict()
    d1["pruning_configs"][0]["op_names"].append("mutated")
    assert "mutated" not in d2["pruning_configs"][0]["op_names"]
    assert "mutated" not in config.to_dict()["pruning_configs"][0]["op_names"]


def test_configs_survive_pickle_and_copy():
    """Checkpoints and DDP spawn pickle configs; the immutability guard must not break that."""
    import copy
    import pickle

    config = PruningConfig.from_kwargs([{"pattern": "2:4", "target_sparsity": 0.5}, {"op_names": "ffn"}])
    assert pickle.loads(pickle.dumps(config)) == config
    assert copy.deepcopy(config) == config and copy.copy(config) == config
