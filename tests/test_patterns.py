"""Patterns: block (NxM), N:M and channel structure on every weight layout, through the real engine.

Each property is checked on the *canonical* view of a weight, ``[out, in, *taps]`` built independently of
prunekit from what the module type means (Linear ``[out, in]``, Conv2d ``[out, in, kh, kw]`` in either memory
format, transformers' ``Conv1D`` ``[in, out]``, ConvTranspose2d ``[in, out, kh, kw]``), so a pattern that cut
the wrong axis would fail here.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import prunekit
from conftest import nonzero_weight_
from prunekit.config import PrunerConfig
from prunekit.errors import ConfigError, SelectionError
from prunekit.layouts import layout_of
from prunekit.patterns import parse_pattern
from prunekit.ranking import lowest

KINDS = ("linear", "conv2d", "conv2d_channels_last", "hf_conv1d", "conv_transpose2d")
HYP = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True, scope="module", params=["kernel", "eager"])
def _kernel_path(request):
    """Every pattern invariant is checked on both paths: the fused CPU kernels (when they build) and eager."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEKIT_CPU_KERNELS", "1" if request.param == "kernel" else "0")
        yield request.param


# ---- helpers ------------------------------------------------------------------------------------------
def build(kind: str, out: int, inn: int, k: int = 1) -> nn.Module:
    """A module of ``kind`` with ``out`` output and ``inn`` input channels (kernel k×k for convolutions)."""
    if kind == "linear":
        return nn.Linear(inn, out)
    if kind == "conv2d":
        return nn.Conv2d(inn, out, k)
    if kind == "conv2d_channels_last":
        return nn.Conv2d(inn, out, k).to(memory_format=torch.channels_last)
    if kind == "hf_conv1d":
        return Conv1D(out, inn)  # weight [in, out]
    if kind == "conv_transpose2d":
        return nn.ConvTranspose2d(inn, out, k)  # weight [in, out, kh, kw]
    raise AssertionError(kind)


