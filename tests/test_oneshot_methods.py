"""One-shot methods on one layer: exact counts for every shape, reconstruction quality, robustness, DSnoT."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.errors import ConfigError
from prunekit.oneshot.methods import METHODS, MethodOptions, dsnot_refine
from prunekit.oneshot.methods.dsnot import reconstruction_shift
from prunekit.oneshot.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from prunekit.oneshot.methods.wanda import keep_cumulative_variant
from prunekit.oneshot.stats import InputStats
from prunekit.patterns import parse_pattern

ALL_STATS = ("hessian", "sq_norm", "mean", "var")


def layer(out: int, inn: int, tokens: int = 256, seed: int = 0, correlated: bool = True):
    """A random weight and the statistics of correlated, non-centred inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inn, generator=g)
    if correlated:
        x = x @ (torch.randn(inn, inn, generator=g) / math.sqrt(inn)) + 0.5 * torch.randn(inn, generator=g)
    w = torch.randn(out, inn, generator=g)
    stats = InputStats(inn, ALL_STATS)
    stats.add(x)
    return w, x, stats


def recon_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.t() - x @ w_hat.t()) ** 2).sum())


METHOD_VARIANTS = [("magnitude", {}), ("magnitude", {"dsnot": True}), ("wanda", {}), ("wanda", {"dsnot": True}),
                   ("wanda", {"use_variant": True}), ("sparsegpt", {}), ("sparsegpt", {"block_size": 3})]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(METHOD_VARIANTS), st.integers(1, 9), st.integers(1, 40), st.floats(0.0, 0.95),
       st.integers(0, 10_000))
def test_unstructured_count_is_exact(variant, out, inn, sparsity, seed):
    name, opts = variant
    w, _, stats = layer(out, inn, tokens=64, seed=seed)
    new, keep = METHODS.get(name).prune(w, stats, sparsity, parse_pattern("1x1"), MethodOptions(**opts))
    assert keep.shape == w.shape and keep.dtype == torch.bool
    assert int((~keep).sum()) == round(sparsity * w.numel())
    assert torch.all(new[~keep] == 0)
    assert torch.isfinite(new).all()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(METHOD_VARIANTS), st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]),
       st.integers(1, 7), st.integers(1, 6), st.integers(0, 10_000))
def test_nm_every_group_has_exactly_n_zeros(variant, nm, out, groups, seed):
    name, opts = variant
    n, m = nm
    w, _, stats = layer(out, groups * m, tokens=64, seed=seed)
    new, keep = METHODS.get(name).prune(w, stats, n / m, parse_pattern(f"{n}:{m}"), MethodOptions(**opts))
    pruned_per_group = (~keep).reshape(out, groups, m).sum(-1)
    assert torch.all(pruned_per_group == n)
    assert torch.all(new[~keep] == 0)


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    # two column blocks of 128, so later blocks choose their mask after the earlier blocks' updates
    w, x, stats = layer(32, 256, tokens=1024, seed=3)
    for spec, sparsity in (("1x1", 0.5), ("2:4", 0.5), ("1x1", 0.7)):
        pattern = parse_pattern(spec)
        errors = {}
        for name in ("magnitude", "wanda", "sparsegpt"):
            new, keep = METHODS.get(name).prune(w, stats, sparsity, pattern, MethodOptions())
            assert int((~keep).sum()) == round(sparsity * w.numel())
            errors[name] = recon_error(w, new, x)
        assert errors["sparsegpt"] < 0.85 * min(errors["magnitude"], errors["wanda"]), (spec, errors)


def test_sparsegpt_without_pruning_keeps_the_weight():
    w, _, stats = layer(8, 16, seed=1)
    new, keep = sparsegpt_prune(w, stats.hessian, 0.0, parse_pattern("1x1"))
    assert keep.all() and torch.allclose(new, w, atol=1e-4)


