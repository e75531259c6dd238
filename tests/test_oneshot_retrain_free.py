"""Retrain-free channel pruning: Fisher scores, exact channel counts, rearrangement, prepare_pruning, slim."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.compat import WeightPruningConfig, prepare_pruning
from prunekit.errors import ConfigError
from prunekit.masks import mask_buffer_name
from prunekit.oneshot.retrain_free import RetrainFreeResult, rearrange, retrain_free_prune
from prunekit.slimming import slim
from tests.llm_fixtures import tiny_llm


def lm_batches(n: int = 4, seq: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def config(pattern: str = "channelx1", target: float = 0.25, ops=("mlp.down_proj",), **kw):
    return WeightPruningConfig(pruning_type="retrain_free", pattern=pattern, target_sparsity=target,
                               op_names=list(ops), **kw)


def test_channelx1_on_llama_down_proj_exact_then_slim_removes_the_channels():
    model = tiny_llm("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = retrain_free_prune(model, lm_batches(), config(target=0.25), progress=False)
    assert isinstance(result, RetrainFreeResult) and result.batches == 4
    total_pruned = 0
    for layer in model.model.layers:
        down = layer.mlp.down_proj
        zero_cols = (down.weight == 0).all(dim=0)
        mask = getattr(down, mask_buffer_name("weight")).reshape(-1)
        assert torch.equal(~mask, zero_cols)                     # prunekit mask == the zeroed columns
        total_pruned += int(zero_cols.sum())
    assert total_pruned == round(0.25 * 2 * 96)                 # global threshold, exact channel count
    # nothing but the pruned columns changed, and no parameter kept requires_grad changes or grads
    for name, value in model.state_dict().items():
        if "down_proj" not in name:
            assert torch.equal(value, before[name]), name
    assert all(p.grad is None and p.requires_grad for p in model.parameters())

    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = model(x).logits
    result.detach(remove_masks=True)
    report = slim(model, method="structure")          # module-structure rules: no trace, fast
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert sum(96 - w for w in widths) == total_pruned
    assert all(layer.mlp.gate_proj.out_features == layer.mlp.down_proj.in_features for layer in model.model.layers)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, expected, atol=1e-4)
    assert report.params_after < report.params_before


def test_1xchannel_output_channels_do_not_crash_and_are_exact():
    model = tiny_llm("llama", layers=2)
    result = retrain_free_prune(model, lm_batches(2), config("1xchannel", 0.2, ("mlp.up_proj",)),
                                progress=False)
    pruned = sum(int((layer.mlp.up_proj.weight == 0).all(dim=1).sum()) for layer in model.model.layers)
    assert pruned == round(0.2 * 2 * 96)
    assert sum(len(v) for v in result.pruned_units.values()) == pruned


def test_local_scope_prunes_each_layer_exactly_and_gpt2_conv1d_works():
    model = tiny_llm("gpt2", layers=2)
    result = retrain_free_prune(model, lm_batches(2), config(target=0.3, ops=("mlp.c_proj",),
                                                             pruning_scope="local"), progress=False)
    for block in model.transformer.h:
        w = block.mlp.c_proj.weight                             # Conv1D: [in=256, out=64]
        assert int((w == 0).all(dim=1).sum()) == round(0.3 * 256)
    assert set(result.fisher) == {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}


def test_fisher_is_the_sum_of_squared_mask_gradients():
    # one linear, two batches: the mask gradient of input channel c is Σ_i W_ic G_ic
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    model = torch.nn.Sequential(lin)
    data = [(torch.randn(4, 6), torch.randn(4, 3)) for _ in range(2)]
    loss_func = torch.nn.functional.mse_loss
    expected = torch.zeros(6)
    for x, y in data:
        lin.zero_grad()
        loss_func(model(x), y).backward()
        expected += (lin.weight * lin.weight.grad).sum(0).detach() ** 2
    lin.zero_grad()
    lin.weight.grad = None
    result = retrain_free_prune(model, data, config(target=0.5, ops=("0",)), loss_func=loss_func, progress=False)
    assert torch.allclose(result.fisher["0"], expected, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 12), st.integers(0, 12), st.integers(0, 1000))
def test_rearrangement_keeps_the_count_and_never_beats_brute_force(batches, units, p, seed):
    p = min(p, units)
    g = torch.randn(batches, units, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fisher = g.square().sum(0)
    chosen = rearrange(g, fisher, p)
    assert chosen.numel() == p == len(set(chosen.tolist()))

    def cost(idx):
        return float(g[:, list(idx)].sum(1).square().sum()) if idx else 0.0

    lowest = fisher.argsort()[:p].tolist()
    assert cost(chosen.tolist()) <= cost(lowest) + 1e-9         # greedy swaps only ever lower the cost
    if units <= 8:
        best = min(cost(c) for c in itertools.combinations(range(units), p))
        assert cost(chosen.tolist()) >= best - 1e-9


def test_prepare_pruning_dispatches_retrain_free_with_the_dataloader():
    model = tiny_llm("llama", layers=2)
    result = prepare_pruning(model, config(target=0.5), dataloader=lm_batches(2))
    assert isinstance(result, RetrainFreeResult)
    assert sum(int((layer.mlp.down_proj.weight == 0).all(0).sum()) for layer in model.model.layers) == 96


def test_bad_inputs_fail_before_any_work():
    model = tiny_llm("llama", layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="pattern: got '4x1'"):
        retrain_free_prune(model, lm_batches(1), config("4x1"))
    with pytest.raises(ConfigError, match="pattern: got '2:4'"):
        retrain_free_prune(model, lm_batches(1), config("2:4", 0.5))
    with pytest.raises(ConfigError, match="dataloader: got None"):
        prepare_pruning(model, config())
    with pytest.raises(ConfigError, match="loss_func: got None"):
        retrain_free_prune(model, [(torch.randint(0, 128, (1, 8)), None)], config(), progress=False)
    with pytest.raises(ConfigError, match="dataloader: got 'empty'"):
        retrain_free_prune(model, [], config(), progress=False)
    with pytest.raises(ConfigError, match="pruning_type: got 'magnitude'"):
        retrain_free_prune(model, lm_batches(1), WeightPruningConfig(pruning_type="magnitude", pattern="channelx1"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