def canonical(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (weight-shaped) as ``[out, in, *taps]``, from the module type alone (not prunekit's layouts)."""
    if isinstance(module, (Conv1D, nn.ConvTranspose2d)):
        return t.transpose(0, 1)
    return t


class Holder(nn.Module):
    """The layer under test, followed by an output head (so the layer itself is never the head)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(2, 2)


def prune_once(layer: nn.Module, pattern: str, target: float, **extra):
    """One-shot magnitude pruning of ``layer`` alone; returns (Pruning, weight before, weight after)."""
    nonzero_weight_(layer)
    before = layer.weight.detach().clone()
    pruning = prunekit.Pruning(Holder(layer), {"pruning_type": "magnitude", "pattern": pattern,
                                               "target_sparsity": target, "op_names": ["^layer$"],
                                               "pruning_scope": "local", **extra})
    pruning.on_train_begin()
    return pruning, before, layer.weight.detach().clone()


def block_status(after: torch.Tensor, before: torch.Tensor, rb: int, cb: int, per_tap: bool):
    """Per block of ``rb`` rows × ``cb`` columns (× all taps unless per_tap): (all zero, untouched, mean |w|)."""
    out, inn = after.shape[:2]
    taps = after.shape[2:]
    shape = (out // rb, rb, inn // cb, cb, *taps)
    dims = (1, 3) if per_tap else (1, 3, *range(4, 4 + len(taps)))
    a, b = after.reshape(shape), before.reshape(shape)
    return (a == 0).all(dim=dims), (a == b).all(dim=dims), b.abs().mean(dim=dims)


def assert_lowest_pruned(pruned: torch.Tensor, scores: torch.Tensor) -> None:
    """Every pruned unit scores no higher than every kept unit (small slack for summation order)."""
    if pruned.any() and (~pruned).any():
        hi, lo = scores[pruned].max(), scores[~pruned].min()
        assert hi <= lo * (1 + 1e-5) + 1e-12, f"a pruned unit ({hi}) outscores a kept one ({lo})"


def assert_near_count(count: int, exact: float) -> None:
    """Unit counts are the target quantised to the nearest unit."""
    assert abs(count - exact) <= 0.5 + 1e-9, (count, exact)


@st.composite
def block_case(draw):
    kind = draw(st.sampled_from(KINDS))
    rb, cb = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    out, inn = rb * draw(st.integers(1, 4)), cb * draw(st.integers(1, 4))
    k = draw(st.integers(1, 3)) if "conv" in kind else 1
    target = draw(st.floats(0.05, 0.95))
    return kind, rb, cb, out, inn, k, target


# ---- NxM blocks ---------------------------------------------------------------------------------------
@HYP
@given(block_case())
def test_nxm_blocks_are_all_zero_or_untouched(case):
    kind, rb, cb, out, inn, k, target = case
    layer = build(kind, out, inn, k)
    pruning, before, after = prune_once(layer, f"{rb}x{cb}", target)
    zero, kept, scores = block_status(canonical(layer, after), canonical(layer, before), rb, cb, per_tap=True)
    assert bool((zero | kept).all()), "a block is partly zeroed or its kept weights changed"
    assert_near_count(int(zero.sum()), target * zero.numel())
    assert_lowest_pruned(zero.reshape(-1), scores.reshape(-1))
    [pl] = pruning.layers
    zeros = int((after == 0).sum())
    assert pl.bound.pruned_units(pl.mask) == int(zero.sum())
    assert pl.zeros() == zeros
    assert pl.bound.element_sparsity(pl.mask) == pytest.approx(zeros / after.numel())
    assert pruning.current_sparsity() == pytest.approx(zeros / after.numel())
    if kind == "conv2d_channels_last":
        assert layer.weight.is_contiguous(memory_format=torch.channels_last), "masking changed the memory format"


@HYP
@given(st.sampled_from(KINDS), st.sampled_from(["channelx1", "channelx2", "1xchannel", "2xchannel"]),
       st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.floats(0.1, 0.9))
def test_channel_patterns_remove_whole_input_channels_or_filters(kind, pattern, a, b, k, target):
    n = 2 if "2" in pattern else 1
    out, inn = (2 * a, 2 * b)
    k = k if "conv" in kind else 1
    layer = build(kind, out, inn, k)
    pruning, before, after = prune_once(layer, pattern, target)
    c_after, c_before = canonical(layer, after), canonical(layer, before)
    if pattern.startswith("channel"):  # input channels: weight[:, c] entirely (every filter, every tap)
        zero, kept, scores = block_status(c_after, c_before, out, n, per_tap=False)
        dead = (c_after == 0).reshape(out, inn, -1).all(dim=2).all(dim=0)
        assert zero.reshape(-1).repeat_interleave(n).tolist() == dead.tolist()
    else:  # output channels / filters: weight[o] entirely
        zero, kept, scores = block_status(c_after, c_before, n, inn, per_tap=False)
        dead = (c_after == 0).reshape(out, -1).all(dim=1)
        assert zero.reshape(-1).repeat_interleave(n).tolist() == dead.tolist()
    assert bool((zero | kept).all())
    assert_near_count(int(zero.sum()), target * zero.numel())
    assert_lowest_pruned(zero.reshape(-1), scores.reshape(-1))
    [pl] = pruning.layers
    assert pl.zeros() == int((after == 0).sum())


def test_conv2d_channel_patterns_mean_real_channels():
    """The original's channelx1 / 1xchannel did not give removable channels on Conv2d; ours must."""
    conv = nn.Conv2d(8, 6, 3)
    _, _, w = prune_once(conv, "channelx1", 0.5)
    dead_in = [c for c in range(8) if bool((w[:, c] == 0).all())]
    assert len(dead_in) == 4
    assert all(bool((w[:, c] != 0).all()) for c in range(8) if c not in dead_in)
    conv = nn.Conv2d(8, 6, 3)
    _, _, w = prune_once(conv, "1xchannel", 0.5)
    dead_out = [o for o in range(6) if bool((w[o] == 0).all())]
    assert len(dead_out) == 3
    assert all(bool((w[o] != 0).all()) for o in range(6) if o not in dead_out)


def test_hf_conv1d_4x1_blocks_span_output_features():
    """Conv1D stores [in, out]: a 4x1 block is 4 *output* features (columns of the stored tensor)."""
    layer = Conv1D(8, 4)  # 4 inputs -> 8 outputs, weight [4, 8]
    _, _, w = prune_once(layer, "4x1", 0.5)
    blocks = (w == 0).reshape(4, 2, 4)  # [in, out-block, 4 outputs]
    assert bool((blocks.all(dim=2) | (~blocks).all(dim=2)).all())
    assert int(blocks.all(dim=2).sum()) == 4


def test_unstructured_1x1_prunes_exactly_the_smallest_weights():
    layer = nn.Linear(16, 8)
    _, before, after = prune_once(layer, "1x1", 0.3)
    zero = after == 0
    assert int(zero.sum()) == round(0.3 * 128)
    assert_lowest_pruned(zero.reshape(-1), before.abs().reshape(-1))


# ---- N:M ----------------------------------------------------------------------------------------------
@st.composite
def nm_case(draw):
    kind = draw(st.sampled_from(KINDS))
    m = draw(st.sampled_from([2, 4, 8, 16, 32]))
    n = draw(st.integers(1, m - 1))
    out, inn = draw(st.integers(1, 4)), m * draw(st.integers(1, 3))
    k = draw(st.integers(1, 2)) if "conv" in kind else 1
    target = draw(st.floats(0.02, 1.0)) * n / m
    return kind, n, m, out, inn, k, target


def nm_groups(module: nn.Module, t: torch.Tensor, m: int) -> torch.Tensor:
    """``[out, in // m, m, *taps]`` with the M consecutive inputs of a group on dim 2."""
    c = canonical(module, t)
    return c.reshape(c.shape[0], c.shape[1] // m, m, *c.shape[2:])


@HYP
@given(nm_case())
def test_nm_every_group_has_exactly_n_zeros_or_none(case):
    kind, n, m, out, inn, k, target = case
    layer = build(kind, out, inn, k)
    pruning, before, after = prune_once(layer, f"{n}:{m}", target)
    g_after, g_before = nm_groups(layer, after, m), nm_groups(layer, before, m)
    zeros = (g_after == 0).sum(dim=2)
    assert set(zeros.unique().tolist()) <= {0, n}, "a group has neither 0 nor exactly N zeros"
    kept = (g_after == g_before) | (g_after == 0)
    assert bool(kept.all()), "a kept weight changed"
    sparse = zeros == n
    assert_near_count(int(sparse.sum()), min(1.0, target / (n / m)) * sparse.numel())
    # within each sparse group the N smallest |w| go; groups are ranked by the mean of their N smallest
    mag = g_before.abs()
    pruned_mag = torch.where(g_after == 0, mag, torch.zeros_like(mag)).amax(dim=2)
    kept_mag = torch.where(g_after != 0, mag, torch.full_like(mag, math.inf)).amin(dim=2)
    assert bool((pruned_mag[sparse] <= kept_mag[sparse]).all())
    group_score = mag.sort(dim=2).values[:, :, :n].mean(dim=2)
    assert_lowest_pruned(sparse.reshape(-1), group_score.reshape(-1))
    [pl] = pruning.layers
    assert pl.bound.pruned_units(pl.mask) == int(sparse.sum())
    assert pl.zeros() == int((after == 0).sum())
    assert pl.bound.element_sparsity(pl.mask) == pytest.approx(int((after == 0).sum()) / after.numel())


@HYP
@given(st.sampled_from(KINDS), st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]),
       st.integers(1, 3), st.booleans(), st.sampled_from([0.5, 1.0]))
def test_nm_with_all_scores_tied_still_has_exactly_n_zeros(kind, nm, a, random_signs, fraction):
    """All-equal magnitudes: the original's ``<=`` k-th value pruned more than N per group; ours may not."""
    n, m = nm
    layer = build(kind, 2 * a, 2 * m, 2 if "conv" in kind else 1)
    with torch.no_grad():
        w = torch.ones_like(layer.weight)
        if random_signs:
            w = torch.where(torch.rand_like(w) < 0.5, -w, w)
        layer.weight.copy_(w)
    pruning = prunekit.Pruning(Holder(layer), {"pruning_type": "magnitude", "pattern": f"{n}:{m}",
                                               "target_sparsity": fraction * n / m, "op_names": ["^layer$"]})
    pruning.on_train_begin()
    zeros = (nm_groups(layer, layer.weight.detach(), m) == 0).sum(dim=2)
    assert set(zeros.unique().tolist()) <= {0, n}
    assert_near_count(int((zeros == n).sum()), fraction * zeros.numel())


@HYP
@given(st.sampled_from([(1, 4), (2, 4), (3, 4), (1, 8), (3, 8), (5, 8), (2, 32), (20, 32)]),
       st.integers(1, 6), st.data())
def test_nm_mask_from_any_unit_choice_and_tied_scores(nm, rows, data):
    """Pattern level: whatever groups are chosen and however tied the scores, N zeros in each chosen group."""
    n, m = nm
    layer = nn.Linear(2 * m, rows)
    bound = parse_pattern(f"{n}:{m}").bind(layer.weight.shape, layout_of(layer))
    levels = data.draw(st.integers(1, 3))
    scores = torch.randint(0, levels, layer.weight.shape).float()  # heavy ties
    pruned = torch.rand(bound.num_units) < data.draw(st.floats(0.0, 1.0))
    mask = bound.mask_from_pruned_units(pruned, scores)
    zeros = (~mask).reshape(rows, 2, m).sum(dim=2).reshape(-1)
    assert zeros.tolist() == [n if p else 0 for p in pruned.tolist()]
    assert bound.pruned_units(mask) == int(pruned.sum())
    # ties go to the lower index: among equal scores the earlier inputs are zeroed first
    if levels == 1:
        first = (~mask).reshape(rows, 2, m)[..., :n]
        assert bool(first.all(dim=-1)[pruned.reshape(rows, 2)].all())


def test_partial_nm_below_n_over_m():
    """2:4 at 0.3: 60 % of the groups are 2-of-4 sparse, the other 40 % dense."""
    layer = nn.Linear(40, 10)
    _, _, w = prune_once(layer, "2:4", 0.3)
    zeros = (w.reshape(10, 10, 4) == 0).sum(dim=2)
    assert set(zeros.unique().tolist()) == {0, 2}
    assert int((zeros == 2).sum()) == 60
    assert int((w == 0).sum()) / w.numel() == pytest.approx(0.3)


@HYP
@given(st.sampled_from([(1, 4), (2, 4), (3, 4), (1, 8), (4, 8), (1, 2)]), st.floats(0.0, 1.0))
def test_target_above_n_over_m_is_a_config_error(nm, frac):
    n, m = nm
    target = n / m + (0.99 - n / m) * frac + 1e-6
    assume(n / m < target < 1.0)
    with pytest.raises(ConfigError) as info:
        PrunerConfig(pattern=f"{n}:{m}", target_sparsity=target)
    assert info.value.key == "target_sparsity"
    model = Holder(nn.Linear(8, 8))
    with pytest.raises(ConfigError):
        prunekit.Pruning(model, {"pattern": f"{n}:{m}", "target_sparsity": target})
    assert not [b for b, _ in model.named_buffers()], "a rejected config must not touch the model"


@pytest.mark.parametrize("spec", ["0x4", "4x0", "4:4", "5:4", "0:4", "4x", "x4", "block", "4*1", ""])
def test_bad_pattern_strings_are_config_errors(spec):
    with pytest.raises(ConfigError) as info:
        parse_pattern(spec)
    assert info.value.key == "pattern"


def test_original_prefixes_are_ignored():
    assert parse_pattern("tile_pattern_4x1").spec == parse_pattern("4x1").spec == "4x1"
    assert parse_pattern("tile_pattern_2:4").max_sparsity == 0.5


# ---- pattern-level: apply_ / expand / counts agree -----------------------------------------------------
@HYP
@given(st.sampled_from(KINDS), st.sampled_from(["4x1", "1x4", "2x2", "channelx1", "2xchannel", "2:4", "1:4"]),
       st.integers(1, 3), st.integers(1, 3), st.data())
def test_apply_expand_and_counts_agree(kind, spec, a, b, data):
    layer = build(kind, 4 * a, 4 * b, 2 if "conv" in kind else 1)
    bound = parse_pattern(spec).bind(layer.weight.shape, layout_of(layer))
    assert not isinstance(bound, str)
    scores = torch.rand(bound.score_shape)
    k = data.draw(st.integers(0, bound.num_units))
    pruned = lowest(lambda: bound.unit_scores(scores), k, bound.num_units)
    mask = bound.mask_from_pruned_units(pruned, scores)
    ones = torch.ones_like(layer.weight)  # same memory format as the weight
    bound.apply_(ones, mask)
    assert torch.equal(ones != 0, bound.expand(mask).reshape(ones.shape))
    assert bound.pruned_units(mask) == k
    assert int((ones == 0).sum()) == k * bound.unit_zeros
    assert bound.element_sparsity(mask) == pytest.approx(k * bound.unit_zeros / ones.numel())


# ---- shapes a pattern cannot tile ----------------------------------------------------------------------
def feed(layer: nn.Module) -> torch.Tensor:
    """A small input batch for ``layer``."""
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 5, 5)
    return torch.randn(2, layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.in_features)