def test_sparsegpt_dead_inputs_and_rank_deficient_hessian_stay_finite():
    # 8 tokens for 32 inputs (rank <= 8) and 5 inputs that never fire
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=g)
    x[:, [0, 3, 7, 8, 31]] = 0
    stats = InputStats(32, ("hessian",))
    stats.add(x)
    w = torch.randn(16, 32, generator=g)
    for spec in ("1x1", "2:4"):
        for damp in (0.01, 0.0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # dampening 0 is retried with a warning
                new, keep = METHODS.get("sparsegpt").prune(w, stats, 0.5, parse_pattern(spec),
                                                           MethodOptions(dampening=damp))
            assert torch.isfinite(new).all(), (spec, damp)
            assert torch.all(new[:, [0, 3, 7, 8, 31]] == 0)   # dead inputs' weights are dropped
            assert int((~keep).sum()) == 16 * 16


def test_sparsegpt_retries_dampening_with_one_warning():
    import prunekit.oneshot.methods.sparsegpt as sg

    # rank one and, as float error leaves it, slightly indefinite: no factor without more dampening
    v = torch.tensor([1e3, 1.0, 2.0, 1e-2, 5.0, 1.0])
    h = torch.outer(v, v) - 1e-3 * torch.eye(6)
    sg._warned_damping = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factor = inverse_hessian_factor(h, 0.0)
        inverse_hessian_factor(h, 0.0)
    assert torch.isfinite(factor).all()
    assert sum("dampening" in str(c.message) for c in caught) == 1
    with pytest.raises(ValueError, match="NaN or inf"):
        inverse_hessian_factor(torch.full((3, 3), float("nan")), 0.01)


def test_sparsegpt_rejects_dsnot_and_bad_options():
    method = METHODS.get("sparsegpt")
    with pytest.raises(ConfigError, match="dsnot: got True"):
        method.check_options(MethodOptions(dsnot=True))
    with pytest.raises(ConfigError, match="block_size"):
        method.check_options(MethodOptions(block_size=0))
    with pytest.raises(ConfigError, match="pattern: got '2:4'"):
        w, _, stats = layer(4, 6)
        method.prune(w, stats, 0.5, parse_pattern("2:4"), MethodOptions())
    with pytest.raises(ConfigError, match="pattern: got '4x1'"):
        method.check_pattern(parse_pattern("4x1"))
    for name in ("wanda", "magnitude"):
        with pytest.raises(ConfigError, match="M dividing the layer's 6 inputs"):
            METHODS.get(name).prune(w, stats, 0.5, parse_pattern("2:4"), MethodOptions())


def test_stat_kinds_follow_options():
    assert METHODS.get("sparsegpt").stat_kinds(MethodOptions()) == ("hessian",)
    assert METHODS.get("wanda").stat_kinds(MethodOptions()) == ("sq_norm",)
    assert set(METHODS.get("wanda").stat_kinds(MethodOptions(dsnot=True))) == {"sq_norm", "mean", "var"}
    assert METHODS.get("magnitude").stat_kinds(MethodOptions()) == ()


def test_wanda_matches_the_formula_on_a_hand_case():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    stats = InputStats(4, ("sq_norm",))
    stats.add(torch.tensor([[2.0, 1.0, 0.0, 4.0], [2.0, 1.0, 1.0, 4.0]]))
    # sq_norm = [4, 1, 0.5, 16] -> norms [2, 1, .707, 4]; scores row0 [2, 2, 2.12, 2], row1 [8, 1, .707, 8]
    new, keep = METHODS.get("wanda").prune(w, stats, 0.5, parse_pattern("1x1"), MethodOptions())
    assert keep.tolist() == [[False, False, True, True], [True, False, False, True]]
    assert torch.equal(new, w * keep)
    # 1:2: row0 groups (2, 2) -> first of the tie, (2.12, 2) -> last; row1 (8, 1) -> second, (.707, 8) -> first
    _, keep = METHODS.get("wanda").prune(w, stats, 0.5, parse_pattern("1:2"), MethodOptions())
    assert keep.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_wanda_variant_is_the_threshold_the_bisection_converges_to():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(20, 50, generator=g) ** 3
    keep = keep_cumulative_variant(scores, 0.4)
    assert int((~keep).sum()) == 400
    # one alpha separates them: every pruned entry's normalised cumulative sum <= every kept one's
    s, order = scores.sort(dim=1)
    frac = s.double().cumsum(1) / s.double().sum(1, keepdim=True)
    pruned_sorted = ~keep.gather(1, order)
    assert float(frac[pruned_sorted].max()) <= float(frac[~pruned_sorted].min())
    # and rows prune different counts (it is not the per-row rule)
    assert len(set((~keep).sum(1).tolist())) > 1


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["1x1", "2:4", "1:4", "4:8"]), st.integers(1, 8), st.integers(1, 6),
       st.integers(0, 10_000), st.integers(0, 30))
