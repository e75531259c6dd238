"""OneShotConfig: typed, frozen, every bad value a ConfigError naming key, value and what is allowed."""
from __future__ import annotations

import pytest

from prunekit.errors import ConfigError
from prunekit.oneshot.config import OneShotConfig, load_oneshot_config


def test_defaults_and_yaml_round_trip(tmp_path):
    cfg = OneShotConfig(method="magnitude", pattern="2:4", op_names=r"mlp\.", nsamples=4, seqlen=32,
                        dtype="bfloat16", device="cpu")
    assert cfg.target_sparsity == 0.5 and cfg.op_names == (r"mlp\.",)
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    again = OneShotConfig.from_yaml(path)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert load_oneshot_config(path.read_text()) == cfg
    assert load_oneshot_config(cfg.to_dict()) == cfg


def test_nm_fixes_the_sparsity():
    assert OneShotConfig(method="magnitude", pattern="1:4").target_sparsity == 0.25
    assert OneShotConfig(method="magnitude", pattern="4:8", target_sparsity=0.5).target_sparsity == 0.5
    with pytest.raises(ConfigError, match=r"target_sparsity: got 0.7; allowed: 0.5 for pattern '2:4'"):
        OneShotConfig(method="magnitude", pattern="2:4", target_sparsity=0.7)


@pytest.mark.parametrize("kwargs, key, value", [
    ({"method": "sparsgpt_x"}, "method", "'sparsgpt_x'"),
    ({"target_sparsity": 1.0}, "target_sparsity", "1.0"),
    ({"target_sparsity": -0.1}, "target_sparsity", "-0.1"),
    ({"target_sparsity": True}, "target_sparsity", "True"),
    ({"pattern": "4x1"}, "pattern", "'4x1'"),            # magnitude: 1x1 and N:M only
    ({"pattern": "channelx1"}, "pattern", "'channelx1'"),
    ({"pattern": "3:2"}, "pattern", "'3:2'"),
    ({"pattern": 4}, "pattern", "4"),
    ({"op_names": ["layer[1"]}, "op_names", "'layer[1'"),
    ({"profile": "owll"}, "profile", "'owll'"),
    ({"profile": "owl", "pattern": "2:4"}, "profile", "'owl'"),
    ({"profile": "owl", "owl_lambda": 0.6}, "owl_lambda", "0.6"),
    ({"profile": "owl", "target_sparsity": 0.95, "owl_lambda": 0.08}, "owl_lambda", "0.08"),
    ({"owl_threshold": 0}, "owl_threshold", "0.0"),
    ({"nsamples": 0}, "nsamples", "0"),
    ({"seqlen": 1}, "seqlen", "1"),
    ({"dampening": -1.0}, "dampening", "-1.0"),
    ({"device": "gpu:x"}, "device", "'gpu:x'"),
    ({"dtype": "float64"}, "dtype", "'float64'"),
    ({"nsampels": 3}, "nsampels", "3"),
])
def test_bad_values_name_key_value_and_allowed(kwargs, key, value):
    with pytest.raises(ConfigError) as info:
        OneShotConfig(**{"method": "magnitude", **kwargs})
    err = info.value
    assert err.key == key and str(err).startswith(f"{key}: got {value}; ") and err.allowed, str(err)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'nsamples'"):
        OneShotConfig(method="magnitude", nsampels=3)


def test_config_is_immutable_and_overrides_revalidate():
    cfg = OneShotConfig(method="magnitude", pattern="2:4")
    with pytest.raises(ConfigError, match="immutable"):
        cfg.pattern = "1x1"
    assert cfg.with_overrides(pattern="1:4").target_sparsity == 0.25
    with pytest.raises(ConfigError, match="target_sparsity"):
        cfg.with_overrides(target_sparsity=2.0)


def test_true_sequential_defaults_to_the_method_and_round_trips():
    from prunekit.oneshot.config import OneShotConfig
    from prunekit.oneshot.methods import METHODS

    assert OneShotConfig().method_options().true_sequential is None
    assert METHODS.get("sparsegpt").true_sequential and not METHODS.get("wanda").true_sequential
    cfg = OneShotConfig(method="sparsegpt", true_sequential=False)
    assert cfg.method_options().true_sequential is False
    assert OneShotConfig.from_yaml(cfg.to_yaml()).true_sequential is False
    with pytest.raises(ConfigError, match="true_sequential"):
        OneShotConfig(true_sequential="sometimes")
