"""sparsity_report: per-layer rows and the three totals, measured independently from the weights."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import prunekit
from conftest import nonzero_weight_


class Mixed(nn.Module):
    """Linear, Conv2d and Conv1D layers, one untileable under 4x1, plus a non-prunable embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(16, 8)
        self.gpt = Conv1D(8, 16)      # weight [16, 8]
        self.odd = nn.Linear(8, 6)    # 6 output rows: not divisible into 4x1 blocks
        self.head = nn.Linear(8, 3)
        for m in (self.conv, self.fc, self.gpt, self.odd, self.head):
            nonzero_weight_(m)


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


@pytest.fixture
def pruned():
    model = Mixed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "pattern": "4x1",
                                           "target_sparsity": 0.5, "op_names": ["conv", "fc", "gpt", "odd"],
                                           "pruning_scope": "local"})
    pruning.on_train_begin()
    return model, pruning


def test_rows_describe_each_layer(pruned):
    model, pruning = pruned
    report = prunekit.sparsity_report(model, pruning)
    rows = {r.name: r for r in report.layers}
    assert set(rows) == {"conv", "fc", "gpt", "odd"}
    for name in ("conv", "fc", "gpt"):
        w = model.get_submodule(name).weight
        row = rows[name]
        assert row.shape == list(w.shape) and row.pattern == "4x1" and row.status == "pruned"
        assert row.element_sparsity == pytest.approx(zeros(w) / w.numel())
        layer = next(l for l in pruning.layers if l.name == name)
        assert row.block_sparsity == pytest.approx(layer.bound.pruned_units(layer.mask) / layer.num_units)
        assert row.block_sparsity == pytest.approx(0.5)
    # block sparsity counted from the weight: all-zero 4x1 blocks along the output axis
    gpt = model.gpt.weight  # [in, out]
    gpt_blocks = (gpt.t() == 0).reshape(2, 4, 16).all(dim=1)
    assert rows["gpt"].block_sparsity == pytest.approx(gpt_blocks.float().mean().item())
    conv_blocks = (model.conv.weight == 0).reshape(2, 4, 4, 3, 3).all(dim=1)
    assert rows["conv"].block_sparsity == pytest.approx(conv_blocks.float().mean().item())
    assert rows["odd"].status != "pruned" and "divisible" in rows["odd"].status
    assert rows["odd"].element_sparsity == 0.0 and rows["odd"].block_sparsity is None


def test_three_totals(pruned):
    model, pruning = pruned
    report = prunekit.sparsity_report(model, pruning)
    pruned_w = [model.conv.weight, model.fc.weight, model.gpt.weight]
    z, n = sum(zeros(w) for w in pruned_w), sum(w.numel() for w in pruned_w)
    assert (report.pruned_zeros, report.pruned_numel) == (z, n)
    assert report.pruned_layers_sparsity == pytest.approx(z / n) == pytest.approx(0.5)
    lc = pruned_w + [model.odd.weight, model.head.weight]  # every Linear/Conv weight, pruned or not
    assert report.linear_conv_sparsity == pytest.approx(sum(zeros(w) for w in lc) / sum(w.numel() for w in lc))
    params = list(model.parameters())
    assert report.all_params_sparsity == pytest.approx(sum(zeros(p) for p in params) / sum(p.numel() for p in params))
    assert report.all_params_sparsity < report.linear_conv_sparsity < report.pruned_layers_sparsity


def test_table_and_json(pruned):
    model, pruning = pruned
    report = prunekit.sparsity_report(model, pruning)
    table = report.table()
    for name in ("conv", "fc", "gpt", "odd"):
        assert name in table
    assert "4x1" in table and "divisible" in table
    assert f"{report.pruned_layers_sparsity:.4f}" in table
    assert f"{report.linear_conv_sparsity:.4f}" in table and f"{report.all_params_sparsity:.4f}" in table
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert data == json.loads(json.dumps(data))
    by_name = {r["name"]: r for r in data["layers"]}
    assert by_name["fc"]["shape"] == [8, 16] and by_name["odd"]["block_sparsity"] is None
    assert data["pruned_layers_sparsity"] == pytest.approx(0.5)
    assert json.loads(report.to_json(indent=None)) == data


def test_report_from_the_model_alone_and_from_a_copy(pruned):
    """Without the Pruning object, pruned layers are found from their mask buffers (e.g. a deep copy)."""
    model, pruning = pruned
    full = prunekit.sparsity_report(model, pruning)
    for m in (model, copy.deepcopy(model)):
        alone = prunekit.sparsity_report(m)
        rows = {r.name: r for r in alone.layers}
        assert set(rows) == {"conv", "fc", "gpt"}  # the untileable layer is only known to the Pruning
        for r in full.layers:
            if r.name in rows:
                assert rows[r.name].element_sparsity == r.element_sparsity
                assert rows[r.name].block_sparsity == pytest.approx(r.block_sparsity)
        assert alone.pruned_layers_sparsity == full.pruned_layers_sparsity


def test_nm_report_counts_groups_and_on_train_end_returns_the_report(capsys):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    nonzero_weight_(model[0])
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "pattern": "2:4", "target_sparsity": 0.25})
    pruning.on_train_begin()
    report = pruning.on_train_end()
    assert "pruned layers" in capsys.readouterr().out
    [row] = report.layers
    groups = (model[0].weight.reshape(8, 4, 4) == 0).any(dim=2)
    assert row.block_sparsity == pytest.approx(groups.float().mean().item()) == pytest.approx(0.5)
    assert row.element_sparsity == pytest.approx(0.25)
    assert pruning.report().to_dict() == report.to_dict()


def test_unpruned_model_reports_nothing_pruned():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    report = prunekit.sparsity_report(model)
    assert report.layers == [] and report.pruned_layers_sparsity == 0.0
    assert report.linear_conv_sparsity == 0.0
    json.loads(report.to_json())