def test_dsnot_never_increases_its_error_and_keeps_the_counts(spec, out, groups, seed, cycles):
    pattern = parse_pattern(spec)
    m = getattr(pattern, "m", 8)
    w, _, stats = layer(out, groups * m, tokens=64, seed=seed)
    opts = MethodOptions(dsnot_cycles=cycles, dsnot_threshold=0.0)
    _, keep0 = METHODS.get("wanda").prune(w, stats, 0.5, pattern, MethodOptions())
    keep = dsnot_refine(w, keep0, stats, pattern, opts)
    before = reconstruction_shift(w, keep0, stats.mean).abs()
    after = reconstruction_shift(w, keep, stats.mean).abs()
    assert torch.all(after <= before + 1e-5)
    assert torch.equal(keep.sum(1), keep0.sum(1))
    if spec != "1x1":
        assert torch.equal(keep.reshape(out, -1, m).sum(-1), keep0.reshape(out, -1, m).sum(-1))


def test_dsnot_reduces_the_error_on_a_real_sized_row():
    w, _, stats = layer(16, 256, tokens=512, seed=5)
    for spec in ("1x1", "2:4"):
        pattern = parse_pattern(spec)
        _, keep0 = METHODS.get("wanda").prune(w, stats, 0.5, pattern, MethodOptions())
        new, keep = METHODS.get("wanda").prune(w, stats, 0.5, pattern, MethodOptions(dsnot=True))
        before = reconstruction_shift(w, keep0, stats.mean).abs().sum()
        after = reconstruction_shift(w, keep, stats.mean).abs().sum()
        assert after < 0.5 * before, spec
        assert not torch.equal(keep, keep0)


def test_retrain_free_is_registered_as_a_whole_model_method():
    method = METHODS.get("retrain_free")
    assert method.whole_model and not METHODS.get("sparsegpt").whole_model
    method.check_pattern(parse_pattern("channelx1"))
    method.check_pattern(parse_pattern("1xchannel"))
    with pytest.raises(ConfigError, match="pattern: got '1x1'"):
        method.check_pattern(parse_pattern("1x1"))
    with pytest.raises(TypeError, match="retrain_free_prune"):
        method.prune(torch.ones(2, 2), None, 0.5, parse_pattern("channelx1"), MethodOptions())


def test_true_sequential_calibrates_later_linears_on_pruned_inputs():
    # with true_sequential the down projection's Hessian comes from the block with attention and gate/up already
    # pruned; without it from the dense block. Both prune every selected linear exactly.
    from prunekit.oneshot.methods import METHODS, MethodOptions
    from prunekit.oneshot.pipeline import run_sequential
    from prunekit.oneshot.prune import prune_block
    from prunekit.oneshot.structure import block_linears
    from prunekit.patterns import parse_pattern
    from llm_fixtures import tiny_llm

    hessians = {}
    for seq in (False, True):
        model = tiny_llm("llama", layers=1)
        seen = []
        down = model.model.layers[0].mlp.down_proj

        def on_layer(ctx, seq=seq, seen=seen):
            # a pre-hook: the staged pass stops before down_proj's own matmul, after handing it its input
            handle = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, 96)))
            linears = block_linears(ctx.block)
            layers = prune_block(ctx, linears, {n: n for n in linears}, 0.5, parse_pattern("1x1"),
                                 METHODS.get("sparsegpt"), MethodOptions(), true_sequential=seq)
            handle.remove()
            assert len(layers) == 7 and all(float((l.module.weight == 0).float().mean()) == 0.5 for l in layers)

        batches = [torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
        run_sequential(model, batches, on_layer, progress=False)
        hessians[seq] = seen
    # the probe + one pass (4 batches) each time; the staged pass's down_proj inputs differ from the dense ones
    dense_x = torch.cat(hessians[False][1:5])
    staged_x = torch.cat(hessians[True][1:5])
    assert not torch.allclose(dense_x, staged_x)
