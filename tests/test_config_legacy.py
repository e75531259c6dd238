"""The original's config forms: 2.x kwargs + local dicts, 1.x / 2.0 YAML, and the safe YAML loader."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prunekit.config import PrunerConfig, PruningConfig, load_config
from prunekit.config.legacy import LegacyYamlLoader, load_yaml
from prunekit.errors import ConfigError

DATA = Path(__file__).parent / "data"


def config_error(fn, *args, **kwargs) -> ConfigError:
    """Run ``fn`` and return the ConfigError it must raise."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return info.value


# ---- 2.x: WeightPruningConfig(pruning_configs=[...], **globals) --------------------------------------------
@pytest.mark.parametrize("locals_", [None, []])
def test_no_local_dicts_gives_one_pruner_from_the_globals(locals_):
    config = PruningConfig.from_kwargs(locals_, target_sparsity=0.7, pattern="1x1", lock_init_sparsity=True)
    assert config.pruners == (PrunerConfig(target_sparsity=0.7, pattern="1x1", lock_init_sparsity=True),)


def test_mixed_local_patterns_inherit_globals():
    config = PruningConfig.from_kwargs(
        [{"op_names": ["attn"], "pattern": "2:4", "target_sparsity": 0.5},
         {"op_names": ["ffn"], "pattern": "4x1"},
         {"op_names": None, "pattern": None, "start_step": 20}],
        target_sparsity=0.8, op_names=["encoder"], start_step=10, end_step=100, pruning_frequency=10,
    )
    first, second, third = config.pruners
    assert (first.pattern, first.target_sparsity, first.max_sparsity_ratio_per_op) == ("2:4", 0.5, 0.5)
    assert (second.pattern, second.target_sparsity, second.max_sparsity_ratio_per_op) == ("4x1", 0.8, 0.98)
    assert (first.op_names, second.op_names, third.op_names) == (("attn",), ("ffn",), ("encoder",))
    assert third.pattern == "4x1" and third.start_step == 20  # None inherits, a value wins
    assert {(p.end_step, p.pruning_frequency) for p in config.pruners} == {(100, 10)}
    assert [p.start_step for p in config.pruners] == [10, 10, 20]


def test_local_nm_inheriting_a_too_high_global_target_is_an_error():
    err = config_error(PruningConfig.from_kwargs, [{"pattern": "4x1"}, {"pattern": "2:4"}], target_sparsity=0.8)
    message = str(err)
    assert err.key == "target_sparsity" and "0.8" in message and "<= 0.5" in message and "'2:4'" in message
    assert "pruning_configs[1]" in message and "inherited" in message


def test_local_values_are_not_marked_inherited():
    err = config_error(PruningConfig.from_kwargs, [{"pattern": "2:4", "target_sparsity": 0.6}])
    assert "pruning_configs[0]" in str(err) and "inherited" not in str(err)


@pytest.mark.parametrize("where", ["global", "local"])
def test_parameters_are_flattened(where):
    params = {"parameters": {"reg_coeff": 0.25}, "reg_type": "group_lasso"}
    if where == "global":
        config = PruningConfig.from_kwargs([{}], **params)
    else:
        config = PruningConfig.from_kwargs([params])
    assert (config.pruners[0].reg_type, config.pruners[0].reg_coeff) == ("group_lasso", 0.25)


def test_parameters_conflicting_with_reg_coeff():
    err = config_error(PruningConfig.from_kwargs, reg_coeff=0.1, parameters={"reg_coeff": 0.2})
    assert err.key == "reg_coeff" and "0.1" in str(err) and "0.2" in str(err)
    err = config_error(PruningConfig.from_kwargs, parameters={"alpha": 0.2})
    assert err.key == "parameters" and "reg_coeff" in str(err)


def test_backend_is_accepted_and_ignored():
    assert PruningConfig.from_kwargs(backend=None) == PruningConfig.from_kwargs(backend="default")
    err = config_error(PruningConfig.from_kwargs, backend="itrex")
    assert err.key == "backend" and "'itrex'" in str(err) and "'default'" in str(err)


