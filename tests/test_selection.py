"""Layer selection: op_names / excluded_op_names regexes, pruning_op_types, output heads, clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import prunekit
from prunekit.errors import SelectionError
from prunekit.layouts import layout_of
from prunekit.selection import candidates, output_heads, select


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({"query": nn.Linear(8, 8), "output": nn.Linear(8, 8)})
        self.intermediate = nn.Linear(8, 16)
        self.output = nn.ModuleDict({"dense": nn.Linear(16, 8)})
        self.norm = nn.LayerNorm(8)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(20, 8)
        self.layer = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv1d(8, 8, 3)
        self.tconv = nn.ConvTranspose2d(8, 8, 3)
        self.gpt = Conv1D(8, 8)
        self.drop = nn.Dropout(0.1)
        self.classifier = nn.Linear(8, 2)
        self.act = nn.Tanh()


def names(chosen) -> list[str]:
    return [c.name for c in chosen]


def test_op_names_are_regex_searches_anywhere_in_the_name():
    model = Encoder()
    got = names(select(model, [".*output"], [], ["Linear"]))
    assert got == ["layer.0.attention.output", "layer.0.output.dense", "layer.1.attention.output",
                   "layer.1.output.dense"]
    assert names(select(model, ["layer\\.1\\..*query"], [], ["Linear"])) == ["layer.1.attention.query"]


def test_excluded_op_names_win_over_op_names():
    model = Encoder()
    got = names(select(model, ["layer"], ["attention", "layer\\.1"], ["Linear"]))
    assert got == ["layer.0.intermediate", "layer.0.output.dense"]


def test_empty_op_names_select_every_candidate_except_the_head():
    model = Encoder()
    got = names(select(model, [], [], ["Linear", "Conv"]))
    assert "classifier" not in got
    assert {"conv", "tconv", "gpt", "layer.0.attention.query"} <= set(got)
    assert not any("embeddings" in n or "norm" in n for n in got)


def test_op_types_match_class_names_along_the_mro():
    model = Encoder()
    conv = names(candidates(model, ["Conv"]))
    assert conv == ["conv", "tconv", "gpt"]  # Conv1d, ConvTranspose2d and transformers' Conv1D
    assert names(candidates(model, ["ConvTranspose"])) == ["tconv"]
    mha = nn.MultiheadAttention(8, 2)  # out_proj is a Linear subclass; the fused in_proj is no Linear
    assert names(candidates(nn.Sequential(mha), ["Linear"])) == ["0.out_proj"]


def test_layouts_give_the_right_axes():
    model = Encoder()
    assert (layout_of(model.conv).out_axis, layout_of(model.conv).in_axis) == (0, 1)
    assert (layout_of(model.tconv).out_axis, layout_of(model.tconv).in_axis) == (1, 0)
    assert (layout_of(model.gpt).out_axis, layout_of(model.gpt).in_axis) == (1, 0)
    assert layout_of(model.embeddings) is None and layout_of(model.layer[0].norm) is None


def test_types_without_a_layout_are_never_selected():
    model = Encoder()
    with pytest.raises(SelectionError):
        select(model, [], [], ["Embedding", "LayerNorm"])


def test_output_head_is_the_last_weighted_layer_skipping_activations_and_dropout():
    assert output_heads(Encoder()) == {"classifier"}
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Dropout(), nn.LogSoftmax(dim=-1))
    assert output_heads(seq) == {"2"}


def test_head_is_selected_only_when_named():
    model = Encoder()
    assert "classifier" not in names(select(model, ["classifier|query"], [], ["Linear"]))
    assert names(select(model, ["classifier"], [], ["Linear"])) == ["classifier"]
    assert names(select(model, ["^classifier$"], [], ["Linear"])) == ["classifier"]


def test_hf_output_embeddings_are_the_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    assert "lm_head" in output_heads(model)
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "pattern": "4x1", "target_sparsity": 0.5,
                                       "pruning_scope": "local"})
    got = [l.name for l in pruning.layers]
    assert got == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                   "transformer.h.0.mlp.c_proj"]
    pruning.on_train_begin()
    assert int((model.lm_head.weight == 0).sum()) == 0
    w = model.transformer.h[0].mlp.c_fc.weight  # Conv1D [in=16, out=64]: blocks of 4 output features
    blocks = (w == 0).reshape(16, 16, 4)
    assert bool((blocks.all(dim=2) | (~blocks).all(dim=2)).all())
    assert int(blocks.all(dim=2).sum()) == 128


def test_no_match_error_lists_candidates_and_the_head():
    model = Encoder()
    with pytest.raises(SelectionError) as info:
        select(model, ["decoder"], [], ["Linear"])
    msg = str(info.value)
    assert "decoder" in msg and "layer.0.attention.query" in msg and "classifier" in msg


def test_no_match_error_truncates_long_listings():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(40)])
    with pytest.raises(SelectionError) as info:
        select(model, ["nothing"], [], ["Linear"])
    msg = str(info.value)
    assert "29" in msg and "35" not in msg and "…" in msg


def test_model_without_prunable_layers_is_a_selection_error_not_a_crash():
    """The original's head detection crashed on models without Linear/Conv."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(SelectionError, match="none"):
        prunekit.Pruning(model, {})


def test_failed_selection_leaves_the_model_untouched():
    model = Encoder()
    with pytest.raises(SelectionError):
        prunekit.Pruning(model, {"op_names": ["does_not_exist"]})
    assert not [n for n, _ in model.named_buffers()]
    assert torch.equal(model.state_dict()["classifier.weight"], model.classifier.weight)