class TwoLayers(nn.Module):
    def __init__(self, good: nn.Module, bad: nn.Module) -> None:
        super().__init__()
        self.good, self.bad, self.head = good, bad, nn.Linear(2, 2)


@pytest.mark.parametrize("pattern, good, bad", [
    ("4x1", nn.Linear(8, 8), nn.Linear(8, 6)),          # 6 output rows
    ("1x4", nn.Linear(8, 8), nn.Linear(6, 8)),          # 6 input columns
    ("2:4", nn.Linear(8, 8), nn.Linear(10, 8)),         # 10 inputs, groups of 4
    ("4x1", nn.Conv2d(4, 8, 3), nn.Conv2d(4, 6, 3)),
    ("2:4", Conv1D(8, 8), Conv1D(8, 6)),                # Conv1D(nf=out, nx=in): 6 inputs
])
@pytest.mark.parametrize("criterion", ["magnitude", "snip_momentum"])
def test_untileable_layer_is_left_dense_with_warning_and_reported(pattern, good, bad, criterion):
    """The original crashed (ZeroDivisionError / reshape error) on such layers."""
    model = TwoLayers(good, bad)
    nonzero_weight_(good)
    nonzero_weight_(bad)
    bad_before = bad.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.warns(UserWarning, match=r"bad left dense"):
        pruning = prunekit.prepare_pruning(model, {"pruning_type": criterion, "pattern": pattern,
                                                   "target_sparsity": 0.5, "op_names": ["good", "bad"],
                                                   "start_step": 1, "end_step": 3}, opt)
    assert [l.name for l in pruning.layers] == ["good"]
    for _ in range(4):
        loss = model.good(feed(good)).sum() + model.bad(feed(bad)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(bad.weight, bad_before), "the untileable layer must stay dense"
    assert not hasattr(bad, "weight_prune_mask")
    assert pruning.current_sparsity() == pytest.approx(0.5)
    report = prunekit.sparsity_report(model, pruning)
    rows = {r.name: r for r in report.layers}
    assert rows["bad"].status != "pruned" and "divisible" in rows["bad"].status
    assert rows["bad"].element_sparsity == 0.0 and rows["bad"].block_sparsity is None
    assert rows["good"].status == "pruned"
    assert "bad" in report.table() and "divisible" in report.table()


def test_selection_of_only_untileable_layers_is_a_clear_error():
    model = TwoLayers(nn.Linear(8, 6), nn.Linear(8, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SelectionError, match="divisible"):
            prunekit.Pruning(model, {"pattern": "4x1", "op_names": ["good", "bad"]})


# ---- a channels_last CNN trained with a gradient criterion ---------------------------------------------------
class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("pattern, target", [("4x1", 0.75), ("channelx1", 0.5), ("1xchannel", 0.5), ("2:4", 0.5)])
def test_channels_last_cnn_trained_with_snip_momentum(pattern, target):
    model = CNN().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruning = prunekit.prepare_pruning(model, {"pattern": pattern, "target_sparsity": target, "start_step": 1,
                                               "end_step": 5, "pruning_scope": "local"}, opt)
    gen = torch.Generator().manual_seed(3)
    for _ in range(7):
        x = torch.randn(4, 4, 6, 6, generator=gen).to(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (4,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert [l.name for l in pruning.layers] == ["c1", "c2"]
    for conv in (model.c1, model.c2):
        w = conv.weight.detach()
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        out, inn = w.shape[:2]
        zero = w == 0
        if pattern == "channelx1":
            dead = zero.reshape(out, inn, -1).all(dim=2).all(dim=0)
            assert int(dead.sum()) == inn // 2 and int(zero.sum()) == int(dead.sum()) * out * 9
        elif pattern == "1xchannel":
            dead = zero.reshape(out, -1).all(dim=1)
            assert int(dead.sum()) == out // 2 and int(zero.sum()) == int(dead.sum()) * inn * 9
        elif pattern == "2:4":
            assert bool((zero.reshape(out, inn // 4, 4, 3, 3).sum(dim=2) == 2).all())
        else:
            blocks = zero.reshape(out // 4, 4, inn, 3, 3)
            assert bool((blocks.all(dim=1) | (~blocks).all(dim=1)).all())
            assert int(blocks.all(dim=1).sum()) == round(0.75 * blocks.all(dim=1).numel())
