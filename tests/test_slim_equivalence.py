"""Slimming keeps outputs (with padding / attention masks) and updates modules and configs."""
from __future__ import annotations

import pytest
import torch

from prunekit.slimming import detect, slim
from test_slim_fixtures import FAMILIES, FFN, HEADS, HIDDEN, inputs_for, outputs, zero_channels, zero_heads

ATOL = 1e-5


def _prune(model, ffn_channels, heads, producers=False):
    found = detect(model)
    for group, channels in zip(found.ffn, ffn_channels):
        zero_channels(model, group, channels, producers=producers)
    for group, hs in zip(found.attention, heads):
        zero_heads(model, group, hs)
    return found


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_outputs_equal_after_slim(family: str, attn: str) -> None:
    model = FAMILIES[family]()
    model.config._attn_implementation = attn
    x = inputs_for(family)
    # Layer 0: a third of the FFN channels and one head (or a whole kv group for GQA); layer 1: half and two.
    heads = [[2, 3], [0, 1]] if family == "llama" else [[1], [0, 2]]
    _prune(model, [list(range(0, FFN, 3)), list(range(FFN // 2))], heads, producers=family == "bert")
    expected = outputs(model, x)
    report = slim(model)
    assert torch.allclose(outputs(model, x), expected, atol=ATOL)
    assert [f.width_after for f in report.ffn] == [FFN - FFN // 3, FFN // 2]
    assert [a.heads_after for a in report.attention] == ([2, 2] if family == "llama" else [3, 2])
    assert report.params_after < report.params_before
    assert not [s for s in report.not_cut if s.kind != "layer"]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit", "distilbert"])
def test_modules_and_config_follow_the_new_shapes(family: str) -> None:
    model = FAMILIES[family]()
    heads = [[0, 1], [0, 1]]  # uniform: every layer keeps 2 heads (Llama: 1 kv head with 2 query heads)
    _prune(model, [list(range(16)), list(range(16))], heads)
    slim(model)
    cfg = model.config
    assert cfg.num_attention_heads == 2
    ffn_field = {"distilbert": "hidden_dim", "gpt2": "n_inner"}.get(family, "intermediate_size")
    assert getattr(cfg, ffn_field) == FFN - 16
    record = cfg.prunekit_slimming
    assert record["original"][ffn_field] == FFN and record["original"]["num_attention_heads"] == HEADS
    assert [a["kept_heads"] for a in record["attention"]] == ([[2, 3]] * 2)
    att = detect(model).attention[0]  # re-detection from the new dataflow agrees
    assert att.num_heads == 2 and att.head_dim == HIDDEN // HEADS
    module = model.get_submodule(att.name)
    if family == "gpt2":
        assert module.split_size == 2 * HIDDEN // HEADS and module.num_heads == 2
    if family == "llama":
        assert cfg.num_key_value_heads == 1 and module.num_key_value_groups == 2 and cfg.head_dim == 8
    if family == "bert":
        self_attn = module.self
        assert self_attn.num_attention_heads == 2 and self_attn.all_head_size == 16


def test_non_uniform_layers_keep_scalar_config_and_record_per_layer() -> None:
    model = FAMILIES["bert"]()
    _prune(model, [list(range(8)), list(range(24))], [[0], [0, 1, 2]])
    slim(model)
    assert model.config.intermediate_size == FFN and model.config.num_attention_heads == HEADS
    record = model.config.prunekit_slimming
    assert [f["width"] for f in record["ffn"]] == [FFN - 8, FFN - 24]
    assert [a["num_heads"] for a in record["attention"]] == [3, 1]


def test_slimming_twice_composes_original_head_indices() -> None:
    model = FAMILIES["bert"]()
    x = inputs_for("bert")
    found = _prune(model, [[], []], [[1], []])
    slim(model)
    att = detect(model).attention[0]
    zero_heads(model, att, [2])  # original head 3
    expected = outputs(model, x)
    slim(model)
    assert torch.allclose(outputs(model, x), expected, atol=ATOL)
    assert model.config.prunekit_slimming["attention"][0]["kept_heads"] == [0, 2]
    assert found.attention[0].num_heads == HEADS


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_with_kv_cache_after_slim(family: str) -> None:
    model = FAMILIES[family]()
    heads = [[2, 3], [0, 1]] if family == "llama" else [[1], [0, 2]]
    _prune(model, [list(range(10)), list(range(20))], heads)
    prompt = inputs_for(family)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(**prompt, **kwargs)
    slim(model)
    assert torch.equal(model.generate(**prompt, **kwargs), expected)


def test_only_consumer_columns_need_be_zero() -> None:
    """channelx1 masks the second linear only; the producers' rows are removed all the same."""
    model = FAMILIES["llama"]()
    x = inputs_for("llama")
    _prune(model, [[0, 5, 7], []], [[], []])
    expected = outputs(model, x)
    report = slim(model)
    assert report.ffn[0].removed == [0, 5, 7]
    assert model.model.layers[0].mlp.gate_proj.out_features == FFN - 3
    assert model.model.layers[0].mlp.up_proj.weight.shape == (FFN - 3, HIDDEN)
    assert torch.allclose(outputs(model, x), expected, atol=ATOL)


class KVFused(torch.nn.Module):
    """Not from transformers: q on its own, k and v fused in one layer and split, SDPA, residual."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.kv, self.o = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(dim, dim)
        self.head_dim = dim // heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, t, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        k, v = self.kv(x).split(self.kv.out_features // 2, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(heads(self.q(x)), heads(k), heads(v))
        return x + self.o(a.transpose(1, 2).reshape(b, t, -1))


def test_partially_fused_attention_in_a_plain_module() -> None:
    model, x = KVFused(), torch.randn(2, 5, 32)
    group = detect(model, x).attention[0]
    assert (group.q, group.k, group.v, group.o, group.fused_qkv) == ("q", "kv", "kv", "o", False)
    assert (group.k_offset, group.v_offset, group.num_heads) == (0, 32, 4)
    zero_heads(model, group, [1, 2])
    expected = model(x)
    slim(model, example_inputs=x)
    assert torch.allclose(model(x), expected, atol=ATOL)
    after = detect(model, x).attention[0]
    assert (after.num_heads, after.k_offset, after.v_offset) == (2, 0, 16)
    assert model.kv.out_features == 32