def test_resume_from_pruned_checkpoint_locks_the_initial_sparsity():
    assert PruningConfig.from_kwargs(resume_from_pruned_checkpoint=True).pruners[0].lock_init_sparsity
    assert not PruningConfig.from_kwargs(resume_from_pruned_checkpoint=False).pruners[0].lock_init_sparsity
    assert PruningConfig.from_kwargs([{"resume_from_pruned_checkpoint": True}, {}]).pruners[0].lock_init_sparsity
    err = config_error(PruningConfig.from_kwargs, resume_from_pruned_checkpoint="yes")
    assert err.key == "resume_from_pruned_checkpoint" and "true or false" in str(err)
    err = config_error(PruningConfig.from_kwargs, resume_from_pruned_checkpoint=True, lock_init_sparsity=False)
    assert err.key == "lock_init_sparsity"


def test_global_lock_init_sparsity_reaches_local_pruners():
    """The original dropped global keys outside its default table when local dicts were given."""
    config = PruningConfig.from_kwargs([{}, {"lock_init_sparsity": False}], lock_init_sparsity=True)
    assert [p.lock_init_sparsity for p in config.pruners] == [True, False]


@pytest.mark.parametrize("locals_, globals_, bad_key, suggestion", [
    ([{"pattern": "4x1", "target_sparity": 0.5}], {}, "target_sparity", "target_sparsity"),
    (None, {"pruning_scop": "local"}, "pruning_scop", "pruning_scope"),
    (None, {"prune_type": "magnitude"}, "prune_type", "pruning_type"),
])
def test_unknown_2x_keys_are_rejected_with_a_suggestion(locals_, globals_, bad_key, suggestion):
    err = config_error(PruningConfig.from_kwargs, locals_, **globals_)
    assert err.key == bad_key and "unknown key" in str(err) and f"did you mean {suggestion!r}" in str(err)


def test_pruning_configs_must_be_a_list_of_dicts():
    assert config_error(PruningConfig.from_kwargs, "4x1").key == "pruning_configs"
    err = config_error(PruningConfig.from_kwargs, [{"pattern": "4x1"}, ["2:4"]])
    assert err.key == "pruning_configs[1]" and "a dict" in str(err)


def test_a_single_dict_and_prebuilt_pruners_are_accepted():
    built = PrunerConfig(pattern="1x1")
    config = PruningConfig.from_kwargs([built, {"pattern": "2:4"}], target_sparsity=0.4)
    assert config.pruners[0] is built  # fully resolved already: globals do not apply
    assert config.pruners[1].target_sparsity == 0.4
    assert PruningConfig.from_kwargs({"pattern": "1x1"}).pruners[0].pattern == "1x1"


def test_from_dict_reads_the_2x_form():
    d = {"target_sparsity": 0.6, "pruning_configs": [{"pattern": "1x1"}, {"pattern": "2:4", "target_sparsity": 0.5}]}
    config = PruningConfig.from_dict(d)
    assert [(p.pattern, p.target_sparsity) for p in config.pruners] == [("1x1", 0.6), ("2:4", 0.5)]
    assert d == {"target_sparsity": 0.6,
                 "pruning_configs": [{"pattern": "1x1"}, {"pattern": "2:4", "target_sparsity": 0.5}]}


def test_2x_kwargs_yaml_file():
    config = load_config(DATA / "v2_kwargs.yaml")
    attn, ffn = config.pruners
    assert (attn.pattern, attn.target_sparsity, attn.op_names) == ("2:4", 0.5, ("attention",))
    assert (ffn.pattern, ffn.target_sparsity, ffn.op_names) == ("4x1", 0.8, ("ffn",))
    assert all(p.pruning_type == "snip_momentum_progressive" and p.progressive for p in config.pruners)
    assert {(p.start_step, p.end_step, p.pruning_frequency) for p in config.pruners} == {(10, 200, 20)}


