"""Grouped-query attention: only legal shapes (every kv head keeps the same number of query heads)."""
from __future__ import annotations

import pytest
import torch
import transformers

from prunekit.errors import SlimmingError
from prunekit.slimming import detect, slim
from test_slim_fixtures import inputs_for, outputs, zero_heads


def _llama(heads: int = 8, kv: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=heads,
                                      num_key_value_heads=kv, intermediate_size=48, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _slim_with_zero_heads(heads: list[int], **kw):
    model = _llama()
    x = inputs_for("llama")
    zero_heads(model, detect(model).attention[0], heads)
    expected = outputs(model, x)
    report = slim(model, **kw)
    assert torch.allclose(outputs(model, x), expected, atol=1e-5)
    return model, report


def test_whole_kv_group_goes_with_its_query_heads() -> None:
    model, report = _slim_with_zero_heads([2, 3, 6, 7])          # kv heads 1 and 3 lose every query head
    change = report.attention[0]
    assert change.removed_heads == [2, 3, 6, 7] and change.removed_kv_heads == [1, 3]
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 8 and attn.q_proj.out_features == 4 * 8
    assert attn.num_key_value_groups == 2 and model.config.num_key_value_heads == 2


def test_query_heads_within_groups_shrink_evenly() -> None:
    model, report = _slim_with_zero_heads([1, 2, 4, 7])          # one zero head in every kv group
    change = report.attention[0]
    assert change.heads_after == 4 and change.kv_heads_after == 4 and change.removed_kv_heads == []
    assert model.model.layers[0].self_attn.num_key_value_groups == 1


def test_uneven_zero_heads_keep_shapes_legal_and_report_the_rest() -> None:
    # kv0: heads 0,1 both zero (whole group goes); kv1: head 2 zero; kv2: heads 4; kv3: none -> r = 0.
    model, report = _slim_with_zero_heads([0, 1, 2, 4])
    change = report.attention[0]
    assert change.removed_heads == [0, 1] and change.kv_heads_after == 3 and change.heads_after == 6
    left = [s for s in report.not_cut if s.kind == "attention"]
    assert sorted(i for s in left for i in s.indices) == [2, 4]
    assert all("grouped-query" in s.reason for s in left)
    attn = model.model.layers[0].self_attn
    assert attn.num_key_value_groups == 2 and attn.q_proj.out_features == 6 * 8


def test_removing_every_head_is_refused_unless_allowed() -> None:
    model = _llama()
    zero_heads(model, detect(model).attention[0], list(range(8)))
    before = model.model.layers[0].self_attn.q_proj.weight.shape
    with pytest.raises(SlimmingError, match="all 8 heads are zero"):
        slim(model)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == before  # nothing touched on error
    model, report = _slim_with_zero_heads(list(range(8)), allow_empty_layers=True)
    assert report.attention[0].heads_after == 1 and report.attention[0].kv_heads_after == 1
    assert any("cannot run with no head" in s.reason for s in report.not_cut)


def test_multi_query_attention() -> None:
    model = _llama(heads=4, kv=1)
    x = inputs_for("llama")
    zero_heads(model, detect(model).attention[0], [0, 3])
    expected = outputs(model, x)
    report = slim(model)
    assert report.attention[0].heads_after == 2 and report.attention[0].kv_heads_after == 1
    assert torch.allclose(outputs(model, x), expected, atol=1e-5)
