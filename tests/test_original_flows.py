"""The original's own call sequences, run unchanged through prunekit.compat (issue 13, items 4, 5, 8, 9)."""
from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit.compat import Pruning
from prunekit.config import load_config
from prunekit.errors import ConfigError

V1_YAML = textwrap.dedent("""
    pruning:
      approach:
        weight_compression_pytorch:
          start_step: 0
          end_step: 0
          excluded_names: ["pooler"]
          prune_layer_type: ["Linear"]
          target_sparsity: 0.6
          update_frequency_on_step: 2
          prune_type: magnitude
          pruners:
            - !Pruner
                pattern: "tile_pattern_1x4"
                names: ["fc"]
""")


# ---- item 5: update_items_for_all_pruners takes the 1.x names ------------------------------------------------
@pytest.mark.parametrize("key, value, field, expected", [
    ("update_frequency_on_step", 5, "pruning_frequency", 5),
    ("prune_type", "snip_momentum", "pruning_type", "snip_momentum"),
    ("prune_domain", "local", "pruning_scope", "local"),
    ("max_sparsity_ratio_per_layer", 0.5, "max_sparsity_ratio_per_op", 0.5),
    ("names", ["fc1"], "op_names", ("fc1",)),
    ("prune_layer_type", ["Conv2d", "Linear"], "pruning_op_types", ("Conv2d", "Linear")),
    ("excluded_names", ["fc3"], "excluded_op_names", ("fc3",)),
    ("extra_excluded_names", ["fc3"], "excluded_op_names", ("fc3",)),
    ("pattern", "tile_pattern_4x1", "pattern", "4x1"),
    ("parameters", {"reg_coeff": 0.25}, "reg_coeff", 0.25),
])
def test_update_items_accepts_every_1x_name_as_load_config_reads_it(key, value, field, expected):
    """1.x code injects start/end steps and frequencies with its own key names (the issue's repro:
    ``update_frequency_on_step=5`` was an unknown key)."""
    prune = Pruning(V1_YAML)
    prune.update_items_for_all_pruners(**{key: value})
    assert getattr(prune.config.pruners[0], field) == expected
    if key != "parameters":  # a 2.x extra; every other name means the same in a 1.x YAML block
        block = {"prune_type": "magnitude", "target_sparsity": 0.6, key: value}
        via_load = load_config({"pruning": {"approach": {"weight_compression_pytorch": block}}})
        assert getattr(via_load.pruners[0], field) == expected


def test_update_items_2x_names_and_conflicts():
    prune = Pruning(V1_YAML)
    prune.update_items_for_all_pruners(start_step=1, end_step=9, update_frequency_on_step=4)
    pruner = prune.config.pruners[0]
    assert (pruner.start_step, pruner.end_step, pruner.pruning_frequency) == (1, 9, 4)
    with pytest.raises(ConfigError, match="pruning_frequency.*1.x name says 3"):
        prune.update_items_for_all_pruners(pruning_frequency=2, update_frequency_on_step=3)
    with pytest.raises(ConfigError, match="start_epoch.*steps_per_epoch"):
        prune.update_items_for_all_pruners(start_epoch=1)
    with pytest.raises(ConfigError, match="frobnicate.*unknown key.*update_frequency_on_step"):
        prune.update_items_for_all_pruners(frobnicate=1)
    assert prune.config.pruners[0].pruning_frequency == 4  # a refused update changes nothing