# ---- 1.x: pruning: approach: weight_compression_pytorch + !Pruner ------------------------------------------
def test_1x_yaml_file_with_two_pruners():
    config = PruningConfig.from_yaml(DATA / "v1_pytorch_pruner.yaml")
    first, second = config.pruners
    # first: local keys win, global ones fill in (1.x names translated)
    assert first.op_names == ("layer1.*",)
    assert first.excluded_op_names == ("classifier", "pooler", "layer1.2.*")  # global + extra_excluded_names
    assert (first.pruning_type, first.criterion, first.progressive) == ("magnitude_progressive", "magnitude", True)
    assert (first.pruning_scope, first.sparsity_decay_type, first.pattern) == ("local", "cos", "4x1")
    assert (first.target_sparsity, first.start_step, first.end_step, first.pruning_frequency) == (0.8, 0, 100, 10)
    assert first.max_sparsity_ratio_per_op == 0.95
    assert first.pruning_op_types == ("Linear",)
    # second: unquoted `2:4` is a pattern, not YAML 1.1's base-60 integer 124
    assert (second.pattern, second.target_sparsity, second.max_sparsity_ratio_per_op) == ("2:4", 0.5, 0.5)
    assert (second.start_step, second.end_step, second.pruning_scope) == (10, 10, "global")
    assert second.excluded_op_names == ("classifier", "pooler")
    assert second.pruning_type == "snip_momentum"


def test_1x_defaults_apply_where_keys_are_absent():
    config = PruningConfig.from_dict({"pruning": {"approach": {"weight_compression_pytorch": {}}}})
    (only,) = config.pruners
    assert (only.target_sparsity, only.pattern, only.pruning_type) == (0.0, "4x1", "snip_momentum")
    assert (only.pruning_scope, only.pruning_frequency, only.max_sparsity_ratio_per_op) == ("global", 1, 0.98)
    assert only.pruning_op_types == ("Conv2d", "Linear")


def test_1x_exclusion_synonyms_are_merged():
    block = {"not_to_prune_names": ["head"], "excluded_names": "pool",
             "pruners": [{"exclude_names": ["emb"], "extra_excluded_names": ["head", "norm"]}]}
    (only,) = PruningConfig.from_dict({"weight_compression_pytorch": block}).pruners
    assert only.excluded_op_names == ("head", "pool", "emb", "norm")


@pytest.mark.parametrize("key, value", [("start_epoch", 0), ("end_epoch", 4), ("update_frequency", 0.1),
                                        ("method", "per_tensor"), ("initial_sparsity", 0.5)])
def test_1x_epoch_keys_must_be_converted_to_steps(key, value):
    block = {"target_sparsity": 0.9, "pruners": [{key: value}]}
    err = config_error(PruningConfig.from_dict, {"pruning": {"approach": {"weight_compression_pytorch": block}}})
    message = str(err)
    assert err.key == key and repr(value) in message and "start_step" in message
    assert "steps_per_epoch" in message and "pruners[0]" in message


def test_1x_zero_initial_sparsity_is_accepted():
    """Nearly every 1.14 file carries `initial_sparsity: 0.0`, which the step pruner ignored anyway."""
    config = PruningConfig.from_dict({"weight_compression_pytorch": {"initial_sparsity": 0.0, "target_sparsity": 0.5}})
    assert config.pruners[0].target_sparsity == 0.5


@pytest.mark.parametrize("key, suggestion", [("prune_typ", "prune_type"), ("pruning_type", "prune_type"),
                                             ("update_frequency_on_steps", "update_frequency_on_step")])
def test_unknown_1x_keys_are_rejected_with_a_suggestion(key, suggestion):
    err = config_error(PruningConfig.from_dict, {"weight_compression_pytorch": {"pruners": [{key: "x"}]}})
    assert err.key == key and "unknown 1.x key" in str(err) and f"did you mean {suggestion!r}" in str(err)


def test_1x_values_are_validated_with_1x_context():
    block = {"update_frequency_on_step": 0}
    err = config_error(PruningConfig.from_dict, {"weight_compression_pytorch": block})
    assert err.key == "pruning_frequency" and "got 0" in str(err) and "weight_compression_pytorch" in str(err)


