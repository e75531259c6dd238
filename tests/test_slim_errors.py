"""auto_slim_configs, the original's names, and errors for impossible requests."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError, SlimmingError
from prunekit.slimming import auto_slim_configs, detect, slim
from prunekit.slimming.compat import model_slim, parse_auto_slim_config
from test_slim_fixtures import FAMILIES, FFN, inputs_for, outputs, zero_channels


def test_auto_configs_name_exact_modules() -> None:
    model = FAMILIES["gpt2"]()
    ffn, mha = auto_slim_configs(model, ffn2_sparsity=0.5, mha_sparsity=0.25, pruning_type="snip_momentum")
    assert ffn == {"op_names": ["^transformer\\.h\\.0\\.mlp\\.c_proj$", "^transformer\\.h\\.1\\.mlp\\.c_proj$"],
                   "pattern": "channelx1", "target_sparsity": 0.5, "pruning_type": "snip_momentum"}
    assert mha["pattern"] == "mha" and mha["target_sparsity"] == 0.25
    assert mha["op_names"] == ["^transformer\\.h\\.0\\.attn$", "^transformer\\.h\\.1\\.attn$"]
    names = dict(model.named_modules())
    for regex in ffn["op_names"] + mha["op_names"]:
        assert len([n for n in names if re.search(regex, n)]) == 1


def test_zero_sparsity_parts_are_left_out() -> None:
    model = FAMILIES["bert"]()
    assert [c["pattern"] for c in auto_slim_configs(model, ffn2_sparsity=0.3)] == ["channelx1"]
    assert [c["pattern"] for c in auto_slim_configs(model, mha_sparsity=0.3)] == ["mha"]
    assert auto_slim_configs(model) == []


@pytest.mark.parametrize("key", ["pattern", "op_names", "target_sparsity"])
def test_overrides_cannot_replace_generated_keys(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        auto_slim_configs(FAMILIES["bert"](), ffn2_sparsity=0.5, **{key: "4x1"})
    assert info.value.key == key


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, "half"])
def test_sparsity_must_be_a_fraction(value) -> None:
    with pytest.raises(ConfigError) as info:
        auto_slim_configs(FAMILIES["bert"](), ffn2_sparsity=value)
    assert info.value.key == "ffn2_sparsity"


def test_mha_target_removing_every_head_is_refused() -> None:
    model = FAMILIES["bert"]()
    with pytest.raises(SlimmingError, match="leaving none"):
        auto_slim_configs(model, mha_sparsity=0.9)                  # round(0.9 * 4) == 4
    assert auto_slim_configs(model, mha_sparsity=0.9, allow_empty_layers=True)[0]["pattern"] == "mha"


class NoFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def test_model_without_ffn_is_an_error_saying_what_was_looked_for() -> None:
    with pytest.raises(SlimmingError, match="found no FFN block"):
        auto_slim_configs(NoFFN(), ffn2_sparsity=0.5, example_inputs=torch.randn(2, 8))
    with pytest.raises(SlimmingError, match="found no FFN block"):
        slim(NoFFN(), example_inputs=torch.randn(2, 8))


def test_ffn_fully_zero_is_refused_unless_allowed() -> None:
    model = FAMILIES["bert"]()
    x = inputs_for("bert")
    zero_channels(model, detect(model).ffn[0], list(range(FFN)))
    with pytest.raises(SlimmingError, match="every one of its 48 FFN channels"):
        slim(model)
    expected = outputs(model, x)
    report = slim(model, allow_empty_layers=True)
    assert report.ffn[0].width_after == 0
    assert torch.allclose(outputs(model, x), expected, atol=1e-5)


def test_layers_with_masks_attached_are_refused() -> None:
    model = FAMILIES["bert"]()
    group = detect(model).ffn[0]
    zero_channels(model, group, [0, 1])
    consumer = model.get_submodule(group.consumer)
    consumer.register_buffer("weight_prune_mask", torch.ones(1, FFN, dtype=torch.bool), persistent=False)
    with pytest.raises(SlimmingError, match="still carries pruning masks"):
        slim(model)


def test_zeros_outside_any_group_are_reported() -> None:
    model = FAMILIES["bert"]()
    zero_channels(model, detect(model).ffn[0], [0])
    with torch.no_grad():
        model.classifier.weight[:, 3] = 0
    report = slim(model)
    left = [s for s in report.not_cut if s.name == "classifier"]
    assert left and left[0].indices == [3] and "head" in left[0].reason


def test_original_names_and_argument_order() -> None:
    model = FAMILIES["bert"]()
    loader = [{**inputs_for("bert"), "labels": torch.tensor([0, 1])}]
    configs = parse_auto_slim_config(model, loader, 0.5, 0.25, pruning_scope="local")
    assert [(c["pattern"], c["target_sparsity"], c["pruning_scope"]) for c in configs] == [
        ("channelx1", 0.5, "local"), ("mha", 0.25, "local")]
    with pytest.raises(ConfigError):
        parse_auto_slim_config(model, None, 0.5, pattern="4x1")
    zero_channels(model, detect(model).ffn[0], list(range(40)))
    assert model_slim(model, loader, round_multiplier=4) is model
    assert model.bert.encoder.layer[0].output.dense.in_features == 8
    with pytest.raises(SlimmingError):
        model_slim(NoFFN())  # raised, not swallowed
