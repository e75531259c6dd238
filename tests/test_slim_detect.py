"""Detection of FFN and attention groups from the autograd dataflow, per family, and its fallback."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.slimming import detect, find_attention_groups, find_ffn_groups
from test_slim_fixtures import FAMILIES, FFN, HEADS, HIDDEN, LAYERS

# family -> (first FFN producers, consumer, first attention (name, q, k, v, o), fused, kv heads)
EXPECTED = {
    "bert": (["bert.encoder.layer.0.intermediate.dense"], "bert.encoder.layer.0.output.dense",
             ("bert.encoder.layer.0.attention", "bert.encoder.layer.0.attention.self.query",
              "bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.value",
              "bert.encoder.layer.0.attention.output.dense"), False, HEADS),
    "distilbert": (["transformer.layer.0.ffn.lin1"], "transformer.layer.0.ffn.lin2",
                   ("transformer.layer.0.attention", "transformer.layer.0.attention.q_lin",
                    "transformer.layer.0.attention.k_lin", "transformer.layer.0.attention.v_lin",
                    "transformer.layer.0.attention.out_lin"), False, HEADS),
    "roberta": (["encoder.layer.0.intermediate.dense"], "encoder.layer.0.output.dense",
                ("encoder.layer.0.attention", "encoder.layer.0.attention.self.query",
                 "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
                 "encoder.layer.0.attention.output.dense"), False, HEADS),
    "gpt2": (["transformer.h.0.mlp.c_fc"], "transformer.h.0.mlp.c_proj",
             ("transformer.h.0.attn", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn",
              "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"), True, HEADS),
    "llama": (["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], "model.layers.0.mlp.down_proj",
              ("model.layers.0.self_attn", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
               "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"), False, 2),
    "vit": (["vit.layers.0.mlp.fc1"], "vit.layers.0.mlp.fc2",
            ("vit.layers.0.attention", "vit.layers.0.attention.q_proj", "vit.layers.0.attention.k_proj",
             "vit.layers.0.attention.v_proj", "vit.layers.0.attention.o_proj"), False, HEADS),
}


def _check(found, family: str) -> None:
    producers, consumer, (name, q, k, v, o), fused, kv = EXPECTED[family]
    assert len(found.ffn) == LAYERS and len(found.attention) == LAYERS
    ffn = found.ffn[0]
    assert sorted(ffn.producers) == sorted(producers) and ffn.consumer == consumer and ffn.width == FFN
    att = found.attention[0]
    assert (att.name, att.q, att.k, att.v, att.o) == (name, q, k, v, o)
    assert att.fused_qkv is fused
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (HEADS, kv, HIDDEN // HEADS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_trace_finds_every_group(family: str, attn: str) -> None:
    model = FAMILIES[family]()
    model.config._attn_implementation = attn
    found = detect(model)
    assert found.method == "trace" and found.trace_error is None
    _check(found, family)
    assert all(g.source == "trace" for g in found.ffn + found.attention)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_structure_rules_agree_with_trace(family: str) -> None:
    model = FAMILIES[family]()
    traced, ruled = detect(model), detect(model, method="structure")
    _check(ruled, family)
    key = lambda g: (g.name, g.q, g.k, g.v, g.o, g.num_heads, g.num_kv_heads, g.head_dim,  # noqa: E731
                     g.q_offset, g.k_offset, g.v_offset)
    assert [key(g) for g in traced.attention] == [key(g) for g in ruled.attention]
    assert [(sorted(g.producers), g.consumer) for g in traced.ffn] == \
           [(sorted(g.producers), g.consumer) for g in ruled.ffn]


def test_tracing_failure_falls_back_to_structure_rules() -> None:
    model = FAMILIES["bert"]()
    found = detect(model, example_inputs={"not_an_argument": torch.zeros(1)})
    assert found.method == "structure" and "tracing the model failed" in found.trace_error
    _check(found, "bert")


def test_gpt2_fused_qkv_is_self_describing() -> None:
    model = FAMILIES["gpt2"]()
    att = find_attention_groups(model)[0]
    d = HIDDEN // HEADS
    assert (att.q_offset, att.k_offset, att.v_offset) == (0, HIDDEN, 2 * HIDDEN)
    slices = att.head_slices(1)
    assert {(s.module, s.axis, s.start, s.stop) for s in slices} == {
        ("transformer.h.0.attn.c_attn", "out", d, 2 * d),
        ("transformer.h.0.attn.c_attn", "out", HIDDEN + d, HIDDEN + 2 * d),
        ("transformer.h.0.attn.c_attn", "out", 2 * HIDDEN + d, 2 * HIDDEN + 2 * d),
        ("transformer.h.0.attn.c_proj", "in", d, 2 * d),
    }
    q_slice = next(s for s in slices if s.start == d)
    # Conv1D stores [in, out]: output features are weight columns.
    assert q_slice.weight_index(model) == (slice(None), slice(d, 2 * d))
    o_slice = next(s for s in slices if s.axis == "in")
    assert o_slice.weight_index(model) == (slice(d, 2 * d), slice(None)) and o_slice.bias_index() is None


def test_gqa_group_maps_query_heads_to_kv_heads() -> None:
    att = find_attention_groups(FAMILIES["llama"]())[0]
    assert att.is_gqa and att.heads_per_kv == 2
    assert [att.kv_head_of(h) for h in range(HEADS)] == [0, 0, 1, 1]
    assert att.query_heads_of(1) == [2, 3]
    d = HIDDEN // HEADS
    # A query head alone owns q rows and o columns; k/v rows belong to its key/value head.
    assert {(s.module.rsplit(".", 1)[1], s.start) for s in att.head_slices(3)} == {("q_proj", 3 * d),
                                                                                  ("o_proj", 3 * d)}
    assert {(s.module.rsplit(".", 1)[1], s.start) for s in att.kv_head_slices(1)} == {("k_proj", d),
                                                                                     ("v_proj", d)}


def test_classifier_head_is_not_an_ffn() -> None:
    found = detect(FAMILIES["bert"]())
    assert all(g.consumer != "classifier" for g in found.ffn)
    assert any(r.layer == "classifier" and "head" in r.reason for r in found.rejected)


class SharedHidden(nn.Module):
    """fc1's activation feeds fc2 *and* a side branch: its channels are coupled to the side output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return x + self.fc2(h) + h.sum(-1, keepdim=True)


class Residual(nn.Module):
    """A plain (non-transformers) residual FFN: found without any config, from a given example input."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def test_shared_intermediate_is_rejected_with_reason() -> None:
    found = detect(SharedHidden(), torch.randn(2, 8))
    assert found.ffn == []
    assert any(r.layer == "fc2" and "also read outside" in r.reason for r in found.rejected)


def test_plain_module_swiglu() -> None:
    groups = find_ffn_groups(Residual(), torch.randn(2, 8))
    assert len(groups) == 1 and sorted(groups[0].producers) == ["gate", "up"] and groups[0].consumer == "down"
    assert groups[0].name == ""


class SharedBlock(nn.Module):
    """One FFN applied twice (ALBERT-style weight sharing): its channels cannot be cut for one use only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = x + self.fc2(torch.relu(self.fc1(x)))
        return x


def test_shared_layers_are_rejected() -> None:
    found = detect(SharedBlock(), torch.randn(2, 8))
    assert found.ffn == []
    assert {r.layer for r in found.rejected if "runs 2 times" in r.reason} == {"fc1", "fc2"}