def test_the_epoch_based_approach_is_rejected():
    err = config_error(PruningConfig.from_dict, {"pruning": {"approach": {"weight_compression": {}}}})
    assert err.key == "pruning.approach" and "weight_compression_pytorch" in str(err) and "steps" in str(err)
    err = config_error(PruningConfig.from_dict, {"pruning": {"train": {}}})
    assert err.key == "pruning" and "approach" in str(err)


# ---- 2.0-2.2: weight_compression_v2 + !PrunerV2 ----------------------------------------------------------
def test_v2_yaml_file():
    config = load_config(DATA / "v2_weight_compression.yaml")
    qk, ffn = config.pruners
    assert (qk.pattern, qk.pruning_scope, qk.target_sparsity, qk.op_names) == ("channelx1", "local", 0.7,
                                                                               ("query", "key"))
    assert (ffn.pattern, ffn.target_sparsity, ffn.max_sparsity_ratio_per_op) == ("1:4", 0.25, 0.25)
    assert all(p.reg_coeff == 0.001 and p.excluded_op_names == ("classifier",) for p in config.pruners)
    assert all(p.pruning_op_types == ("Linear",) and p.end_step == 50 for p in config.pruners)


def test_loaded_legacy_configs_round_trip_through_to_yaml():
    for name in ("v1_pytorch_pruner.yaml", "v2_weight_compression.yaml", "v2_kwargs.yaml"):
        config = load_config(DATA / name)
        assert load_config(config.to_yaml()) == config


# ---- the YAML loader is safe -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, tag", [
    ("!!python/object/apply:os.system ['echo pwned']", "python/object/apply:os.system"),
    ("target_sparsity: !!python/name:os.system ''", "python/name:os.system"),
    ("pruning_configs:\n  - !!python/object:collections.OrderedDict {}", "python/object:collections.OrderedDict"),
    ("pattern: !Pattern 4x1", "!Pattern"),
])
def test_forbidden_yaml_tags_are_refused(text, tag, tmp_path):
    err = config_error(load_config, text)
    assert err.key == "yaml tag" and tag in str(err) and "!Pruner" in str(err)
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    assert config_error(load_config, path).key == "yaml tag"


def test_pruner_tag_must_tag_a_mapping():
    err = config_error(load_yaml, "pruners: [!Pruner 3]")
    assert err.key == "yaml tag" and "!Pruner" in str(err) and "mapping" in str(err)


def test_loader_does_not_change_pyyaml_globally():
    load_yaml("a: !Pruner {b: 1}")
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load("a: !Pruner {b: 1}")
    assert yaml.safe_load("p: 2:4") == {"p": 124}  # PyYAML's own YAML 1.1 reading is untouched
    assert LegacyYamlLoader.__mro__[1] is yaml.SafeLoader


def test_loader_keeps_ordinary_yaml_types():
    doc = load_yaml("a: 1\nb: 0x10\nc: 1.5\nd: [x, y]\ne: null\nf: true\ng: 2:4\nh: 1.0e-4\n"
                    "base: &b {x: 1}\nmerged: {<<: *b, x: 2}\n")
    assert doc == {"a": 1, "b": 16, "c": 1.5, "d": ["x", "y"], "e": None, "f": True, "g": "2:4", "h": 1e-4,
                   "base": {"x": 1}, "merged": {"x": 2}}


def test_duplicate_yaml_keys_are_refused():
    err = config_error(load_config, "target_sparsity: 0.5\npattern: 4x1\ntarget_sparsity: 0.8\n")
    assert err.key == "target_sparsity" and "0.8" in str(err) and "once" in str(err) and "line 3" in str(err)


def test_yaml_syntax_errors_become_config_errors():
    err = config_error(load_config, "pruning_configs: [\n")
    assert err.key == "yaml" and "valid YAML" in str(err)


def test_yaml_document_of_the_wrong_shape():
    assert config_error(load_config, "42").key == "config"
    assert config_error(load_config, "- 4x1").key == "pruning_configs[0]"
